import pytest
import torch
import torch.nn.functional as F

from masquant import Modality, QuantConfig, QuantLinear
from masquant.modality import NUM_MODALITIES, ModalityRouter
from masquant.runtime.primitives import IntGrid, fake_quantize_per_token, quantize_weight


def make(smooth, a_bits=8, w_bits=8, bias=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=bias)
    router = ModalityRouter({})
    config = QuantConfig(method="rtn", w_bits=w_bits, a_bits=a_bits)
    return linear, router, QuantLinear.from_linear(linear, smooth, config, router)


def test_matches_the_reference_formula_for_text():
    s = torch.rand(NUM_MODALITIES, 16) + 0.5
    linear, router, q = make(s)
    x = torch.randn(2, 5, 16)
    w_hat = quantize_weight(linear.weight.detach() * s[0], IntGrid(8)).dequantize()
    expected = F.linear(fake_quantize_per_token(x / s[0], 8), w_hat, linear.bias)
    with router.scope(torch.zeros(2, 5, dtype=torch.long)):
        assert torch.allclose(q(x), expected, atol=1e-5)


def test_each_token_uses_its_modality_row():
    s = torch.ones(NUM_MODALITIES, 16)
    s[Modality.VISION] = torch.linspace(0.2, 5.0, 16)
    s[Modality.AUDIO] = 3.0
    linear, router, q = make(s, a_bits=16)
    x = torch.randn(1, 6, 16)
    ids = torch.tensor([[0, 1, 2, 1, 0, 2]])
    w_hat = q.dequantized_weight()
    with router.scope(ids):
        y = q(x)
    for t, m in enumerate(ids[0].tolist()):
        expected = F.linear(x[0, t] / s[m], w_hat, linear.bias)
        assert torch.allclose(y[0, t], expected, atol=1e-5)
    # a different modality assignment changes the output of exactly those rows
    with router.scope(torch.zeros_like(ids)):
        y_text = q(x)
    changed = (y - y_text).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False, True, True, True, False, True]


def test_smoothing_is_exact_without_quantization_error_in_activations():
    """(x / s) (W s)^T == x W^T: with 8-bit weights the smoothed layer stays close to FP."""
    s = torch.rand(NUM_MODALITIES, 16) * 4 + 0.25
    s[:] = s[0]
    linear, _router, q = make(s, a_bits=16)
    x = torch.randn(4, 16)
    with torch.no_grad():
        rel = (q(x) - linear(x)).norm() / linear(x).norm()
    assert float(rel) < 0.02


def test_uniform_tables_need_no_ids_but_per_modality_tables_do():
    _, _, q = make(torch.ones(NUM_MODALITIES, 16))
    q(torch.randn(3, 16))  # no router ids needed
    s = torch.ones(NUM_MODALITIES, 16)
    s[1] = 2.0
    _, router, q2 = make(s)
    with pytest.raises(RuntimeError, match="modality ids are not set"):
        q2(torch.randn(3, 16))
    with router.scope(torch.zeros(4, dtype=torch.long)), pytest.raises(RuntimeError, match="do not match"):
        q2(torch.randn(3, 16))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_smoothing_factors_are_rejected(bad):
    s = torch.ones(NUM_MODALITIES, 16)
    s[0, 3] = bad
    with pytest.raises(ValueError, match="finite and positive"):
        make(s)


def test_state_dict_holds_one_integer_weight():
    _, _, q = make(torch.ones(NUM_MODALITIES, 16), w_bits=4)
    state = q.state_dict()
    assert state["qweight.codes"].dtype == torch.uint8 and state["qweight.codes"].shape == (8, 8)  # 2 per byte
    assert int(q.qweight.int8().abs().max()) <= 8
    _, _, q8 = make(torch.ones(NUM_MODALITIES, 16), w_bits=8)
    assert q8.state_dict()["qweight.codes"].dtype == torch.int8 and q8.state_dict()["qweight.codes"].shape == (8, 16)
    assert set(state) == {"qweight.codes", "qweight.scale", "qweight.zero", "smooth", "bias"}


def test_fp16_patch_with_small_smoothing_factors_stays_finite():
    """``l1 / s`` overflows fp16 when s is near min_scale; the projection runs in float32 then."""
    from masquant.runtime.qlinear import LowRankPatch

    patch = LowRankPatch(torch.full((8, 2), 1000.0, dtype=torch.float16), torch.ones(2, 4, dtype=torch.float16))
    x = torch.full((3, 8), 1e-3, dtype=torch.float16)
    smooth = torch.full((8,), 0.01)
    out = patch(x, smooth)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.full((3, 4), 1600.0), rtol=1e-2)


def test_patch_factors_are_cached_until_a_tensor_changes():
    from masquant.runtime.qlinear import LowRankPatch

    patch = LowRankPatch(torch.randn(8, 2, dtype=torch.float16), torch.randn(2, 4, dtype=torch.float16))
    smooth, x = torch.rand(8) + 0.5, torch.randn(3, 8)
    first = patch.factors(x.dtype, smooth)
    assert patch.factors(x.dtype, smooth)[0] is first[0]  # folded once
    expected = (x / smooth) @ patch.l1.float() @ patch.l2.float()
    torch.testing.assert_close(patch(x, smooth), expected, rtol=1e-5, atol=1e-5)
    patch.load_state_dict({"l1": torch.zeros(8, 2), "l2": torch.ones(2, 4)})  # in place: same storage
    assert torch.equal(patch(x, smooth), torch.zeros(3, 4))
    smooth.mul_(2)
    assert patch.factors(x.dtype, smooth)[0] is not first[0]
