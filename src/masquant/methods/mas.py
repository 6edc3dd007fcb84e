"""Modality-aware smoothing (MAS), and MASQuant = MAS + cross-modal compensation.

Every smoothed linear group gets one vector per modality, initialised with the
per-modality SmoothQuant rule ``s_m = sqrt(max|X_m| / max|W|)`` and then learned per
decoder layer: AdamW on the modality-weighted MAE of the layer output,
``(sum_text |dY| + l_vision sum_vision |dY| + l_audio sum_audio |dY|) / #elements``,
with weights ``Q(W * s_m)`` and activations fake-quantized (straight-through rounding)
and every entry of ``s`` kept >= ``min_scale``.

``method="mas"`` stores one quantized weight per modality (the ablation upper bound);
``method="masquant"`` stores only ``Q(W * s_text)`` and adds low-rank patches
(``masquant.compensation``). A modality without calibration tokens falls back to the text
vector (its tokens are then treated exactly like text) and a warning is logged. With
``cmc_guard`` (not in the paper) a modality whose patched vector reconstructs its outputs
of a group's linears worse than the text vector is routed through the text vector (``_guard``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import distributed, kernels
from ..compensation import compensate_linear
from ..modality import Modality
from ..pipeline import LayerContext, LayerPlan
from ..primitives import (
    IntGrid,
    choose_qparams,
    fake_quantize,
    fake_quantize_per_token,
    fake_quantize_weight,
    group_rows,
)
from ..qlinear import QuantLinear, replace_module
from . import register
from .smoothquant import group_weight_absmax, smoothquant_vector

log = logging.getLogger("masquant")


RECOMPUTE_MIN_ELEMENTS = 1 << 20  # weights at least this large are fake-quantized again in backward
COMPILE_MIN_ELEMENTS = 1 << 20  # weights / activations at least this large: compiled fake quantization


class _TrainableLinear(nn.Module):
    """Fake-quantized linear with a (learnable) per-modality smoothing table, MAS-only form."""

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor, ctx: LayerContext):
        super().__init__()
        self.linear, self.smooth, self.ctx = linear, smooth, ctx
        self.grid = IntGrid(ctx.config.w_bits, ctx.config.w_symmetric)
        self.weights: dict[Modality, torch.Tensor] = {}  # Q(W * s_m) of the current optimiser step
        self.fixed: dict[Modality, torch.Tensor] = {}  # the same for a table that is not learned

    def weight(self, m: Modality, present: list[Modality]) -> torch.Tensor:
        """``Q(W * s_m)``, computed once per optimiser step (``weights`` is cleared after each);
        with a fixed table (a group that is not smoothed), once for the whole fit. A small weight
        is quantized for every modality ``present`` at once (one pass per elementwise op instead of
        one per modality: on small layers each op's fixed cost is most of its time)."""
        group_size = self.ctx.config.w_group_size
        if self.smooth.requires_grad and m not in self.weights and len(present) > 1 and group_size != -1 \
                and self.linear.weight.numel() < RECOMPUTE_MIN_ELEMENTS and not _compile(self.linear.weight):
            rows = self.smooth[[int(p) for p in present]]  # [modalities, in]
            stacked = (self.linear.weight.float()[None] * rows[:, None, :]).flatten(0, 1)  # [modalities * out, in]
            quantized = fake_quantize_weight(stacked, self.grid, group_size).unflatten(0, (len(present), -1))
            self.weights.update(zip(present, quantized.unbind(0), strict=True))
        if not self.smooth.requires_grad:
            if m not in self.fixed:
                with torch.no_grad():
                    self.fixed[m] = _smoothed_fake_quant(self.linear.weight, self.smooth[int(m)], self.grid,
                                                         self.ctx.config.w_group_size)
            return self.fixed[m]
        if m not in self.weights:
            args = (self.linear.weight, self.smooth[int(m)], self.grid, self.ctx.config.w_group_size)
            if self.linear.weight.numel() >= RECOMPUTE_MIN_ELEMENTS and not _compile(self.linear.weight):
                # recomputed in backward instead of keeping three weight-sized tensors per modality alive
                # (the compiled form keeps none: its backward recomputes the elementwise passes)
                self.weights[m] = checkpoint(_smoothed_fake_quant, *args, use_reentrant=False)
            else:  # small: the memory does not matter, the recomputation's time does
                self.weights[m] = _smoothed_fake_quant(*args)
        return self.weights[m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, present, order = self._tokens(x)
        bias = None if self.linear.bias is None else self.linear.bias.float()
        if order is None:
            out = F.linear(xq, self.weight(present[0], present), bias)
        else:  # each modality's rows by its own weight, then back into row order (one gather)
            idx, back = order
            parts = [F.linear(xq.index_select(0, i), self.weight(m, present), bias)
                     for m, i in zip(present, idx, strict=True)]
            out = torch.cat(parts).index_select(0, back)
        return out.reshape(*x.shape[:-1], self.linear.out_features).to(x.dtype)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Modality], tuple | None]:
        """Every row of ``x`` by its own modality's vector, then per-token codes (one pass over all
        rows, float32 also for bf16 / fp16 models); the modalities present (padding rows included:
        every row gets an output); and, with several, each one's rows and the gather that puts
        their outputs back in row order.

        (Computed once for the linears that share an input, q/k/v or gate/up, this saved 5-10 % of
        a step, but their gradients then sum in another order: the learned tables move at rounding
        level and the reference metrics by a few tenths of a point, so the published results would
        no longer reproduce. Not done.)"""
        ids, runs = self.ctx.router.runs(x)  # (shared by every linear of the forward)
        rows = x.reshape(-1, self.linear.in_features).float()
        xq = _smoothed_tokens(rows, self.smooth, ids, self.ctx.config.a_bits)
        present = [Modality(m) for m in sorted(runs)]
        if len(present) == 1:
            return xq, present, None
        idx = [runs[int(m)] for m in present]
        idx = [torch.arange(i.start, i.stop, device=rows.device) if isinstance(i, slice) else i for i in idx]
        cat = torch.cat(idx)
        back = torch.empty_like(cat).scatter_(0, cat, torch.arange(cat.numel(), device=rows.device))
        return xq, present, (idx, back)


