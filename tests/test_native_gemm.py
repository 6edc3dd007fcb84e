"""The native kernel's blocked GEMM for many rows (``native.gemm``, where ``torch._int_mm`` is slow):
bit-identity with the eager kernels on each instruction set, when ``QuantLinear`` takes it, and the
switch that builds each instruction set's code."""

import pytest
import torch

import masquant
from masquant.runtime.kernels import int_linear, quantize_tokens

from conftest import needs_native, set_switch


@needs_native
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (1, 7, 3), (5, 33, 17), (6, 64, 16), (150, 1100, 40),
                                           (13, 1025, 33)])
@pytest.mark.parametrize("per_row", [True, False])
def test_the_blocked_gemm_is_bit_identical_to_the_eager_kernels(m, k, n, per_row, kernel_library):
    """The many-row GEMM (``native.gemm``, where ``torch._int_mm`` is slow) gives the eager kernels'
    exact values, activation quantization included: odd widths (a last pair of inputs padded, a
    partial panel of outputs, a partial tile of rows), more rows than a block (144) and more inputs
    than a block (1024), rows of zeros, exact halves (round to even), huge, tiny and infinite rows,
    extreme weight codes, per-row or per-tensor weight scales, with bias; W8 and W4 activation
    grids; its AVX2 assembly and its plain C++ loops alike."""
    from masquant.runtime import native

    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g) * torch.logspace(-20, 20, m)[:, None]
    x[0, : k // 2] = 0
    if m > 1:
        x[1] = 0
    if m > 2 and k >= 4:
        x[2] = 0
        x[2, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    if m > 3:
        x[3, 0] = float("inf")
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    weight[0] = -128
    if n > 1:
        weight[1] = 127
    weight_scale = torch.rand(n if per_row else 1, 1, generator=g) + 1e-3
    bias = torch.randn(n, generator=g) if per_row else None
    packed = native.pack_pairs(weight)
    for bits in (8, 6):
        expected = int_linear(*quantize_tokens(x, bits), weight, weight_scale, None, 0 if per_row else -1, bias)
        got = native.gemm(x, bits, packed, n, weight_scale, bias, lib=kernel_library)
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan())
    with pytest.raises(ValueError, match="does not pack a"):
        native.gemm(x, 8, packed, n + 16, weight_scale, bias, lib=kernel_library)


@needs_native
def test_many_rows_take_the_blocked_gemm_where_int_mm_is_slow(monkeypatch):
    """With ``torch._int_mm`` judged slow (``MASQUANT_INT_GEMM=float``), a symmetric layer's many
    rows go through the native GEMM with the integer path's exact values; grouped weights and
    ``MASQUANT_NATIVE=0`` keep the dequantized weights."""
    from masquant.bench import speed
    from masquant.runtime import dispatch, native

    torch.manual_seed(0)
    layer = speed.quant_linear(torch.nn.Linear(1024, 700), 8)
    x = torch.randn(2, 300, 1024)
    with torch.no_grad():
        integer = layer(x)
        set_switch(monkeypatch, "MASQUANT_INT_GEMM", "float")
        assert dispatch.kernel(layer, x) == "gemm"
        calls = []
        real = native.gemm
        monkeypatch.setattr(native, "gemm", lambda *a: calls.append(1) or real(*a))
        assert torch.equal(layer(x), integer) and calls and "pairs" in layer.qweight._derived
        set_switch(monkeypatch, "MASQUANT_NATIVE", "0")
        assert dispatch.kernel(layer, x) == "dequant"
        set_switch(monkeypatch, "MASQUANT_NATIVE", "auto")
        grouped = masquant.QuantLinear.from_linear(torch.nn.Linear(1024, 64), torch.ones(3, 1024),
                                                   masquant.QuantConfig(method="rtn", w_bits=4, w_group_size=128),
                                                   None)
        assert dispatch.kernel(grouped, x) == "dequant"


@needs_native
def test_the_native_switch_builds_each_instruction_set(monkeypatch):
    """``MASQUANT_NATIVE=avx2`` / ``portable`` build the code of those CPU classes (each its own
    cached library); the portable build has no blocked GEMM, so many rows keep the dequantized
    weights there."""
    from masquant.runtime import native

    flags = native._cpu_flags().split()
    if "avx2" in flags:
        set_switch(monkeypatch, "MASQUANT_NATIVE", "avx2")
        assert native.library().isa == 1 and native.gemm_ready()
        assert native.describe() == "AVX2 (MASQUANT_NATIVE=avx2)"
    set_switch(monkeypatch, "MASQUANT_NATIVE", "portable")
    assert native.library().isa == 0 and not native.gemm_ready()
    set_switch(monkeypatch, "MASQUANT_NATIVE", "sse")
    with pytest.raises(ValueError, match="MASQUANT_NATIVE must be auto, 0, avx2 or portable"):
        native.library()
