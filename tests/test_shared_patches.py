"""Patches beyond MASQuant's non-text ones: a text patch (``text_patch``) and one patch for every token
(``"all"``, the same-budget baseline ``lrc``), through every kernel, saved and exported."""

import copy

import pytest
import torch
import torch.nn.functional as F

import masquant
from masquant import Modality, QuantConfig, QuantLinear
from masquant.modality import NUM_MODALITIES, ModalityRouter
from masquant.runtime.primitives import fake_quantize_per_token

from conftest import first_q_proj_outputs, misaligned_vl, set_switch, vl_samples

KERNELS = {"native": {}, "eager": {"MASQUANT_NATIVE": "0", "MASQUANT_FUSE": "0"},
           "dequant": {"MASQUANT_NATIVE": "0", "MASQUANT_FUSE": "0", "MASQUANT_INT_GEMM": "float"}}


def layer_with(names, uniform, k=48, n=40, rank=6):
    torch.manual_seed(3)
    linear = torch.nn.Linear(k, n)
    smooth = torch.rand(NUM_MODALITIES, k) + 0.5
    if uniform:
        smooth[:] = smooth[0]
    router = ModalityRouter({})
    q = QuantLinear.from_linear(linear, smooth, QuantConfig(method="rtn", w_bits=4, a_bits=8), router)
    for name in names:
        q.add_patch(name, torch.randn(k, rank) * 0.1, torch.randn(rank, n) * 0.1, dtype=torch.float32)
    return q, router


def reference(q, x, ids):
    """``Q_a(x / s_m) Wq^T + b`` plus, on the rows a patch covers, ``(x / s_m) L1 L2``, row by row."""
    w = q.dequantized_weight()
    rows = x.reshape(-1, q.in_features)
    out = []
    for row, m in zip(rows, ids.reshape(-1).tolist(), strict=True):
        xs = row / q.smooth[m]
        y = F.linear(fake_quantize_per_token(xs[None], q.a_bits), w, q.bias)[0]
        name = "all" if "all" in q.patches else Modality(m).name.lower()
        if name in q.patches:
            y = y + (xs @ q.patches[name].l1) @ q.patches[name].l2
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], q.out_features)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize(("names", "uniform"), [(["all"], True), (["all"], False), (["text", "vision"], False),
                                                (["text"], True)])
@pytest.mark.parametrize("rows", [3, 70])
def test_text_and_shared_patches_reach_their_rows_on_every_kernel(kernel, names, uniform, rows, monkeypatch):
    """Text rows get a text patch or a shared one on every kernel, also in a forward holding text only (which
    an unpatched layer runs without ids); other rows get theirs; values as the formula gives them."""
    if kernel == "native":
        needs_native_here()
    for switch, value in KERNELS[kernel].items():
        set_switch(monkeypatch, switch, value)
    q, router = layer_with(names, uniform)
    x = torch.randn(1, rows, q.in_features)
    for ids in (torch.zeros(1, rows, dtype=torch.long), torch.randint(0, NUM_MODALITIES, (1, rows))):
        with torch.no_grad(), router.scope(ids):
            got = q(x)
        expected = reference(q, x, ids)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    unpatched = copy.deepcopy(q)
    unpatched.patches.clear()
    unpatched.router = router
    with torch.no_grad(), router.scope(torch.zeros(1, rows, dtype=torch.long)):
        assert float((q(x) - unpatched(x)).abs().max()) > 1e-2  # (text rows are patched)


def needs_native_here():
    from masquant.runtime import native
    if native.library() is None:
        pytest.skip("no native kernel here")


def test_a_shared_patch_on_one_vector_needs_no_ids():
    q, _ = layer_with(["all"], uniform=True)
    assert not q.needs_ids and q.patches_text
    q2, _ = layer_with(["all"], uniform=False)
    assert q2.needs_ids
    q3, _ = layer_with(["vision"], uniform=True)
    assert q3.needs_ids and not q3.patches_text


def test_a_layer_takes_one_shared_patch_or_patches_by_modality():
    q, _ = layer_with(["all"], uniform=True)
    with pytest.raises(ValueError, match="either one patch for all tokens or patches by modality"):
        q.add_patch(Modality.VISION, torch.zeros(48, 2), torch.zeros(2, 40))
    q, _ = layer_with(["vision"], uniform=True)
    with pytest.raises(ValueError, match="either one patch for all tokens"):
        q.add_patch("all", torch.zeros(48, 2), torch.zeros(2, 40))
    with pytest.raises(ValueError, match="patches are named by modality"):
        q.add_patch("speech", torch.zeros(48, 2), torch.zeros(2, 40))


