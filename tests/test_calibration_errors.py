import pytest
import torch

import masquant
from masquant import CalibrationError, QuantConfig

from conftest import omni_samples, vl_samples


def run(model, calib):
    return masquant.quantize(model, calib, QuantConfig(method="rtn"), progress=False)


def test_empty_calibration_set(vl_model, fresh):
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        run(fresh(vl_model), [])
    with pytest.raises(CalibrationError, match="empty"):
        run(fresh(vl_model), iter(()))


def test_missing_input_ids(vl_model, fresh):
    sample = vl_samples([0])[0]
    del sample["input_ids"]
    with pytest.raises(CalibrationError, match="sample 0 has no 'input_ids'"):
        run(fresh(vl_model), [sample])


def test_pixel_values_without_grid(vl_model, fresh):
    samples = vl_samples([0, 1])
    del samples[1]["image_grid_thw"]
    with pytest.raises(CalibrationError, match="sample 1 has 'pixel_values' but no 'image_grid_thw'"):
        run(fresh(vl_model), samples)


def test_audio_features_without_mask(omni_model, fresh):
    sample = omni_samples([0])[0]
    del sample["feature_attention_mask"]
    with pytest.raises(CalibrationError, match="'input_features' but no 'feature_attention_mask'"):
        run(fresh(omni_model), [sample])


def test_placeholders_without_features(vl_model, fresh):
    sample = vl_samples([0])[0]
    del sample["pixel_values"], sample["image_grid_thw"]
    with pytest.raises(CalibrationError, match="vision placeholder tokens but none of"):
        run(fresh(vl_model), [sample])


@pytest.mark.parametrize("bad, message", [
    ("not a dict", "is a str, expected a dict"),
    ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "non-empty"),
    ({"input_ids": torch.zeros(1, 4)}, "integer tensor"),
    ({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)}, "does not match"),
])
def test_malformed_samples(vl_model, fresh, bad, message):
    with pytest.raises(CalibrationError, match=message):
        run(fresh(vl_model), [bad])


def test_text_only_samples_are_valid(vl_model, fresh):
    model = fresh(vl_model)
    report = run(model, [{"input_ids": torch.randint(3, 200, (1, 12))} for _ in range(2)])
    assert set(report.tokens) == {"text"}


def test_nan_activations_are_reported(vl_model, fresh):
    model = fresh(vl_model)
    with torch.no_grad():
        model.model.language_model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in the input of layer 1 self_attn.q_proj"):
        run(model, vl_samples([0]))
