"""The quantized linear layer and the module swap.

``QuantLinear`` stores integer weight codes of ``W * s_text`` with their scales, a table of
smoothing vectors (one row per modality: activations of modality m are divided by row m),
and quantizes activations per token. This is the fake-quant runtime: codes are dequantized
and the product runs in floating point, which is exact to the integer arithmetic up to
float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .modality import NUM_MODALITIES, Modality, ModalityRouter
from .primitives import IntGrid, QuantizedWeight, fake_quantize_per_token, quantize_weight


class QuantLinear(nn.Module):
    """``y = Q_a(x / s[m(token)]) @ dequant(Q(W * s_text))^T + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig,
                 router: ModalityRouter | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid = IntGrid(config.w_bits, config.w_symmetric)
        self.w_group_size = config.w_group_size
        self.a_bits = config.a_bits
        self.router = router
        self.compute_dtype = dtype
        n_rows = _scale_rows(out_features, in_features, config.w_group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=self.grid.storage_dtype))
        self.register_buffer("w_scale", torch.ones(n_rows, 1))
        self.register_buffer("w_zero", torch.zeros(n_rows, 1))
        self.register_buffer("smooth", torch.ones(NUM_MODALITIES, in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.uniform = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor, config: QuantConfig,
                    router: ModalityRouter | None) -> QuantLinear:
        """Quantize ``linear`` with the smoothing table ``smooth`` (``[modalities, in]``)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                    router, dtype=linear.weight.dtype).to(linear.weight.device)
        layer.set_smoothing(smooth.to(device=linear.weight.device, dtype=torch.float32))
        weight = linear.weight.detach().float() * layer.smooth[int(Modality.TEXT)]
        layer.set_weight(quantize_weight(weight, layer.grid, config.w_group_size))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def set_weight(self, qw: QuantizedWeight) -> None:
        self.qweight.copy_(qw.codes)
        self.w_scale.copy_(qw.scale)
        self.w_zero.copy_(qw.zero)

    def set_smoothing(self, smooth: torch.Tensor) -> None:
        if smooth.shape != self.smooth.shape:
            raise ValueError(f"smoothing table must be {tuple(self.smooth.shape)}, got {tuple(smooth.shape)}")
        if not torch.isfinite(smooth).all() or (smooth <= 0).any():
            raise ValueError("smoothing factors must be finite and positive")
        self.smooth.copy_(smooth)
        self.uniform = bool((smooth == smooth[:1]).all())

    def dequantized_weight(self) -> torch.Tensor:
        """The stored weight ``Q(W * s_text)`` in floating point, ``[out, in]``."""
        qw = QuantizedWeight(self.qweight, self.w_scale, self.w_zero, self.w_group_size)
        return qw.dequantize().to(self.compute_dtype)

    def smoothed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s[m]`` row by row, flattened to ``[tokens, in]``."""
        rows = x.reshape(-1, self.in_features)
        if self.uniform:
            return rows / self.smooth[0].to(rows.dtype)
        ids = self.router.rows(x)
        return rows / self.smooth.index_select(0, ids).to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = fake_quantize_per_token(self.smoothed_input(x), self.a_bits)
        y = F.linear(xs.to(self.compute_dtype), self.dequantized_weight(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        group = {0: "channel", -1: "tensor"}.get(self.w_group_size, f"group{self.w_group_size}")
        return (f"in={self.in_features}, out={self.out_features}, w{self.grid.bits}"
                f"{'sym' if self.grid.symmetric else 'asym'}/{group}, a{self.a_bits}, "
                f"per_modality={not self.uniform}")


def _scale_rows(out_features: int, in_features: int, group_size: int) -> int:
    if group_size == 0:
        return out_features
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features={in_features}")
    return out_features * (in_features // group_size)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` inside ``root``; return what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old
