import torch

import masquant
from masquant import QuantConfig
from masquant.refmodels import tiny

from conftest import vl_samples

OUTLIER_CHANNELS = [3, 17, 42]


def planted_model():
    """Tiny Qwen2.5-VL whose text embeddings carry a few large channels (as real LLMs do)."""
    model = tiny.tiny_qwen2_5_vl(seed=1)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, OUTLIER_CHANNELS] *= 60.0
    return model


def text_sqnr(method, model, calib):
    import copy

    report = masquant.quantize(copy.deepcopy(model), calib, QuantConfig(method=method, w_bits=8, a_bits=8),
                               progress=False)
    first = report.layers[0]
    return first.linears["self_attn.q_proj"].sqnr["text"], report.mean_output_sqnr()["text"]


def test_smoothquant_beats_rtn_on_text_with_outlier_channels():
    model = planted_model()
    calib = vl_samples(range(6))
    rtn_q, rtn_layers = text_sqnr("rtn", model, calib)
    sq_q, sq_layers = text_sqnr("smoothquant", model, calib)
    # the outliers are visible in the report of the first linear
    report = masquant.quantize(planted_model(), calib, QuantConfig(method="rtn"), progress=False)
    assert report.layers[0].linears["self_attn.q_proj"].activations["text"]["outlier_ratio"] > 10
    assert sq_q > rtn_q + 3, (sq_q, rtn_q)
    assert sq_layers > rtn_layers + 2, (sq_layers, rtn_layers)


def test_without_outliers_smoothing_is_not_needed():
    """Control: on the unmodified model the gap closes, so the test above measures the outliers."""
    model = tiny.tiny_qwen2_5_vl(seed=1)
    calib = vl_samples(range(6))
    rtn_q, _ = text_sqnr("rtn", model, calib)
    sq_q, _ = text_sqnr("smoothquant", model, calib)
    assert abs(sq_q - rtn_q) < 1.5
