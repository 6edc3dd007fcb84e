import copy
import itertools
import logging

import pytest
import torch

import masquant
from masquant import Modality, QuantConfig, QuantLinear
from masquant.config import options_for
from masquant.evaluation.evaluate import compare
from masquant.refmodels import tiny

from conftest import misaligned_vl, omni_samples, vl_samples


@pytest.fixture(scope="module")
def misaligned():
    return misaligned_vl()


@pytest.fixture(scope="module")
def calib():
    return vl_samples(range(8), image_grid=8)  # 16 vision tokens per sample


def run(model, calib, **kw):
    qmodel = copy.deepcopy(model)
    report = masquant.quantize(qmodel, calib, QuantConfig(**kw), progress=False)
    return qmodel, report


def test_misalignment_is_planted(misaligned, calib):
    _, report = run(misaligned, calib, method="rtn")
    acts = report.layers[0].linears["self_attn.q_proj"].activations
    assert acts["text"]["outlier_ratio"] > 10
    assert report.layers[0].linears["self_attn.o_proj"].activations["vision"]["absmax"] > 0


def test_per_modality_smoothing_beats_unified_smoothquant(misaligned, calib):
    """MAS at its per-modality SmoothQuant initialisation vs one unified vector (both alpha 0.5)."""
    _, unified = run(misaligned, calib, method="smoothquant", w_bits=8, a_bits=8)
    _, per_modality = run(misaligned, calib, method="mas", w_bits=8, a_bits=8, epochs=0)
    u, p = unified.mean_output_sqnr(), per_modality.mean_output_sqnr()
    # text is the non-dominant modality here (vision tokens are ~20x larger)
    assert p["text"] > u["text"] + 1.0, (p, u)
    assert p["vision"] > u["vision"], (p, u)


@pytest.mark.parametrize("mas_batch", [1, 4])
def test_learning_lowers_the_layer_loss(misaligned, calib, mas_batch):
    _, report = run(misaligned, calib, method="mas", w_bits=4, a_bits=8, epochs=2, mas_batch=mas_batch)
    for layer in report.layers:
        before, after = layer.groups["mas"]["loss_before_after"]
        assert after < before and layer.groups["mas"]["kept_learned"]


def test_rank_sweep_on_calibration_data(misaligned, calib):
    _, mas_only = run(misaligned, calib, method="mas", w_bits=4, a_bits=8)
    vision = {}
    for rank in (0, 4, 8, 16, 32, 64):  # fixed per-modality vectors: the guard may not swap them
        _, report = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=rank, cmc_guard=False)
        vision[rank] = report.mean_output_sqnr()["vision"]
    ranks = sorted(vision)
    # raising the rank never makes the non-text SQNR worse
    assert all(vision[b] >= vision[a] - 0.1 for a, b in itertools.pairwise(ranks)), vision
    assert vision[32] > vision[0] + 10, vision  # per-modality vectors without a patch are clearly worse
    assert vision[16] > mas_only.mean_output_sqnr()["vision"] - 1.0, (vision, mas_only.mean_output_sqnr())
    _, guarded = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=0)
    assert guarded.mean_output_sqnr()["vision"] > vision[0] + 5  # without a patch the guard picks text vectors


def test_masquant_stays_close_on_held_out_samples(misaligned, calib):
    qmodel, _ = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=32)
    mas_model, _ = run(misaligned, calib, method="mas", w_bits=4, a_bits=8)
    sq_model, _ = run(misaligned, calib, method="smoothquant", w_bits=4, a_bits=8)
    held_out = vl_samples(range(500, 504), image_grid=8)
    ours, mas, sq = (compare(misaligned, m, held_out)["decoder_sqnr"] for m in (qmodel, mas_model, sq_model))
    assert ours["vision"] > mas["vision"] - 1.0 and ours["text"] > mas["text"] - 1.0, (ours, mas)
    assert ours["text"] > sq["text"] and ours["vision"] > sq["vision"], (ours, sq)


def test_one_stored_weight_in_masquant_and_one_per_modality_in_mas(misaligned, calib):
    qmodel, report = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=8)
    mas_model, mas_report = run(misaligned, calib, method="mas", w_bits=4, a_bits=8)
    layer = "model.language_model.layers.0."
    for model, smoothed_count in ((qmodel, 1), (mas_model, 2)):
        state = model.state_dict()
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
            codes = [k for k in state if k.startswith(layer + name + ".") and k.endswith(".codes")]
            assert len(codes) == smoothed_count, codes
        # down_proj is not smoothed: a single weight in both modes
        assert len([k for k in state if k.startswith(layer + "mlp.down_proj.") and k.endswith(".codes")]) == 1
    q = qmodel.model.language_model.layers[0].self_attn.q_proj
    assert set(q.patches) == {"vision"} and q.patches["vision"].l1.shape == (64, 8)
    comp = report.layers[0].linears["self_attn.q_proj"].compensation["vision"]
    assert comp["rank"] == 8 and len(comp["whitened_spectrum"]) == 64 and 0 < comp["energy_kept"] <= 1
    storage = report.layers[0].linears["self_attn.q_proj"].storage
    assert storage["patches"] == comp["patch_bytes"] > 0
    assert mas_report.layers[0].linears["self_attn.q_proj"].storage["weight"] == 2 * storage["weight"]