def _smoothed_fake_quant(weight: torch.Tensor, smooth: torch.Tensor, grid: IntGrid, group_size: int) -> torch.Tensor:
    """``Q(W * s)``, differentiable in ``s``."""
    if _compile(weight):  # (detached: dynamo compiles parameters for their exact shape)
        return kernels.compiled(_weight_body, weight.device, weight.detach(), smooth, grid, group_size)
    return fake_quantize_weight(weight.float() * smooth, grid, group_size)


def _smoothed_tokens(rows: torch.Tensor, smooth: torch.Tensor, ids: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row divided by its modality's vector, then fake-quantized per token (differentiable)."""
    if bits < 16 and _compile(rows):
        return kernels.compiled(_tokens_body, rows.device, rows, smooth, ids, IntGrid(bits, symmetric=True))
    return fake_quantize_per_token(rows / smooth.index_select(0, ids), bits)


def _compile(x: torch.Tensor) -> bool:
    """Large tensors take the compiled forms below: inductor fuses the ~10 elementwise passes of
    the fake quantization and of its backward, which dominate a step otherwise (2.1-2.5x faster
    from 1024x1024 up on a 2-core CPU); small ones stay eager, not worth a compilation."""
    return x.numel() >= COMPILE_MIN_ELEMENTS and kernels.fusion_available(x.device)


# The compiled forms: the op-by-op straight-through fake quantization of ``primitives`` (the values
# and gradient of its single-node ``_SymmetricFakeQuant``, up to summation order), for inductor to fuse.
def _rows_body(rows: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    return fake_quantize(rows, *choose_qparams(rows, grid), grid)


def _weight_body(weight, smooth, grid, group_size):
    smoothed = weight.float() * smooth
    return _rows_body(group_rows(smoothed, group_size), grid).reshape(smoothed.shape)


def _tokens_body(rows, smooth, ids, grid):
    return _rows_body(rows / smooth.index_select(0, ids), grid)


def initial_table(ctx: LayerContext, group) -> torch.Tensor:
    """Per-modality SmoothQuant (alpha 0.5) vectors; absent modalities copy the text row."""
    site, wmax = ctx.site(group), group_weight_absmax(ctx, group)
    present = sorted(site.per_modality)
    base = Modality.TEXT if Modality.TEXT in present else present[0]
    rows = [smoothquant_vector(site.absmax(m if m in present else base), wmax, 0.5) for m in Modality]
    return torch.stack(rows).clamp_min(ctx.config.min_scale)


def layer_lambdas(ctx: LayerContext) -> dict[Modality, float]:
    if ctx.config.lambdas == "auto":
        ratios = ctx.prepared["ratios"][ctx.index]
        return {m: ratios.get(m, 1.0) for m in Modality}
    return {m: ctx.config.lambda_of(m.name.lower()) for m in Modality}


def learn_tables(ctx: LayerContext, tables: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Optimise the smoothing tables of the smoothed groups on the layer-output loss; returns the
    tables to use and the mean loss before and after (the learned tables are kept only if they
    do not raise it)."""
    params = {g.name: nn.Parameter(tables[g.name].clone()) for g in ctx.groups() if ctx.smoothed(g)}
    if not params or not ctx.config.epochs:
        return tables, []
    weights = torch.tensor([layer_lambdas(ctx)[m] for m in Modality], dtype=torch.float32)
    before = _mean_loss(ctx, tables, weights)
    swapped, frozen = {}, [p for p in ctx.layer.parameters() if p.requires_grad]
    for group in ctx.groups():
        table = params.get(group.name, tables[group.name])
        for path, linear in zip(group.linears, ctx.linears(group), strict=True):
            swapped[path] = replace_module(ctx.layer, path, _TrainableLinear(linear, table, ctx))
    trainable = [ctx.layer.get_submodule(p) for p in swapped]
    try:
        for p in frozen:
            p.requires_grad_(False)
        _optimise(ctx, list(params.values()), weights, trainable)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for path, linear in swapped.items():
            replace_module(ctx.layer, path, linear)
    learned = {**tables, **{k: p.detach().clamp_min(ctx.config.min_scale) for k, p in params.items()}}
    history = [before, _mean_loss(ctx, learned, weights)]
    if history[1] > history[0]:
        log.info("layer %d: learned smoothing raised the loss (%.3g -> %.3g); keeping the initial vectors",
                 ctx.index, *history)
        return tables, history
    return learned, history


def _optimise(ctx: LayerContext, params: list[nn.Parameter], weights: torch.Tensor,
              trainable: list[_TrainableLinear]) -> None:
    """AdamW for ``epochs`` over the samples, ``mas_batch`` samples (mean loss) per step.

    Data-parallel, the steps run over the batches of the whole calibration set: each process
    backpropagates the part of a step's loss its own samples make (none: no backward), the
    gradients are summed over the processes, and every process takes the same step."""
    config = ctx.config
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = ctx.sample_count()

    def new_step() -> None:
        for module in trainable:
            module.weights.clear()

    with torch.enable_grad():
        for _ in range(config.epochs):
            for first in range(0, total, config.mas_batch):
                size = min(config.mas_batch, total - first)
                batch = [i for i, s in enumerate(ctx.samples) if first <= s.index < first + size]
                new_step()
                opt.zero_grad(set_to_none=True)
                if batch:
                    loss = sum(_weighted_mae(ctx.run(i), ctx.target(i), ctx.samples[i], weights) for i in batch)
                    (loss / size).backward()
                distributed.all_reduce_grads(params)
                opt.step()
                with torch.no_grad():
                    for p in params:
                        p.clamp_(min=config.min_scale)
    new_step()


@torch.no_grad()
def _mean_loss(ctx: LayerContext, tables: dict[str, torch.Tensor], weights: torch.Tensor) -> float:
    """The MAS loss of ``tables`` (one quantized weight per modality, run by the configured
    runtime: integer kernels by default), averaged over the calibration batches of every process."""
    own = tuple(m for m in ctx.modalities() if m != Modality.TEXT)
    with ctx.quantized(tables, per_modality_weights=own):
        losses = [float(_weighted_mae(ctx.run(i), ctx.target(i), s, weights)) for i, s in enumerate(ctx.samples)]
    total, count = distributed.all_reduce_floats([sum(losses), len(losses)])
    return total / count


def _weighted_mae(out: torch.Tensor, ref: torch.Tensor, sample, weights: torch.Tensor) -> torch.Tensor:
    err = (out - ref).abs().sum(-1)  # [batch, seq]
    w = weights.to(err.device)[sample.ids.to(err.device)]
    keep = sample.valid.to(err.device)
    return (err * w)[keep].sum() / (int(keep.sum()) * out.shape[-1])


def _fit(ctx: LayerContext, compensate: bool) -> LayerPlan:
    tables = {g.name: initial_table(ctx, g) if ctx.smoothed(g) else ctx.identity(g) for g in ctx.groups()}
    _warn_missing(ctx)
    tables, history = learn_tables(ctx, tables)
    present = tuple(m for m in ctx.modalities() if m != Modality.TEXT)
    for table in tables.values():  # absent modalities follow the (learned) text vector
        for m in set(Modality) - {Modality.TEXT, *present}:
            table[int(m)] = table[int(Modality.TEXT)]
    guard = _guard(ctx, tables, present) if compensate and ctx.config.cmc_guard else {}
    lambdas = {m.name.lower(): v for m, v in layer_lambdas(ctx).items()}
    info = {"mas": {"loss_before_after": history, "kept_learned": len(history) == 2 and history[1] <= history[0],
                    "lambdas": lambdas, "text_vector_for": guard}}
    return LayerPlan(tables, info, per_modality_weights=() if compensate else present, compensate=compensate)


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
    with ctx.quantized(tables, compensate=True) as originals:
        handles = []
        for slot, (group, m) in zip(errors, pairs, strict=True):
            candidate = tables[group.name].clone()
            candidate[int(m)] = tables[group.name][int(Modality.TEXT)]
            for path in group.linears:
                text_route = QuantLinear.from_linear(originals[path], candidate, ctx.config, ctx.router)
                compensate_linear(text_route, originals[path], ctx.stats[path], ctx.config,
                                  where=f"layer {ctx.index} {path}: ", cache=ctx.patches, report=False)
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


def _warn_missing(ctx: LayerContext) -> None:
    """Once per run (layer 0): modalities without tokens, and modalities with too few for CMC."""
    if ctx.index:
        return
    expected = {Modality.TEXT, *ctx.router.table.values()}
    missing = sorted(expected - set(ctx.modalities()))
    if missing:
        log.warning("no calibration tokens for %s: those tokens will use the text smoothing vector and no patch",
                    ", ".join(m.name.lower() for m in missing))
    site = ctx.site(ctx.groups()[0])
    for m, stats in site.per_modality.items():
        if m != Modality.TEXT and stats.count < 2 * ctx.linears(ctx.groups()[0])[0].in_features:
            log.warning("only %d %s calibration tokens for %d input channels: the whitened patches may overfit "
                        "the calibration set; add samples or raise `ridge`", stats.count, m.name.lower(),
                        ctx.linears(ctx.groups()[0])[0].in_features)


def _auto_lambdas(config) -> bool:
    return config.lambdas == "auto"


@register("mas", needs_ratios=_auto_lambdas)
def mas(ctx: LayerContext) -> LayerPlan:
    return _fit(ctx, compensate=False)


@register("masquant", second_moments=True, needs_ratios=_auto_lambdas)
def masquant(ctx: LayerContext) -> LayerPlan:
    return _fit(ctx, compensate=True)

