"""The quantized linear layer and the module swap.

``QuantLinear`` stores integer codes of ``Q(W * s_text)`` (``qweight``), a table of smoothing
vectors (one row per modality: activations of modality m are divided by row m), optional
low-rank patches for non-text modalities, and quantizes activations per token:

* text token:        ``y = Q_a(x / s_text) @ Wq^T + b``
* modality-m token:  ``y = Q_a(x / s_m) @ Wq^T + (x / s_m) @ L1_m @ L2_m + b``

``method="mas"`` (the MAS-only ablation) instead keeps one quantized weight per modality
(``modality_qweights``), which multiplies weight storage.

Two runtimes (``QuantConfig.runtime``): ``"int"`` (default) quantizes each token's smoothed
activations to int8 codes and multiplies them with the int8 weight codes in int32
(``kernels.int_linear``); ``"fake"`` dequantizes both and multiplies in floating point (the
simulation used by research code). Both give the same result up to float rounding.
Weight-only settings (``a_bits=16``) multiply the dequantized weight in floating point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, native
from .config import QuantConfig
from .kernels import int_linear, quantize_tokens
from .modality import NUM_MODALITIES, Modality, ModalityRouter
from .primitives import IntGrid, QuantizedWeight, fake_quantize_per_token, quantize_weight
from .stored import IntWeight, LowRankPatch  # (also importable from here: pickles made before the split name it)

_MODALITY_INDEX = {m.name.lower(): int(m) for m in Modality}  # a patch's key -> its row of the table


def _patch_row(name: str) -> int:
    """The table row of the patch named ``name`` (a non-text modality)."""
    row = _MODALITY_INDEX.get(name)
    if row is None or row == int(Modality.TEXT):
        raise ValueError(f"a patch named {name!r}: patches are for the non-text modalities "
                         f"({', '.join(n for n in _MODALITY_INDEX if n != 'text')}); text tokens use the stored weight")
    return row


TEXT = int(Modality.TEXT)


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
        self.runtime = config.runtime
        self.qweight = IntWeight(out_features, in_features, self.grid, config.w_group_size)
        self.modality_qweights = nn.ModuleDict()  # MAS-only: one more weight per non-text modality
        self.patches = nn.ModuleDict()  # MASQuant: low-rank patch per non-text modality
        self.register_buffer("smooth", torch.ones(NUM_MODALITIES, in_features))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.uniform, self.unsmoothed = True, True
        self._flags_of: tuple[torch.Tensor, int] = (self.smooth, self.smooth._version)  # (what the flags describe)
        # the native call (``_native_forward``): possible for this layer's format, and its bound arguments
        self._native_ok = (self.grid.symmetric and self.w_group_size in (0, -1) and self.a_bits < 16
                           and dtype == torch.float32)
        self._plan: native.Plan | None = None

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
        """Flags derived from the smoothing table (after ``set_smoothing``, a state-dict load, or, on
        the next forward, any other change of the table: ``_sync_flags``)."""
        self.uniform = bool((self.smooth == self.smooth[:1]).all())
        self.unsmoothed = self.uniform and bool((self.smooth == 1).all())
        self._flags_of = (self.smooth, self.smooth._version)

    def _sync_flags(self) -> None:
        """Recompute the flags if the table changed since (edited in place, replaced, moved):
        both runtime paths read them, and must not read stale ones. Not inside ``torch.compile``
        (dynamo cannot guard on a version counter and would break the graph at every linear)."""
        if torch.compiler.is_compiling():
            return
        smooth, seen = self._buffers["smooth"], getattr(self, "_flags_of", None)
        if (seen is None or seen[0] is not smooth or seen[1] != smooth._version) and not smooth.is_meta:
            self._refresh()  # (a meta table has no values: the forward's device check reports it)

    def add_patch(self, modality: Modality, l1: torch.Tensor, l2: torch.Tensor) -> None:
        if modality == Modality.TEXT:
            raise ValueError("text tokens use the stored weight as is; patches are for other modalities")
        if l1.shape[0] != self.in_features or l2.shape[1] != self.out_features or l1.shape[1] != l2.shape[0]:
            raise ValueError(f"patch shapes {tuple(l1.shape)} @ {tuple(l2.shape)} do not fit "
                             f"[{self.in_features}, r] @ [r, {self.out_features}]")
        device = self.smooth.device
        self.patches[modality.name.lower()] = LowRankPatch(l1.to(device, self.patch_dtype),
                                                           l2.to(device, self.patch_dtype))

    def _weight(self, modality: Modality) -> IntWeight:
        name = modality.name.lower()
        return self.modality_qweights[name] if name in self.modality_qweights else self.qweight  # noqa: SIM401

    def dequantized_weight(self, modality: Modality = Modality.TEXT) -> torch.Tensor:
        """A stored weight in floating point, ``[out, in]`` (the text one unless MAS-only)."""
        return self._weight(modality).dequantize(self.compute_dtype)

    @property
    def needs_ids(self) -> bool:
        return not self.uniform or bool(self.patches) or bool(self.modality_qweights)

    def smoothed_input(self, rows: torch.Tensor, by_modality: dict[int, torch.Tensor | slice]) -> torch.Tensor:
        """``x / s[m]`` row by row: every row by the text vector, then the rows of other
        modalities (if their vectors differ) again from ``x`` (no gather of the whole table)."""
        if self.unsmoothed:
            return rows
        xs = rows / self.smooth[0].to(rows.dtype)
        if self.uniform:
            return xs
        for modality, idx in by_modality.items():
            if modality != int(Modality.TEXT):
                xs[idx] = rows[idx] / self.smooth[modality].to(rows.dtype)
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} takes {self.in_features} input features, got input of shape "
                             f"{tuple(x.shape)}")
        self._sync_flags()
        y = self._native_forward(x)
        if y is not None:
            return y
        rows = x.reshape(-1, self.in_features)
        ids, by_modality = self.router.runs(x) if self.needs_ids else (None, {})
        if self.modality_qweights:  # MAS-only: each modality's rows with its own weight
            y = rows.new_empty(rows.shape[0], self.out_features, dtype=self.compute_dtype)
            for modality, idx in by_modality.items():
                y[idx] = self._matmul(rows[idx], self.smooth[modality:modality + 1], None, {},
                                      self._weight(Modality(modality)))
        else:
            y = self._matmul(rows, self.smooth, ids, by_modality, self.qweight)
        self._add_patches(y, rows, by_modality)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _add_patches(self, y: torch.Tensor, rows: torch.Tensor, by_modality: dict[int, torch.Tensor | slice]) -> None:
        """Each patch's product added to the rows of its modality (no work for the others)."""
        for name, patch in self.patches.items():
            modality = _patch_row(name)
            idx = by_modality.get(modality)
            if isinstance(idx, slice):  # one run of rows: views, the product added in place
                patch.add_to(y[idx], rows[idx], self.smooth[modality])
            elif idx is not None:
                y.index_add_(0, idx, patch(rows.index_select(0, idx), self.smooth[modality]).to(y.dtype))

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The integer linear and its patches as one native call (``native.Plan``), or None for the
        general path: a float32 layer in the integer runtime with symmetric per-row (or per-tensor)
        weight codes and one weight for all modalities, few enough contiguous float32 rows on the CPU
        (``native.small``) that the eager kernels would run them (not the fused ones), and not inside
        ``torch.compile``. Bit-identical to the general path without patches; with them, equal to
        float32 rounding (the patch products' order; tested). Its point is the fixed cost of a dozen
        eager ops (and two tiny GEMMs per patch) per call, which sets the time of small layers."""
        if not (self._native_ok and self.runtime == "int" and x.dtype == torch.float32 and x.is_contiguous()
                and native.usable(x, self.out_features)) \
                or (x.numel() >= kernels.FUSE_MIN_ELEMENTS and kernels.use_fusion(x)):
            return None
        modules, buffers = self._modules, self._buffers  # (direct: nn.Module's __getattr__ costs a few us here)
        if modules["modality_qweights"]:
            return None
        patches, ids = modules["patches"], None
        if patches or not self.uniform:
            ids, by_modality = self.router.runs(x)
            if (self.uniform and not patches) or (len(by_modality) == 1 and TEXT in by_modality):
                ids = None  # one smoothing vector for every row (the text one), and no patch
        weight = modules["qweight"]
        codes, scale = weight._buffers["codes"], weight._buffers["scale"]
        smooth = None if self.unsmoothed and not patches else buffers["smooth"]  # (patches are picked by table row)
        folded = self._folded_patches(smooth) if ids is not None else None  # (only calls with ids read patches)
        plan = self._plan
        if plan is None or not plan.current(codes, scale, buffers["bias"], smooth, folded):
            if codes.device.type != "cpu":  # (a layer on another device than its input: the general path says so)
                return None
            plan = self._plan = native.Plan(weight.int8(), codes, scale, buffers["bias"], smooth, self.a_bits,
                                            weight.row_sums(), weight.native_codes(),
                                            patches=self._folded_patches(smooth) if folded is None else folded)
        return plan(x, ids)  # (any leading shape: the rows are contiguous)

    def _folded_patches(self, smooth: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each patch's float32 ``(l1 / s_m, l2)`` by table row (``LowRankPatch.factors``, cached)."""
        folded = {}
        for name, patch in self._modules["patches"]._modules.items():
            row = _patch_row(name)
            folded[row] = patch.factors(torch.float32, smooth[row])
        return folded

    def _smoothed(self, rows: torch.Tensor, smooth: torch.Tensor, ids: torch.Tensor | None,
                  by_modality: dict[int, torch.Tensor | slice]) -> torch.Tensor:
        if ids is not None or smooth.shape[0] == NUM_MODALITIES:  # the layer's own table
            return self.smoothed_input(rows, by_modality)
        return rows / smooth[0].to(rows.dtype)  # one modality's rows (MAS-only)

    def _matmul(self, rows: torch.Tensor, smooth: torch.Tensor, ids: torch.Tensor | None,
                by_modality: dict[int, torch.Tensor | slice], weight: IntWeight) -> torch.Tensor:
        """``Q_a(x / smooth[ids]) @ W^T + b``: int8 GEMM (integer runtime) or dequantized float
        matmul (fake). ``smooth`` is the table (or one row of it, with ``ids`` None)."""
        if self.runtime == "int" and self.a_bits < 16:
            fusable = self.grid.symmetric and self.w_group_size in (0, -1)
            if fusable and kernels.use_fusion(rows):
                return kernels.fused_linear(rows, self.a_bits, smooth, ids, weight.int8(), weight.scale, self.bias,
                                            self.compute_dtype)
            # smoothed in float32, as the fused kernel does (bf16 / fp16 models give the same codes either way)
            xs = self._smoothed(rows.float(), smooth, ids, by_modality)
            if fusable and native.usable(xs, self.out_features):  # a few tokens (decoding): one native call
                return native.int_linear(xs, self.a_bits, weight.int8(), weight.scale, self.bias,
                                         weight.row_sums(), weight.native_codes()).to(self.compute_dtype)
            codes, scale = quantize_tokens(xs, self.a_bits)
            zero = None if self.grid.symmetric else weight.zero
            return int_linear(codes, scale, weight.int8(), weight.scale, zero, self.w_group_size,
                              self.bias).to(self.compute_dtype)
        xs = self._smoothed(rows, smooth, ids, by_modality)
        xq = fake_quantize_per_token(xs, self.a_bits).to(self.compute_dtype)
        return F.linear(xq, weight.dequantize(self.compute_dtype), self.bias)

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
            _patch_row(name)  # (a layout with a text patch, or an unknown modality, is refused)
            layer.patches[name] = LowRankPatch(torch.zeros(layer.in_features, rank, dtype=layer.patch_dtype),
                                               torch.zeros(rank, layer.out_features, dtype=layer.patch_dtype))
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