def test_whitened_spectrum_decays_faster_than_plain(misaligned, calib):
    _, report = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=8)
    kept = [(c["vision"]["whitened_energy_kept"], c["vision"]["plain_energy_kept"])
            for layer in report.layers for lin in layer.linears.values() if (c := lin.compensation)]
    assert kept and sum(w > p for w, p in kept) >= 0.75 * len(kept), kept


def test_plain_svd_ablation_is_worse_on_calibration_data(misaligned, calib):
    _, whitened = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=8)
    _, plain = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8, rank=8, whiten=False)
    w = whitened.layers[0].linears
    p = plain.layers[0].linears
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):
        assert w[name].sqnr["vision"] > p[name].sqnr["vision"], (name, w[name].sqnr, p[name].sqnr)


@pytest.mark.parametrize("family", ["vl", "omni"])
def test_both_families_quantize_and_generate(family, vl_model, omni_model):
    model = vl_model if family == "vl" else omni_model
    samples = vl_samples(range(4), image_grid=8) if family == "vl" else omni_samples(range(4))
    qmodel, report = run(model, samples, method="masquant", w_bits=4, a_bits=8, rank=8, epochs=1)
    expected = {"vision"} | ({"audio"} if family == "omni" else set())
    assert set(qmodel.model.language_model.layers[0].self_attn.q_proj.patches) == expected
    assert set(report.layers[0].output_sqnr) == {"text"} | expected
    out = qmodel.generate(**samples[0], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == samples[0]["input_ids"].shape[1] + 4


@pytest.mark.reliability(
    case='calibration set lacking a modality the model has (no audio)',
    expect='warning; audio tokens use the text vector and no patch')
def test_absent_modality_falls_back_to_text_with_a_warning(omni_model, caplog):
    samples = [tiny.tiny_sample(i, family="omni", image=True, audio=False) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="masquant"):
        qmodel, _ = run(omni_model, samples, method="masquant", w_bits=4, a_bits=8, rank=4, epochs=1)
    assert "no calibration tokens for audio" in caplog.text
    q = qmodel.model.language_model.layers[0].self_attn.q_proj
    assert set(q.patches) == {"vision"}
    assert torch.equal(q.smooth[Modality.AUDIO], q.smooth[Modality.TEXT])


def test_auto_lambdas_and_mbq_use_gradient_ratios(misaligned, calib):
    _, report = run(misaligned, calib, method="mas", w_bits=4, a_bits=8, lambdas="auto", epochs=1)
    ratios = [layer.groups["mas"]["lambdas"]["vision"] for layer in report.layers]
    assert all(r > 0 for r in ratios) and report.layers[0].groups["mas"]["lambdas"]["text"] == 1.0
    assert min(ratios) >= sorted(ratios)[(len(ratios) - 1) // 2] - 1e-12  # floored at the median
    _, mbq = run(misaligned, calib, method="mbq", w_bits=4, a_bits=8, awq_grid=5)
    assert [layer.groups["mbq"]["weights"]["vision"] for layer in mbq.layers] == pytest.approx(ratios)
    searched = [g for layer in mbq.layers for k, g in layer.groups.items() if k != "mbq"]
    assert searched and all(0 <= g["alpha"] < 1 and g["weighted_mse"] <= g["rtn_weighted_mse"] for g in searched)


def test_mbq_weight_only_mode_runs(vl_model):
    qmodel, report = run(vl_model, vl_samples(range(3)), method="mbq", w_bits=4, a_bits=16, w_group_size=32,
                         w_symmetric=False, awq_grid=4)
    assert isinstance(qmodel.model.language_model.layers[1].mlp.gate_proj, QuantLinear)
    assert report.config["a_bits"] == 16


def test_guard_routes_through_the_text_vector_when_the_patch_cannot_keep_up(misaligned, calib):
    """At W8 the rank-8 patch cannot absorb W * (s_vision - s_text); the guard notices."""
    held_out = vl_samples(range(500, 504), image_grid=8)
    guarded, report = run(misaligned, calib, method="masquant", w_bits=8, a_bits=8, rank=8)
    plain, plain_report = run(misaligned, calib, method="masquant", w_bits=8, a_bits=8, rank=8, cmc_guard=False)
    assert any(layer.groups["mas"]["text_vector_for"] for layer in report.layers)
    assert not any(layer.groups["mas"]["text_vector_for"] for layer in plain_report.layers)
    assert report.mean_output_sqnr()["vision"] > plain_report.mean_output_sqnr()["vision"] + 5
    on, off = (compare(misaligned, m, held_out)["decoder_sqnr"] for m in (guarded, plain))
    assert on["vision"] > off["vision"] + 5 and on["text"] > off["text"]


@pytest.mark.reliability(
    case='fewer non-text tokens than twice the layer width',
    expect='warning that the patches may overfit')
def test_few_tokens_per_channel_are_flagged(vl_model, caplog):
    with caplog.at_level(logging.WARNING, logger="masquant"):
        run(vl_model, vl_samples(range(2)), method="masquant", w_bits=4, a_bits=8, rank=4, epochs=0)
    assert "vision calibration tokens for layers 64 wide (fewer than twice the width)" in caplog.text


@pytest.mark.reliability(case="bf16 / fp16 model (as real checkpoints load)",
                         expect="MAS and MASQuant calibrate; finite logits in the model's dtype")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mas_and_masquant_calibrate_half_precision_models(dtype):
    """Real checkpoints load in their saved dtype (bf16 for Qwen2.5-VL)."""
    samples = [tiny.tiny_sample(i, "vl") for i in range(2)]
    for method in ("mas", "masquant"):
        model = tiny.tiny_qwen2_5_vl(layers=1).to(dtype)
        masquant.quantize(model, samples, QuantConfig(method=method, w_bits=4, **options_for(method, rank=4, epochs=1)),
                          progress=False)
        with torch.no_grad():
            logits = model(**tiny.tiny_sample(9, "vl")).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_rank_zero_needs_no_covariance(vl_model):
    """With rank 0 there is nothing to fit: a singular covariance (ridge 0, few tokens) is no error."""
    model, report = run(vl_model, [tiny.tiny_sample(0, "vl")], method="masquant", w_bits=4, rank=0, ridge=0.0,
                        epochs=1)
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert not q.patches
    assert report.layers[0].linears["self_attn.q_proj"].compensation["vision"]["skipped"] == "rank 0"


needs_compiler = pytest.mark.skipif(not masquant.runtime.kernels.fusion_available(torch.device("cpu")),
                                    reason="no C++ compiler for torch.compile on this machine")


@needs_compiler
def test_compiled_weight_fake_quantization_of_a_wide_layer_matches_the_eager_one(monkeypatch):
    """1024- and 2816-wide weights through MAS's compiled fake quantization and its backward: the
    eager values and gradients (the widths of 3B models' layers, beside the small ones below)."""
    from masquant.methods import mas
    from masquant.runtime.primitives import IntGrid

    gen = torch.Generator().manual_seed(0)
    for rows, width in ((1024, 1024), (2816, 1024), (1024, 2816)):
        weight = torch.randn(rows, width, generator=gen)
        table = torch.rand(width, generator=gen) + 0.5
        grad = torch.randn(rows, width, generator=gen)
        results = []
        for threshold in (1 << 62, 0):
            monkeypatch.setattr(mas, "COMPILE_MIN_ELEMENTS", threshold)
            s = table.clone().requires_grad_()
            wq = mas._smoothed_fake_quant(weight, s, IntGrid(4, True), 0)
            (wq * grad).sum().backward()
            results.append((wq.detach(), s.grad))
        (ew, es), (cw, cs) = results
        assert torch.equal(ew, cw) and torch.allclose(es, cs, rtol=1e-4, atol=1e-4 * float(es.abs().max()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize(("group_size", "symmetric", "tokens", "width"),
                         [(0, True, 30, 64), (16, True, 30, 64), (16, False, 30, 64), (0, True, 300, 256)])
def test_compiled_fake_quantization_of_training_matches_the_eager_one(group_size, symmetric, tokens, width, device,
                                                                      monkeypatch):
    """MAS's compiled fake quantization (large weights and activations) against the eager one:
    the same values, and gradients for the smoothing vectors and the inputs equal up to
    summation order (abs-max ties included), also for the table alone, as MAS trains it, and for
    a row count off any power of two. On CUDA the compiled form is Triton's."""
    from masquant.methods import mas
    from masquant.runtime.primitives import IntGrid

    if not masquant.runtime.kernels.fusion_available(torch.device(device)):
        pytest.skip(f"no code generator for torch.compile on {device}")
    gen = torch.Generator().manual_seed(group_size)
    weight = torch.randn(24, width, generator=gen)
    weight[0, :3] = 4.0  # an abs-max tie
    rows = torch.randn(tokens, width, generator=gen) * torch.logspace(-1, 1, tokens)[:, None]
    table = torch.rand(3, width, generator=gen) + 0.5
    ids = torch.randint(0, 3, (tokens,), generator=gen)
    grad_w, grad_x = torch.randn(24, width, generator=gen), torch.randn(tokens, width, generator=gen)
    weight, rows, table, ids, grad_w, grad_x = (t.to(device) for t in (weight, rows, table, ids, grad_w, grad_x))

    def run_both(threshold):
        monkeypatch.setattr(mas, "COMPILE_MIN_ELEMENTS", threshold)
        s, x = table.clone().requires_grad_(), rows.clone().requires_grad_()
        wq = mas._smoothed_fake_quant(weight, s[1], IntGrid(4, symmetric), group_size)
        xq = mas._smoothed_tokens(x, s, ids, 8)
        ((wq * grad_w).sum() + (xq * grad_x).sum()).backward()
        return wq.detach(), xq.detach(), s.grad, x.grad

    def table_only(threshold):  # (as in MAS's training: the inputs need no gradient)
        monkeypatch.setattr(mas, "COMPILE_MIN_ELEMENTS", threshold)
        grads = []
        for _ in range(3):
            s = table.clone().requires_grad_()
            (mas._smoothed_tokens(rows, s, ids, 8) * grad_x).sum().backward()
            grads.append(s.grad)
        return grads

    for e, c in zip(table_only(1 << 62), table_only(0), strict=True):
        assert torch.allclose(e, c, rtol=1e-4, atol=1e-4), float((e - c).abs().max())
    eager = run_both(1 << 62)
    compiled = run_both(0)
    assert mas._weight_body in masquant.runtime.kernels._compiled
    assert mas._tokens_body in masquant.runtime.kernels._compiled and device not in masquant.runtime.kernels._broken
    assert float(eager[2][0].abs().max()) > 0  # (row 0 of the table only reaches the tokens)
    if device == "cuda":  # Triton's float32 division is not correctly rounded: a code may flip at a tie
        for e, c in zip(eager, compiled, strict=True):
            assert float((e - c).norm() / e.norm()) < 1e-2
        return
    for e, c in zip(eager, compiled, strict=True):
        assert torch.allclose(e, c, rtol=1e-5, atol=1e-5), float((e - c).abs().max())
    assert torch.equal(eager[0], compiled[0])


@needs_compiler
def test_compiled_training_learns_the_same_tables(misaligned, calib, monkeypatch):
    """A whole MASQuant calibration with every weight and activation of MAS training on the
    compiled path gives the eager run's model up to float summation order."""
    from masquant.methods import mas

    eager, eager_report = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8)
    monkeypatch.setattr(mas, "COMPILE_MIN_ELEMENTS", 0)
    compiled, compiled_report = run(misaligned, calib, method="masquant", w_bits=4, a_bits=8)
    assert mas._weight_body in masquant.runtime.kernels._compiled
    for e, c in zip(eager_report.layers, compiled_report.layers, strict=True):
        assert e.groups["mas"]["loss_before_after"] == pytest.approx(c.groups["mas"]["loss_before_after"], rel=1e-3)
    for (name, a), (_, b) in zip(eager.named_modules(), compiled.named_modules(), strict=True):
        if isinstance(a, QuantLinear):
            assert torch.allclose(a.smooth, b.smooth, rtol=1e-3, atol=1e-4), name


@pytest.mark.parametrize("group_size", [0, 16])
def test_training_quantizes_a_small_weight_for_every_modality_in_one_pass(misaligned, calib, monkeypatch,
                                                                          group_size):
    """MAS training fake-quantizes a small weight for every modality present in one pass; done
    modality by modality instead, the same calibration learns bit-identical tables (per-row
    arithmetic either way)."""
    from masquant.methods import mas

    calls = {"weights": 0}
    fq_weight = mas.fake_quantize_weight

    def counted(*args, **kw):
        calls["weights"] += 1
        return fq_weight(*args, **kw)

    monkeypatch.setattr(mas, "fake_quantize_weight", counted)
    kw = dict(method="masquant", w_bits=4, a_bits=8, epochs=1, mas_batch=2, calib_batch=2, w_group_size=group_size)
    batched_model, batched = run(misaligned, calib, **kw)
    batched_calls, calls["weights"] = calls["weights"], 0
    own_weight = mas._TrainableLinear.weight
    monkeypatch.setattr(mas._TrainableLinear, "weight", lambda self, m, present: own_weight(self, m, [m]))
    single_model, single = run(misaligned, calib, **kw)
    assert 0 < batched_calls < calls["weights"], (batched_calls, calls)
    for a, b in zip(batched.layers, single.layers, strict=True):
        assert a.groups["mas"]["loss_before_after"] == b.groups["mas"]["loss_before_after"]
    for (name, a), (_, b) in zip(batched_model.named_modules(), single_model.named_modules(), strict=True):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.smooth, b.smooth), name
