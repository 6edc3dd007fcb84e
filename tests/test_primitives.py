import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from masquant.runtime.primitives import (
    IntGrid,
    check_finite,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_per_token,
    fake_quantize_weight,
    quantize,
    quantize_weight,
    round_ste,
)

bits = st.integers(2, 8)
symmetric = st.booleans()
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
matrices = arrays("float32", st.tuples(st.integers(1, 6), st.integers(1, 16)), elements=finite)


@settings(max_examples=150, deadline=None)
@given(matrices, bits, symmetric)
def test_error_is_at_most_half_a_step(x, b, sym):
    x = torch.from_numpy(x)
    grid = IntGrid(b, sym)
    scale, zero = choose_qparams(x, grid)
    err = (dequantize(quantize(x, scale, zero, grid), scale, zero) - x).abs()
    # every value lies inside the chosen range, so only rounding error remains
    assert bool((err <= scale / 2 * (1 + 1e-4) + 1e-6).all())


@settings(max_examples=150, deadline=None)
@given(st.data(), bits, symmetric)
def test_representable_values_are_fixed_points(data, b, sym):
    grid = IntGrid(b, sym)
    rows, cols = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12))
    codes = torch.tensor(data.draw(st.lists(st.integers(grid.qmin, grid.qmax), min_size=rows * cols,
                                            max_size=rows * cols))).reshape(rows, cols)
    scale = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=rows, max_size=rows))).reshape(rows, 1)
    zero = torch.zeros(rows, 1) if sym else torch.tensor(
        data.draw(st.lists(st.integers(grid.qmin, grid.qmax), min_size=rows, max_size=rows))).float().reshape(rows, 1)
    values = dequantize(codes, scale, zero)
    assert torch.equal(quantize(values, scale, zero, grid).long(), codes)
    assert torch.allclose(fake_quantize(values, scale, zero, grid), values, rtol=1e-6, atol=0)


@pytest.mark.reliability(
    case='all-zero and constant rows (hypothesis)',
    expect='finite codes, zero rows stay zero, constants exact')
@given(bits, symmetric, st.integers(1, 10))
def test_zero_and_constant_rows(b, sym, n):
    grid = IntGrid(b, sym)
    for value in (0.0, 3.5, -2.25):
        x = torch.full((2, n), value)
        scale, zero = choose_qparams(x, grid)
        back = dequantize(quantize(x, scale, zero, grid), scale, zero)
        assert torch.allclose(back, x, rtol=1e-6, atol=0), (value, back)


@pytest.mark.reliability(
    case='NaN / Inf given to the quantizers',
    expect='ValueError, never NaN codes')
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_rejected_with_a_clear_error(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN|Inf"):
        quantize_weight(w, IntGrid(4))
    with pytest.raises(ValueError, match="activations contains"):
        check_finite(w, "activations")


@pytest.mark.reliability(
    case='bit-width out of range',
    expect='ValueError naming the range')
@pytest.mark.parametrize("b", [0, 1, 9, 16, 4.0])
def test_bits_out_of_range(b):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        IntGrid(b)


def test_grid_ranges():
    assert (IntGrid(4).qmin, IntGrid(4).qmax) == (-8, 7)
    assert (IntGrid(4, False).qmin, IntGrid(4, False).qmax) == (0, 15)
    assert IntGrid(8).storage_dtype == torch.int8 and IntGrid(8, False).storage_dtype == torch.uint8


@pytest.mark.parametrize("group_size", [0, -1, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_weight_granularities_round_trip_and_bound(group_size, sym):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    grid = IntGrid(4, sym)
    qw = quantize_weight(w, grid, group_size)
    rows = {0: 6, -1: 1, 4: 24, 8: 12}[group_size]
    assert qw.scale.shape == (rows, 1) and qw.codes.dtype == grid.storage_dtype
    err = (qw.dequantize() - w).abs()
    step = qw.scale.max()
    assert float(err.max()) <= float(step) / 2 + 1e-6
    assert torch.allclose(fake_quantize_weight(w, grid, group_size), qw.dequantize(), atol=1e-6)
    # finer granularity never hurts on the same weight
    if group_size in (4, 8):
        coarse = (quantize_weight(w, grid, 0).dequantize() - w).pow(2).sum()
        assert float(err.pow(2).sum()) <= float(coarse) + 1e-6


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide in_features=10"):
        quantize_weight(torch.randn(3, 10), IntGrid(4), 4)


def test_straight_through_estimator_passes_gradients():
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    round_ste(x * 3.3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.3))
    w = torch.randn(4, 8, requires_grad=True)
    fake_quantize_weight(w, IntGrid(4)).pow(2).sum().backward()
    assert w.grad is not None and bool((w.grad != 0).any())


@pytest.mark.parametrize("bits_", [4, 8])
def test_fused_symmetric_fake_quant_matches_the_composed_form_in_value_and_gradient(bits_):
    """The single-node fake quantization (MAS's hot path) against the op-by-op STE graph:
    same values, same gradients (abs-max ties split evenly, all-zero rows get only the STE)."""
    torch.manual_seed(0)
    x = torch.randn(9, 40)
    x[0, :3] = 5.0  # a three-way tie for the abs-max
    x[1, 4], x[1, 7] = -9.0, 9.0  # a tie with opposite signs
    x[2] = 0.0
    smooth = torch.rand(40) + 0.5
    smooth[:8] = 1.0  # the ties survive the smoothing
    grid = IntGrid(bits_)
    out_grad = torch.randn(9, 40)
    a, b = (smooth.clone().requires_grad_() for _ in range(2))
    xa, xb = (x.clone().requires_grad_() for _ in range(2))
    scale, zero = choose_qparams(xa * a, grid)
    reference = fake_quantize(xa * a, scale, zero, grid)
    fused = fake_quantize_weight(xb * b, grid)
    assert torch.equal(reference, fused)
    (reference * out_grad).sum().backward()
    (fused * out_grad).sum().backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    assert not torch.equal(xb.grad, out_grad * b)  # the scale's share is there, not only the STE
    assert torch.equal(fake_quantize_per_token(x, bits_), fake_quantize(x, *choose_qparams(x, grid), grid))


def test_per_token_activation_quantization():
    torch.manual_seed(0)
    x = torch.randn(5, 32) * torch.tensor([1.0, 10.0, 0.1, 100.0, 1e-3]).unsqueeze(1)
    y = fake_quantize_per_token(x, 8)
    step = x.abs().amax(1, keepdim=True) / 127
    assert bool(((y - x).abs() <= step / 2 + 1e-7).all())  # each token gets its own step
    assert fake_quantize_per_token(x, 16) is x
    assert float((fake_quantize_per_token(x, 4) - x).pow(2).sum()) > float((y - x).pow(2).sum())
