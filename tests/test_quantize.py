import json

import pytest
import torch

import masquant
from masquant import QuantConfig, QuantLinear, QuantReport
from masquant.evaluation.evaluate import compare

from conftest import omni_samples, vl_samples


@pytest.mark.parametrize("family", ["vl", "omni"])
def test_w8a8_smoothquant_stays_close_and_generates(family, vl_model, omni_model, fresh):
    model = vl_model if family == "vl" else omni_model
    make = vl_samples if family == "vl" else omni_samples
    qmodel = fresh(model)
    report = masquant.quantize(qmodel, make(range(6)), QuantConfig(method="smoothquant"), progress=False)
    held_out = make(range(1000, 1004))
    scores = compare(model, qmodel, held_out)
    for sample in held_out:
        with torch.no_grad():
            a, b = model(**sample).logits, qmodel(**sample).logits
        assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)) >= 0.99
    expected = {"text", "vision"} | ({"audio"} if family == "omni" else set())
    assert set(scores["decoder_sqnr"]) == expected
    assert set(report.tokens) == expected and report.samples == 6
    out = qmodel.generate(**held_out[0], max_new_tokens=5, do_sample=False)
    assert out.shape[1] == held_out[0]["input_ids"].shape[1] + 5
    # every decoder linear was swapped, nothing outside the decoder was
    quantized = {n for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 7 * len(report.layers)
    assert all(".language_model.layers." in n for n in quantized)
    assert isinstance(qmodel.lm_head, torch.nn.Linear)
    assert not any(isinstance(m, QuantLinear) for m in qmodel.model.visual.modules())


def test_report_has_per_layer_linear_modality_entries_and_round_trips(vl_model, fresh):
    qmodel = fresh(vl_model)
    report = masquant.quantize(qmodel, vl_samples(range(3)), QuantConfig(method="rtn", w_bits=4), progress=False)
    layer = report.layers[0]
    assert set(layer.output_sqnr) == {"text", "vision"}
    assert set(layer.linears) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    q = layer.linears["self_attn.q_proj"]
    assert set(q.sqnr) == {"text", "vision"} and q.activations["vision"]["tokens"] == report.tokens["vision"]
    data = json.loads(report.to_json())
    again = QuantReport.from_dict(data)
    assert again.to_dict() == report.to_dict()
    assert data["config"]["method"] == "rtn" and data["config"]["version"] == QuantConfig.VERSION
    assert "| 0 |" in report.summary()


def test_more_bits_give_higher_sqnr(vl_model, fresh):
    calib = vl_samples(range(4))
    sqnr = {}
    for w_bits in (4, 8):
        report = masquant.quantize(fresh(vl_model), calib, QuantConfig(method="rtn", w_bits=w_bits, a_bits=16),
                                   progress=False)
        sqnr[w_bits] = report.mean_output_sqnr()
    for modality in ("text", "vision"):
        assert sqnr[8][modality] > sqnr[4][modality] + 10


def test_weight_only_group_quantization_runs(omni_model, fresh):
    qmodel = fresh(omni_model)
    config = QuantConfig(method="awq", w_bits=4, a_bits=16, w_group_size=32, w_symmetric=False, awq_grid=5)
    report = masquant.quantize(qmodel, omni_samples(range(3)), config, progress=False)
    assert all(0.0 <= g["alpha"] < 1.0 for lr in report.layers for g in lr.groups.values())
    # the searched exponent can only improve on no smoothing (exponent 0 is on the grid)
    assert all(g["block_mse"] <= g["rtn_block_mse"] for lr in report.layers for g in lr.groups.values())
    qlinear = qmodel.model.language_model.layers[0].mlp.up_proj
    assert qlinear.qweight.codes.dtype == torch.uint8
    assert qlinear.qweight.scale.shape == (qlinear.out_features * 2, 1)


@pytest.mark.reliability(
    case='quantizing an already quantized model',
    expect='ValueError; the model is unchanged')
def test_quantizing_twice_is_refused(vl_model, fresh):
    qmodel = fresh(vl_model)
    masquant.quantize(qmodel, vl_samples(range(2)), QuantConfig(method="rtn"), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        masquant.quantize(qmodel, vl_samples(range(2)), QuantConfig(method="rtn"), progress=False)


def test_padding_tokens_are_ignored_by_statistics(vl_model, fresh):
    sample = vl_samples([5])[0]
    padded = {k: v.clone() for k, v in sample.items()}
    padded["input_ids"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), sample["input_ids"]], 1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), sample["attention_mask"]], 1)
    padded["mm_token_type_ids"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), sample["mm_token_type_ids"]], 1)
    plain = masquant.quantize(fresh(vl_model), [sample], QuantConfig(method="rtn"), progress=False)
    left = masquant.quantize(fresh(vl_model), [padded], QuantConfig(method="rtn"), progress=False)
    assert left.tokens == plain.tokens


def test_a_quantized_vl_model_runs_from_inputs_embeds_after_calibration(vl_model, fresh):
    """Calibration must not leave the multimodal RoPE offsets of its last batch behind."""
    model = fresh(vl_model)
    masquant.quantize(model, vl_samples(range(3)), QuantConfig(method="smoothquant"), progress=False)
    sample = vl_samples([50], image=False)[0]
    ids = masquant.modality_ids(model, sample["input_ids"])
    embeds = model.get_input_embeddings()(sample["input_ids"])
    with masquant.modality_scope(model, ids), torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=sample["attention_mask"])
    assert torch.isfinite(out.logits).all()
