import math

import pytest
import torch

import masquant
from masquant import CalibrationError, QuantConfig
from masquant.config import options_for

from conftest import omni_samples, vl_samples


def run(model, calib, **kwargs):
    return masquant.quantize(model, calib, QuantConfig(**{"method": "rtn", **kwargs}), progress=False)


@pytest.mark.reliability(
    case='empty calibration set',
    expect='CalibrationError before any layer is touched')
def test_empty_calibration_set(vl_model, fresh):
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        run(fresh(vl_model), [])
    with pytest.raises(CalibrationError, match="empty"):
        run(fresh(vl_model), iter(()))


@pytest.mark.reliability(
    case='calibration sample without input_ids',
    expect='CalibrationError naming the sample')
def test_missing_input_ids(vl_model, fresh):
    sample = vl_samples([0])[0]
    del sample["input_ids"]
    with pytest.raises(CalibrationError, match="sample 0 has no 'input_ids'"):
        run(fresh(vl_model), [sample])


@pytest.mark.reliability(
    case='image features without image_grid_thw',
    expect='CalibrationError naming the sample and the missing key')
def test_pixel_values_without_grid(vl_model, fresh):
    samples = vl_samples([0, 1])
    del samples[1]["image_grid_thw"]
    with pytest.raises(CalibrationError, match="sample 1 has 'pixel_values' but no 'image_grid_thw'"):
        run(fresh(vl_model), samples)


@pytest.mark.reliability(
    case='audio features without feature_attention_mask',
    expect='CalibrationError naming the sample and the missing key')
def test_audio_features_without_mask(omni_model, fresh):
    sample = omni_samples([0])[0]
    del sample["feature_attention_mask"]
    with pytest.raises(CalibrationError, match="'input_features' but no 'feature_attention_mask'"):
        run(fresh(omni_model), [sample])


@pytest.mark.reliability(
    case="image placeholders without pixel values (the set lacks the modality's features)",
    expect='CalibrationError naming the sample')
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
@pytest.mark.reliability(
    case='malformed calibration sample',
    expect='CalibrationError saying what is wrong')
def test_malformed_samples(vl_model, fresh, bad, message):
    with pytest.raises(CalibrationError, match=message):
        run(fresh(vl_model), [bad])


def test_text_only_samples_are_valid(vl_model, fresh):
    model = fresh(vl_model)
    report = run(model, [{"input_ids": torch.randint(3, 200, (1, 12))} for _ in range(2)])
    assert set(report.tokens) == {"text"}


@pytest.mark.reliability(
    case='NaN in the activations during calibration',
    expect='ValueError naming the layer and linear')
def test_nan_activations_are_reported(vl_model, fresh):
    model = fresh(vl_model)
    with torch.no_grad():
        model.model.language_model.layers[1].input_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in the input of layer 1 self_attn.q_proj"):
        run(model, vl_samples([0]))


@pytest.mark.reliability(case="NaN / Inf in a weight to quantize",
                         expect="ValueError naming the decoder layer and linear, before calibrating")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_named(vl_model, fresh, bad):
    model = fresh(vl_model)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf in the weights of decoder layer 1 mlp\.up_proj"):
        run(model, vl_samples([0]))
    assert not any(isinstance(m, masquant.QuantLinear) for m in model.modules())


@pytest.mark.reliability(case="all-zero and constant activation channels, every method",
                         expect="finite smoothing vectors, patches and logits")
@pytest.mark.parametrize("method", ["rtn", "smoothquant", "awq", "mbq", "mas", "masquant"])
def test_dead_and_constant_channels(vl_model, fresh, method):
    model = fresh(vl_model)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, 7] = 0.0
        model.model.language_model.embed_tokens.weight[:, 9] = 0.5
        model.model.language_model.layers[0].mlp.up_proj.weight[11] = 0.0  # a dead down_proj input channel
    own = options_for(method, epochs=1, rank=4, awq_grid=3)
    report = run(model, vl_samples(range(3)), method=method, w_bits=4, **own)
    assert all(math.isfinite(v) for layer in report.layers for v in layer.output_sqnr.values())
    for module in model.modules():
        if isinstance(module, masquant.QuantLinear):
            assert torch.isfinite(module.smooth).all()
            assert all(torch.isfinite(b).all() for b in module.patches.buffers())
    with torch.no_grad():
        assert torch.isfinite(model(**vl_samples([9])[0]).logits).all()


@pytest.mark.reliability(case="model lacking a modality the calibration set has (audio features for Qwen2.5-VL)",
                         expect="CalibrationError naming the sample, the features and the model")
def test_features_of_a_modality_the_model_lacks(vl_model, fresh):
    model = fresh(vl_model)
    with pytest.raises(CalibrationError, match=r"sample 0 has audio features \['input_features'\].*qwen2_5_vl"):
        run(model, omni_samples([0]))
    assert not any(isinstance(m, masquant.QuantLinear) for m in model.modules())
