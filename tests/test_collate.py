"""Batched calibration (``calib_batch``): padded batches must give what one-by-one gives."""

import copy

import pytest
import torch

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.calibration.collate import CollateError, merge
from masquant.refmodels import tiny


def _mixed(family):
    samples = [tiny.tiny_sample(1, family, text_len=10), tiny.tiny_sample(2, family, image=False, text_len=23),
               tiny.tiny_sample(3, family, text_len=4, image_grid=8)]
    if family == "omni":
        samples.append(tiny.tiny_sample(4, family, image=False, audio=True, text_len=7))
    return samples


@pytest.mark.parametrize("family", ["vl", "omni"])
def test_batched_calibration_matches_one_by_one(family, vl_model, omni_model):
    model = vl_model if family == "vl" else omni_model
    results = {}
    for batch in (1, 4):
        qmodel = copy.deepcopy(model)
        report = masquant.quantize(qmodel, _mixed(family), QuantConfig(method="smoothquant", calib_batch=batch),
                                   progress=False)
        results[batch] = (qmodel, report)
    (one, r1), (many, r4) = results[1], results[4]
    assert r1.tokens == r4.tokens and r1.samples == r4.samples == len(_mixed(family))
    for (name, a), (_, b) in zip(one.named_modules(), many.named_modules(), strict=True):
        if isinstance(a, QuantLinear):
            assert torch.allclose(a.smooth, b.smooth, rtol=1e-4), name
    for sample in _mixed(family):
        with torch.no_grad():
            assert torch.allclose(one(**sample).logits, many(**sample).logits, rtol=1e-3, atol=1e-4)


def test_masquant_runs_with_batches_and_grouped_steps(vl_model):
    qmodel = copy.deepcopy(vl_model)
    report = masquant.quantize(qmodel, [tiny.tiny_sample(i, "vl", text_len=8 + i) for i in range(6)],
                               QuantConfig(method="masquant", w_bits=4, calib_batch=2, mas_batch=2, rank=4),
                               progress=False)
    assert report.samples == 6 and all(layer.groups["mas"]["loss_before_after"] for layer in report.layers)


def test_merge_pads_on_the_right_and_refuses_unknown_inputs():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    b = {"input_ids": torch.tensor([[8]])}
    out = merge([a, b], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    typed = {**a, "labels": torch.tensor([[-100, 6, 7]]), "mm_token_type_ids": torch.ones(1, 3, dtype=torch.long)}
    mixed = merge([typed, b])
    assert mixed["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]  # no labels: every token counts
    assert mixed["mm_token_type_ids"].tolist() == [[1, 1, 1], [0, 0, 0]]
    with pytest.raises(CollateError, match="cache_position"):
        merge([a, {**b, "cache_position": torch.tensor([0])}])


def test_a_shared_cache_captures_once_and_changes_nothing(vl_model, monkeypatch):
    from masquant.calibration import quantize as api

    samples = [tiny.tiny_sample(i, "vl", text_len=6 + i) for i in range(4)]
    calls = []
    real = api.capture_all
    monkeypatch.setattr(api, "capture_all", lambda *a: calls.append(1) or real(*a))
    cache, models = {}, []
    for method in ("smoothquant", "mbq", "smoothquant"):
        qmodel = copy.deepcopy(vl_model)
        masquant.quantize(qmodel, samples, QuantConfig(method=method, w_bits=4), progress=False, cache=cache)
        models.append(qmodel)
    assert len(calls) == 1
    alone = copy.deepcopy(vl_model)
    masquant.quantize(alone, samples, QuantConfig(method="smoothquant", w_bits=4), progress=False)
    for model in (models[0], models[2]):
        for a, b in zip(model.modules(), alone.modules(), strict=True):
            if isinstance(a, QuantLinear):
                assert torch.equal(a.smooth, b.smooth) and torch.equal(a.qweight.codes, b.qweight.codes)
