"""Integer quantization primitives: small pure functions, no ``nn.Module``.

Conventions: a *grid* is a signed (symmetric) or unsigned (asymmetric) integer range of
2-8 bits. ``choose_qparams`` reduces over the last dimension, so every granularity (per
tensor, per output channel, per group, per token) is a reshape away. Fake quantization
rounds with a straight-through estimator so that gradients reach scales and inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass(frozen=True)
class IntGrid:
    """An integer grid: ``bits`` in [2, 8], symmetric (signed) or asymmetric (unsigned)."""

    bits: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8], got {self.bits!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise ``ValueError`` naming ``what`` if ``x`` holds NaN or Inf."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{what} contains {n_nan} NaN and {n_inf} Inf values; quantization needs finite "
            "inputs (check the model weights / calibration inputs for overflow, e.g. fp16)"
        )


def choose_qparams(x: torch.Tensor, grid: IntGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scale and zero point over the last dim (keepdim). Symmetric: ``scale = max|x| / qmax``, zero 0;
    asymmetric: the range always contains 0, so zeros and constant rows are exact."""
    x = x.float()
    if grid.symmetric:
        scale = x.abs().amax(-1, keepdim=True).clamp_min(EPS) / grid.qmax
        return scale, torch.zeros_like(scale)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp_min(EPS) / (grid.qmax - grid.qmin)
    zero = (grid.qmin - lo / scale).round().clamp(grid.qmin, grid.qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Integer codes of ``x`` (as ``grid.storage_dtype``)."""
    q = torch.clamp(torch.round(x.float() / scale) + zero, grid.qmin, grid.qmax)
    return q.to(grid.storage_dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 values of integer ``codes``."""
    return (codes.float() - zero) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with an identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Quantize-dequantize, differentiable through the STE; returns ``x``'s dtype."""
    q = torch.clamp(round_ste(x / scale) + zero, grid.qmin, grid.qmax)
    return ((q - zero) * scale).to(x.dtype)


def group_rows(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a ``[out, in]`` weight as rows that share one scale. ``group_size``: 0 = per output channel,
    -1 = per tensor, g > 0 = groups of g inputs."""
    out_features, in_features = w.shape
    if group_size == 0:
        return w
    if group_size == -1:
        return w.reshape(1, -1)
    if group_size < 0 or in_features % group_size:
        raise ValueError(
            f"group size {group_size} does not divide in_features={in_features}; "
            "use a divisor of the layer width, 0 (per channel) or -1 (per tensor)"
        )
    return w.reshape(out_features * (in_features // group_size), group_size)


@dataclass
class QuantizedWeight:
    """Integer codes ``[out, in]`` with scales/zeros of shape ``[rows, 1]`` (see ``group_rows``)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        rows = group_rows(self.codes, self.group_size)
        return dequantize(rows, self.scale, self.zero).reshape(self.codes.shape)


def quantize_weight(w: torch.Tensor, grid: IntGrid, group_size: int = 0) -> QuantizedWeight:
    """Round-to-nearest weight quantization at the given granularity."""
    check_finite(w, "weight")
    rows = group_rows(w, group_size)
    scale, zero = choose_qparams(rows, grid)
    codes = quantize(rows, scale, zero, grid).reshape(w.shape)
    return QuantizedWeight(codes, scale, zero, group_size)


class _SymmetricFakeQuant(torch.autograd.Function):
    """``fake_quantize`` on a symmetric grid with per-row scale ``max|x| / qmax`` as one autograd node (cheaper
    than the composed ops MAS runs every step). Same values and gradient up to summation order: STE for ``x``
    plus ``sum(g * (round(u) - u)) / qmax`` sent, signed, to the row's abs-max entries (split between ties)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qmax: int) -> torch.Tensor:
        magnitude = x.abs()
        amax = magnitude.amax(-1, keepdim=True)
        scale = amax.clamp_min(EPS) / qmax
        u = torch.div(x, scale)
        q = u.round().clamp_(-qmax - 1, qmax)
        if ctx.needs_input_grad[0]:
            # the abs-max entries as 1.0 (|x| / max|x| is 1 there and rounds below 1 elsewhere;
            # float arithmetic: faster than comparisons into bool tensors)
            at_max = magnitude.div_(amax.clamp_min(EPS)).floor_()
            # per row: d scale / d max|x| shared between ties; there sign(x) = x / max|x|
            coef = (amax >= EPS) / (qmax * amax.clamp_min(EPS) * at_max.sum(-1, keepdim=True).clamp_min(1))
            ctx.save_for_backward(x, torch.sub(q, u), at_max, coef)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rounding, at_max, coef = ctx.saved_tensors
        grad_scale = torch.linalg.vecdot(grad, rounding).unsqueeze(-1)
        return torch.addcmul(grad, x, at_max * (grad_scale * coef)), None


def _fake_quantize_rows(rows: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Fake quantization of float32 ``rows`` with per-row parameters."""
    if grid.symmetric:
        return _SymmetricFakeQuant.apply(rows, grid.qmax)
    scale, zero = choose_qparams(rows, grid)
    return fake_quantize(rows, scale, zero, grid)


def fake_quantize_weight(w: torch.Tensor, grid: IntGrid, group_size: int = 0) -> torch.Tensor:
    """Differentiable RTN quantize-dequantize of a weight (scales follow ``w``)."""
    rows = group_rows(w, group_size)
    return _fake_quantize_rows(rows.float(), grid).reshape(w.shape).to(w.dtype)


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric per-token (last dim) activation fake quantization; 16 = identity."""
    if bits >= 16:
        return x
    return _fake_quantize_rows(x.float(), IntGrid(bits, symmetric=True)).to(x.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal.clamp_min(1e-300) / noise))
