"""The quantized linear layer and the module swap.

``QuantLinear`` stores integer codes of ``Q(W * s_text)`` (``qweight``), a table of smoothing
vectors (one row per modality: activations of modality m are divided by row m), optional
low-rank patches for non-text modalities, and quantizes activations per token:

* text token:        ``y = Q_a(x / s_text) @ Wq^T + b``
* modality-m token:  ``y = Q_a(x / s_m) @ Wq^T + (x / s_m) @ L1_m @ L2_m + b``

``method="mas"`` (the MAS-only ablation) instead keeps one quantized weight per modality
(``modality_qweights``), which multiplies weight storage. This is the fake-quant runtime:
codes are dequantized and products run in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .modality import NUM_MODALITIES, Modality, ModalityRouter
from .primitives import IntGrid, QuantizedWeight, fake_quantize_per_token, quantize_weight


class IntWeight(nn.Module):
    """Integer weight codes ``[out, in]`` with per-row scales and zero points."""

    def __init__(self, out_features: int, in_features: int, grid: IntGrid, group_size: int):
        super().__init__()
        self.group_size = group_size
        rows = _scale_rows(out_features, in_features, group_size)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=grid.storage_dtype))
        self.register_buffer("scale", torch.ones(rows, 1))
        self.register_buffer("zero", torch.zeros(rows, 1))

    def set(self, qw: QuantizedWeight) -> None:
        self.codes.copy_(qw.codes)
        self.scale.copy_(qw.scale)
        self.zero.copy_(qw.zero)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return QuantizedWeight(self.codes, self.scale, self.zero, self.group_size).dequantize().to(dtype)


class LowRankPatch(nn.Module):
    """``x~ @ l1 @ l2`` with ``l1: [in, r]``, ``l2: [r, out]`` (stored in any float dtype,
    applied in the dtype of ``x~``)."""

    def __init__(self, l1: torch.Tensor, l2: torch.Tensor):
        super().__init__()
        self.register_buffer("l1", l1)
        self.register_buffer("l2", l2)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs @ self.l1.to(xs.dtype)) @ self.l2.to(xs.dtype)


class QuantLinear(nn.Module):
    """A decoder linear with one stored integer weight and per-modality routing."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantConfig,
                 router: ModalityRouter | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid = IntGrid(config.w_bits, config.w_symmetric)
        self.w_group_size = config.w_group_size
        self.a_bits = config.a_bits
        self.router = router
        self.compute_dtype = dtype
        self.patch_dtype = getattr(torch, config.patch_dtype)
        self.qweight = IntWeight(out_features, in_features, self.grid, config.w_group_size)
        self.modality_qweights = nn.ModuleDict()  # MAS-only: one more weight per non-text modality
        self.patches = nn.ModuleDict()  # MASQuant: low-rank patch per non-text modality
        self.register_buffer("smooth", torch.ones(NUM_MODALITIES, in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.uniform = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor, config: QuantConfig,
                    router: ModalityRouter | None, per_modality_weights: tuple[Modality, ...] = ()) -> QuantLinear:
        """Quantize ``linear`` with the smoothing table ``smooth`` (``[modalities, in]``).

        ``per_modality_weights`` lists the non-text modalities that get their own weight
        ``Q(W * s_m)`` (MAS-only).
        """
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config,
                    router, dtype=linear.weight.dtype).to(linear.weight.device)
        layer.set_smoothing(smooth.to(device=linear.weight.device, dtype=torch.float32))
        layer.qweight.set(layer.quantize_smoothed(linear.weight, Modality.TEXT))
        for modality in per_modality_weights:
            extra = IntWeight(linear.out_features, linear.in_features, layer.grid, config.w_group_size)
            extra.set(layer.quantize_smoothed(linear.weight, modality))
            layer.modality_qweights[modality.name.lower()] = extra.to(linear.weight.device)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def quantize_smoothed(self, weight: torch.Tensor, modality: Modality) -> QuantizedWeight:
        """RTN codes of ``W * s_m``."""
        return quantize_weight(weight.detach().float() * self.smooth[int(modality)], self.grid, self.w_group_size)

    def set_smoothing(self, smooth: torch.Tensor) -> None:
        if smooth.shape != self.smooth.shape:
            raise ValueError(f"smoothing table must be {tuple(self.smooth.shape)}, got {tuple(smooth.shape)}")
        if not torch.isfinite(smooth).all() or (smooth <= 0).any():
            raise ValueError("smoothing factors must be finite and positive")
        self.smooth.copy_(smooth)
        self.uniform = bool((smooth == smooth[:1]).all())

    def add_patch(self, modality: Modality, l1: torch.Tensor, l2: torch.Tensor) -> None:
        if modality == Modality.TEXT:
            raise ValueError("text tokens use the stored weight as is; patches are for other modalities")
        if l1.shape[0] != self.in_features or l2.shape[1] != self.out_features or l1.shape[1] != l2.shape[0]:
            raise ValueError(f"patch shapes {tuple(l1.shape)} @ {tuple(l2.shape)} do not fit "
                             f"[{self.in_features}, r] @ [r, {self.out_features}]")
        device = self.smooth.device
        self.patches[modality.name.lower()] = LowRankPatch(l1.to(device, self.patch_dtype),
                                                           l2.to(device, self.patch_dtype))

    def dequantized_weight(self, modality: Modality = Modality.TEXT) -> torch.Tensor:
        """A stored weight in floating point, ``[out, in]`` (the text one unless MAS-only)."""
        name = modality.name.lower()
        source = self.modality_qweights[name] if name in self.modality_qweights else self.qweight  # noqa: SIM401
        return source.dequantize(self.compute_dtype)

    @property
    def needs_ids(self) -> bool:
        return not self.uniform or bool(self.patches) or bool(self.modality_qweights)

    def smoothed_input(self, rows: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """``x / s[m]`` row by row."""
        if ids is None:
            return rows / self.smooth[0].to(rows.dtype)
        return rows / self.smooth.index_select(0, ids).to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.router.rows(x) if self.needs_ids else None
        xs = self.smoothed_input(x.reshape(-1, self.in_features), ids)
        xq = fake_quantize_per_token(xs, self.a_bits).to(self.compute_dtype)
        if self.modality_qweights:
            y = self._per_modality_matmul(xq, ids)
        else:
            y = F.linear(xq, self.dequantized_weight(), self.bias)
        for name, patch in self.patches.items():
            rows = (ids == int(Modality[name.upper()])).nonzero().squeeze(1)
            if rows.numel():
                y = y.index_add(0, rows, patch(xs.index_select(0, rows)).to(y.dtype))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _per_modality_matmul(self, xq: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        y = xq.new_empty(xq.shape[0], self.out_features)
        for modality in Modality:
            rows = (ids == int(modality)).nonzero().squeeze(1)
            if rows.numel():
                y[rows] = F.linear(xq[rows], self.dequantized_weight(modality), self.bias)
        return y

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of the stored weights and of the patches (at their stored dtypes)."""
        weights = [self.qweight, *self.modality_qweights.values()]
        w = sum(t.numel() * t.element_size() * (self.grid.bits / 8 if t is iw.codes else 1)
                for iw in weights for t in (iw.codes, iw.scale, iw.zero))
        p = sum(t.numel() * t.element_size() for t in self.patches.buffers())
        return {"weight": int(w), "patches": int(p)}

    def extra_repr(self) -> str:
        group = {0: "channel", -1: "tensor"}.get(self.w_group_size, f"group{self.w_group_size}")
        extras = "".join(f", +{n}_weight" for n in self.modality_qweights) + "".join(
            f", {n}_patch_r{p.l1.shape[1]}" for n, p in self.patches.items())
        return (f"in={self.in_features}, out={self.out_features}, w{self.grid.bits}"
                f"{'sym' if self.grid.symmetric else 'asym'}/{group}, a{self.a_bits}, "
                f"per_modality={not self.uniform}{extras}")


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
