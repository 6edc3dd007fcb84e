"""GPTQ rounding (``w_rounding="gptq"``): round-to-nearest's grid, a lower calibration-weighted error, and
MASQuant's patches fitted to the GPTQ residual."""

import copy

import pytest
import torch

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.calibration.gptq import gptq_weight
from masquant.runtime.primitives import IntGrid, quantize_weight

from conftest import misaligned_vl, vl_samples


def correlated_inputs(rows=512, k=64, seed=0):
    """Samples of one correlated distribution (the mixing fixed, the draws by ``seed``)."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(99)) / k ** 0.5 + torch.eye(k)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * torch.linspace(0.2, 3, k)) @ mix


@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 0, True), (4, 16, False), (3, -1, True), (8, 0, True)])
def test_a_diagonal_hessian_gives_round_to_nearest(bits, group, sym):
    """Without correlation between inputs no error is passed on: GPTQ's codes are RTN's, on RTN's grid."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g)
    h = torch.diag(torch.rand(64, generator=g, dtype=torch.float64) + 0.1)
    grid = IntGrid(bits, sym)
    ours, rtn = gptq_weight(w, h, grid, group), quantize_weight(w, grid, group)
    assert torch.equal(ours.codes, rtn.codes) and torch.equal(ours.scale, rtn.scale)
    assert torch.equal(ours.zero, rtn.zero) and ours.codes.dtype == rtn.codes.dtype


@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 0, True), (4, 16, False), (3, 0, True)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits, group, sym):
    """``|| X (W - Q)^T ||`` on the calibration inputs and on fresh ones from the same distribution: clearly
    below round-to-nearest's, while the plain weight error is larger (GPTQ trades it for the output's)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    x, fresh = correlated_inputs(seed=3), correlated_inputs(seed=4)
    grid = IntGrid(bits, sym)
    ours = gptq_weight(w, x.double().T @ x.double(), grid, group).dequantize()
    rtn = quantize_weight(w, grid, group).dequantize()
    for inputs in (x, fresh):
        e_gptq, e_rtn = (float((inputs @ (w - q).T).norm()) for q in (ours, rtn))
        assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)
    assert float((w - ours).norm()) > float((w - rtn).norm())
    assert int(ours.abs().amax() / quantize_weight(w, grid, group).scale.max()) <= 2 ** bits  # (on the grid)


def test_bad_hessians_are_refused_or_damped(caplog):
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="NaN/Inf"):
        gptq_weight(w, torch.full((16, 16), float("nan"), dtype=torch.float64), IntGrid(4))
    with pytest.raises(ValueError, match="Hessian of shape"):
        gptq_weight(w, torch.eye(8, dtype=torch.float64), IntGrid(4))
    x = torch.randn(4, 16)  # rank 4 of 16, and a dead input: damping makes it usable
    h = x.double().T @ x.double()
    h[3, :] = h[:, 3] = 0
    q = gptq_weight(w, h, IntGrid(4)).dequantize()
    assert torch.isfinite(q).all()


@pytest.fixture(scope="module")
def tiny():
    return misaligned_vl(), vl_samples(range(8), image_grid=8)


def run(model, calib, **kw):
    q = copy.deepcopy(model)
    report = masquant.quantize(q, calib, QuantConfig(w_bits=4, a_bits=8, **kw), progress=False)
    return q, report


@pytest.mark.parametrize("method", ["rtn", "smoothquant"])
def test_gptq_in_the_pipeline_beats_round_to_nearest_on_calibration(method, tiny):
    """Every quantized linear re-rounded (codes differ from RTN's; the first layer's on the same grid), and each
    layer's output SQNR on the calibration tokens higher, for text and vision."""
    model, calib = tiny
    (q_rtn, r_rtn), (q_gptq, r_gptq) = run(model, calib, method=method), run(model, calib, method=method,
                                                                             w_rounding="gptq")
    linears = [(n, m) for n, m in q_gptq.named_modules() if isinstance(m, QuantLinear)]
    rtn_layers = dict(q_rtn.named_modules())
    assert all(m.rounding == "gptq" and not torch.equal(m.qweight.codes, rtn_layers[n].qweight.codes)
               for n, m in linears)
    first = [(n, m) for n, m in linears if ".layers.0." in n]  # (later layers see other inputs, other vectors)
    assert first and all(torch.equal(m.qweight.scale, rtn_layers[n].qweight.scale) for n, m in first)
    for a, b in zip(r_rtn.layers, r_gptq.layers, strict=True):
        for modality in ("text", "vision"):
            assert b.output_sqnr[modality] > a.output_sqnr[modality], (modality, a.output_sqnr, b.output_sqnr)


def test_masquant_patches_fit_the_gptq_residual(tiny):
    """At full rank a vision patch makes the GPTQ-rounded text weight exactly ``W s_vision``: fitted to the
    stored (GPTQ) codes, not to the round-to-nearest ones the method's trials used."""
    model, calib = tiny
    q, _ = run(model, calib, method="masquant", rank=1.0, patch_dtype="float32", epochs=1, w_rounding="gptq")
    fp = dict(model.named_modules())
    patched = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear) and "vision" in m.patches]
    assert patched
    for name, layer in patched:
        p = layer.patches["vision"]
        got = layer.dequantized_weight().double() + (p.l1.double() @ p.l2.double()).T
        target = fp[name].weight.detach().double() * layer.smooth[1].double()
        torch.testing.assert_close(got, target, rtol=0, atol=1e-6 * float(target.abs().max()))


def test_the_flag_round_trips_and_old_configs_read_as_rtn():
    config = QuantConfig(method="masquant", w_rounding="gptq")
    assert QuantConfig.from_dict(config.to_dict()).w_rounding == "gptq"
    old = config.to_dict()
    del old["w_rounding"]
    assert QuantConfig.from_dict(old).w_rounding == "rtn"
    with pytest.raises(ValueError, match="w_rounding must be"):
        QuantConfig(w_rounding="awq")
