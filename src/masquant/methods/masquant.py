"""MASQuant = MAS + cross-modal compensation (CMC).

The learned per-modality vectors of ``mas.py``, but one stored weight ``Q(W * s_text)`` per
linear: the other modalities' tokens get low-rank patches fitted to ``W * s_m - Q(W * s_text)``
(``cmc.py``). With ``cmc_guard`` (not in the paper) a modality whose patched vector reconstructs
its outputs of a group's linears worse than the text vector goes through the text vector; with
``text_patch`` (not in the paper either) text tokens get a patch of their own rounding error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import distributed
from ..calibration.pipeline import LayerContext, LayerPlan
from ..modality import Modality
from ..runtime.qlinear import QuantLinear
from . import mas
from .cmc import PatchSettings, compensate_linear
from .registry import Method, register


@dataclass
class MasquantSettings(mas.MasSettings, PatchSettings):
    residual: str = field(default="fp", metadata={
        "help": "what the patch fits: fp (W*s_m - Q(W*s_text)) or quantized (Q(W*s_m) - Q(W*s_text))",
        "choices": ("fp", "quantized")})
    cmc_guard: bool = field(default=True, metadata={
        "help": "route a modality through the text vector where its patched vector does worse (not in the paper)"})
    text_patch: bool = field(default=False, metadata={
        "help": "also give text tokens a whitened patch of their own rounding error W*s_text - Q(W*s_text) "
                "(not in the paper)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_patch()
        if self.residual not in ("fp", "quantized"):
            raise ValueError(f"residual must be 'fp' or 'quantized', got {self.residual!r}")


def patch(ctx: LayerContext, qlinear: QuantLinear, linear: nn.Linear, path: str, report: bool) -> dict:
    """CMC patches for the non-text modalities of one quantized linear (``LayerPlan.patch``)."""
    return compensate_linear(qlinear, linear, ctx.stats[path], ctx.settings, where=f"layer {ctx.index} {path}: ",
                             cache=ctx.patches, report=report)


def fit(ctx: LayerContext) -> LayerPlan:
    tables, history = mas.fit_tables(ctx)
    guard = _guard(ctx, tables, mas.present_modalities(ctx)) if ctx.settings.cmc_guard else {}
    return LayerPlan(tables, patch=patch, records={"mas": mas.record(ctx, history, guard)})


def _guard(ctx: LayerContext, tables: dict[str, torch.Tensor], present: tuple[Modality, ...]) -> dict[str, list[str]]:
    """Per group and modality, keep the modality's own vector only if, with its patch, it
    reconstructs that modality's outputs of the group's linears better than the text vector does.

    A low-rank patch cannot always absorb ``W * (s_m - s_text)``; when it cannot (typically at
    8-bit weights, where the rounding error is small), routing the tokens through the text
    vector is the better model. One pass of the batches holding a non-text modality runs the
    layer quantized as the learned tables make it (every group with its patches); at each
    linear of a compared group, the rows of modality ``m`` go through both alternatives and are
    compared with the full-precision linear on the same input. Decided on the calibration
    tokens; modifies ``tables``.
    """
    pairs = [(group, m) for group in ctx.groups() for m in present
             if not torch.equal(tables[group.name][int(m)], tables[group.name][int(Modality.TEXT)])]
    if not pairs:
        return {}
    errors = [[0.0, 0.0] for _ in pairs]  # squared error: own vector, text vector
    holding = [i for i, s in enumerate(ctx.samples) if any(bool((s.ids[s.valid] == int(m)).any()) for m in present)]
    with ctx.quantized(LayerPlan(tables, patch=patch)) as originals:
        handles = []
        for slot, (group, m) in zip(errors, pairs, strict=True):
            candidate = tables[group.name].clone()
            candidate[int(m)] = tables[group.name][int(Modality.TEXT)]
            for path in group.linears:
                text_route = QuantLinear.from_linear(originals[path], candidate, ctx.config, ctx.router)
                patch(ctx, text_route, originals[path], path, report=False)
                hook = _compare(ctx, originals[path], text_route, m, slot)
                handles.append(ctx.layer.get_submodule(path).register_forward_hook(hook))
        try:
            for i in holding:
                ctx.run(i)
        finally:
            for handle in handles:
                handle.remove()
    totals = distributed.all_reduce_floats([e for pair in errors for e in pair])
    chosen: dict[str, list[str]] = {}
    for k, (group, m) in enumerate(pairs):
        if totals[2 * k + 1] < totals[2 * k]:
            tables[group.name] = tables[group.name].clone()
            tables[group.name][int(m)] = tables[group.name][int(Modality.TEXT)]
            chosen.setdefault(group.name, []).append(m.name.lower())
    return chosen


def _compare(ctx: LayerContext, fp: nn.Linear, text_route: nn.Module, m: Modality, slot: list[float]):
    """Forward hook: add the squared error of modality ``m``'s rows, as the layer's quantized
    linear computes them and as ``text_route`` would, against ``fp``, to ``slot``."""
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        keep = (ctx.tokens.ids.to(out.device) == int(m)) & ctx.tokens.valid.to(out.device)
        if not bool(keep.any()):
            return
        x = args[0]
        ref = F.linear(x.reshape(-1, x.shape[-1])[keep], fp.weight, fp.bias).double()
        for k, y in enumerate((out, text_route(x))):
            slot[k] += float((y.reshape(-1, y.shape[-1])[keep].double() - ref).pow(2).sum())
    return hook


register(Method("masquant", MasquantSettings, fit, second_moments=True, gradient_ratios=mas.auto_lambdas,
                text_moments=lambda settings: settings.text_patch,
                help="MAS vectors, one stored weight, low-rank patches for non-text tokens (the paper)"))
