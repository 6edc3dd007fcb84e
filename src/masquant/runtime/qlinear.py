"""The quantized linear layer and the module swap.

``QuantLinear`` stores integer codes of ``Q(W * s_text)`` (``qweight``), a table of smoothing
vectors (one row per modality: activations of modality m are divided by row m), optional
low-rank patches, and quantizes activations per token:

* text token:        ``y = Q_a(x / s_text) @ Wq^T + b``
* modality-m token:  ``y = Q_a(x / s_m) @ Wq^T + (x / s_m) @ L1_m @ L2_m + b``

MASQuant patches the non-text modalities (and text too with ``text_patch``); the same-budget
baseline ``lrc`` stores one patch named ``"all"`` that every token gets.

``method="mas"`` (the MAS-only ablation) instead keeps one quantized weight per modality
(``modality_qweights``), which multiplies weight storage.

The layer holds data and routing; ``dispatch.forward`` picks the kernels that run it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..memo import Derived
from ..modality import NUM_MODALITIES, Modality, ModalityRouter, Routes
from . import dispatch
from .primitives import IntGrid, QuantizedWeight, quantize_weight
from .stored import ALL, IntWeight, LowRankPatch, patch_row, patch_rows


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
        self.runtime = config.runtime
        self.rounding = "rtn"  # how the stored codes were rounded (calibration sets "gptq"; patch caches key on it)
        self.qweight = IntWeight(out_features, in_features, self.grid, config.w_group_size)
        self.modality_qweights = nn.ModuleDict()  # MAS-only: one more weight per non-text modality
        self.patches = nn.ModuleDict()  # low-rank patches by modality name, or one for "all" tokens
        self.register_buffer("smooth", torch.ones(NUM_MODALITIES, in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.uniform, self.unsmoothed = True, True  # what the table is (kept current by ``sync_flags``)
        self._flags: Derived = Derived()
        self._native: Derived = Derived()  # the bound native call (``dispatch``)

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
        self._refresh()

    def _refresh(self) -> None:
        self._flags.clear()
        self.sync_flags()

    def sync_flags(self) -> None:
        """``uniform`` (one vector for all modalities) and ``unsmoothed`` (all ones), recomputed when
        the table changed (edited in place, replaced, moved). Not inside ``torch.compile``, which
        cannot guard on a version counter (it would break the graph at every linear)."""
        smooth = self._buffers["smooth"]
        if torch.compiler.is_compiling() or smooth.is_meta:  # (a meta table: the forward's device check says so)
            return
        self._flags.get((smooth,), self._set_flags)  # (sets them only when the table changed)

    def _set_flags(self) -> None:
        self.uniform = bool((self.smooth == self.smooth[:1]).all())
        self.unsmoothed = self.uniform and bool((self.smooth == 1).all())

    @property
    def _plan(self):
        """The bound native call, if one was made (for inspection)."""
        return self._native.peek()

    def add_patch(self, modality: Modality | str, l1: torch.Tensor, l2: torch.Tensor,
                  dtype: torch.dtype = torch.float16) -> None:
        """Store ``l1 @ l2`` (``[in, r] @ [r, out]``) in ``dtype`` for ``modality``'s rows (``"all"``: every row;
        a layer has either one such patch or patches by modality)."""
        name = modality if isinstance(modality, str) else modality.name.lower()
        patch_row(name)
        if self.patches and (name == ALL) != (ALL in self.patches):
            raise ValueError("a layer has either one patch for all tokens or patches by modality, not both")
        if l1.shape[0] != self.in_features or l2.shape[1] != self.out_features or l1.shape[1] != l2.shape[0]:
            raise ValueError(f"patch shapes {tuple(l1.shape)} @ {tuple(l2.shape)} do not fit "
                             f"[{self.in_features}, r] @ [r, {self.out_features}]")
        device = self.smooth.device
        self.patches[name] = LowRankPatch(l1.to(device, dtype), l2.to(device, dtype))

    def weight_of(self, modality: Modality) -> IntWeight:
        """The stored weight that ``modality``'s rows use (their own one with MAS-only)."""
        name = modality.name.lower()
        return self.modality_qweights[name] if name in self.modality_qweights else self.qweight  # noqa: SIM401

    def dequantized_weight(self, modality: Modality = Modality.TEXT) -> torch.Tensor:
        """A stored weight in floating point, ``[out, in]`` (the text one unless MAS-only)."""
        return self.weight_of(modality).dequantize(self.compute_dtype)

    @property
    def needs_ids(self) -> bool:
        """Whether rows must be told apart by modality (a shared ``"all"`` patch on one vector does not)."""
        modules = self._modules  # (direct: read on every forward, nn.Module's __getattr__ costs a few us)
        patches = modules["patches"]._modules
        return not self.uniform or bool(modules["modality_qweights"]) or bool(patches.keys() - {ALL})

    @property
    def patches_text(self) -> bool:
        """Whether text rows get a patch (``text_patch``, or one for all tokens)."""
        patches = self._modules["patches"]._modules
        return "text" in patches or ALL in patches

    def smoothed_input(self, rows: torch.Tensor, routes: Routes | None) -> torch.Tensor:
        """``x / s[m]`` row by row: every row by the text vector, then the rows of other
        modalities (if their vectors differ) again from ``x`` (no gather of the whole table)."""
        if self.unsmoothed:
            return rows
        xs = rows / self.smooth[0].to(rows.dtype)
        if self.uniform:
            return xs
        for modality, idx in routes.rows.items():
            if modality != int(Modality.TEXT):
                xs[idx] = rows[idx] / self.smooth[modality].to(rows.dtype)
        return xs

    def folded_patches(self, smooth: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each patch's float32 ``(l1 / s_m, l2)`` by table row (``LowRankPatch.factors``, cached); a patch for all
        rows is folded once per distinct vector."""
        folded = {}
        for name, patch in self._modules["patches"]._modules.items():
            for row in patch_rows(name):
                folded[row] = patch.factors(torch.float32, smooth, 0 if self.uniform else row)
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.forward(self, x)

    def layout(self) -> dict:
        """What a checkpoint needs to rebuild this layer's empty buffers (``from_layout``)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "dtype": str(self.compute_dtype).removeprefix("torch."),
                "patches": {name: int(p.l1.shape[1]) for name, p in self.patches.items()},
                "modality_weights": list(self.modality_qweights)}

    @classmethod
    def from_layout(cls, layout: dict, config: QuantConfig, router: ModalityRouter | None) -> QuantLinear:
        """An empty layer shaped as ``layout`` describes; ``load_state_dict`` fills it."""
        layer = cls(layout["in_features"], layout["out_features"], layout["bias"], config, router,
                    dtype=getattr(torch, layout["dtype"]))
        for name in layout["modality_weights"]:
            layer.modality_qweights[name] = IntWeight(layer.out_features, layer.in_features, layer.grid,
                                                      layer.w_group_size)
        for name, rank in layout["patches"].items():
            patch_row(name)  # (an unknown name is refused)
            dtype = getattr(torch, config.patch_dtype)  # (a model with patches was made by a method that has one)
            layer.patches[name] = LowRankPatch(torch.zeros(layer.in_features, rank, dtype=dtype),
                                               torch.zeros(rank, layer.out_features, dtype=dtype))
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of the stored weights and of the patches (at their stored dtypes)."""
        w = sum(iw.storage_bytes() for iw in [self.qweight, *self.modality_qweights.values()])
        p = sum(t.numel() * t.element_size() for t in self.patches.buffers())
        return {"weight": int(w), "patches": int(p)}

    def extra_repr(self) -> str:
        group = {0: "channel", -1: "tensor"}.get(self.w_group_size, f"group{self.w_group_size}")
        extras = "".join(f", +{n}_weight" for n in self.modality_qweights) + "".join(
            f", {n}_patch_r{p.l1.shape[1]}" for n, p in self.patches.items())
        return (f"in={self.in_features}, out={self.out_features}, w{self.grid.bits}"
                f"{'sym' if self.grid.symmetric else 'asym'}/{group}, a{self.a_bits}, "
                f"per_modality={not self.uniform}{extras}")


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` inside ``root``; return what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def set_runtime(model: nn.Module, runtime: str) -> int:
    """Switch every ``QuantLinear`` of ``model`` to ``"int"`` or ``"fake"``; returns how many."""
    if runtime not in ("int", "fake"):
        raise ValueError(f"runtime must be 'int' or 'fake', got {runtime!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.runtime = runtime
    return len(layers)