@pytest.fixture(scope="module")
def tiny_vl():
    return misaligned_vl(), vl_samples(range(8), image_grid=8), vl_samples(range(100, 103), image_grid=8)


def quantized(model, calib, **kw):
    q = copy.deepcopy(model)
    report = masquant.quantize(q, calib, QuantConfig(w_bits=4, a_bits=8, **kw), progress=False)
    return q, report


def effective(layer: QuantLinear, name: str) -> torch.Tensor:
    """The stored weight plus a patch, ``[out, in]`` in float64."""
    patch = layer.patches[name]
    return layer.dequantized_weight().double() + (patch.l1.double() @ patch.l2.double()).T


def test_full_rank_shared_patch_gives_every_token_the_smoothed_weight(tiny_vl):
    """lrc at full rank: ``Q(W s) + (L1 L2)^T`` is ``W s`` itself, the patch shared by text and vision."""
    model, calib, _ = tiny_vl
    q, report = quantized(model, calib, method="lrc", rank=1.0, patch_dtype="float32")
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.patches}
    assert layers and all(list(m.patches) == ["all"] and m.uniform for m in layers.values())
    fp = dict(model.named_modules())
    for name, layer in layers.items():
        target = fp[name].weight.detach().double() * layer.smooth[0].double()
        torch.testing.assert_close(effective(layer, "all"), target, rtol=0, atol=1e-6 * float(target.abs().max()))
    entry = report.layers[0].linears["self_attn.q_proj"].compensation["all"]
    assert entry["tokens"] > 0 and entry["patch_bytes"] > 0


def test_text_patch_lowers_the_text_error_and_keeps_the_rest(tiny_vl):
    """``text_patch`` adds one patch per smoothed linear for text tokens: the text output SQNR on held-out
    samples rises, vision's patches are the same ones."""
    model, calib, held = tiny_vl
    from masquant.evaluation.evaluate import compare
    plain, _ = quantized(model, calib, method="masquant", rank=8, epochs=1)
    patched, _ = quantized(model, calib, method="masquant", rank=8, epochs=1, text_patch=True)
    with_text = [m for m in patched.modules() if isinstance(m, QuantLinear) and "text" in m.patches]
    assert with_text and not any("text" in m.patches for m in plain.modules() if isinstance(m, QuantLinear))
    a, b = compare(model, plain, held)["decoder_sqnr"], compare(model, patched, held)["decoder_sqnr"]
    assert b["text"] > a["text"] + 3.0, (a, b)


@pytest.mark.parametrize("kw", [dict(method="lrc", rank=4), dict(method="masquant", rank=4, text_patch=True)])
def test_saved_and_exported_models_keep_text_and_shared_patches(kw, tiny_vl, tmp_path):
    """Save / load gives the same logits; the compressed-tensors export with its sidecar gives the runtime's
    values to activation rounding (and clearly not the unpatched ones)."""
    model, calib, held = tiny_vl
    q, _ = quantized(model, calib, epochs=1, **kw) if kw["method"] == "masquant" else quantized(model, calib, **kw)
    masquant.save(q, tmp_path / "saved")
    loaded = masquant.load(tmp_path / "saved")
    sample = held[0]
    with torch.no_grad():
        ref = q(**sample).logits
        torch.testing.assert_close(loaded(**sample).logits, ref)
    from masquant.io.export import export_compressed_tensors
    from masquant.io.sidecar import load_export

    export_compressed_tensors(tmp_path / "saved", tmp_path / "ct")
    models = (q, load_export(tmp_path / "ct", sidecar=False)[0], load_export(tmp_path / "ct", sidecar=True)[0])
    ref, plain, routed = first_q_proj_outputs(models, sample)
    text = masquant.modality_ids(q, sample["input_ids"])[0] == int(Modality.TEXT)
    err = {name: float((x - ref)[text].norm() / ref[text].norm()) for name, x in (("plain", plain), ("routed", routed))}
    assert err["routed"] < 0.25 * err["plain"], err
