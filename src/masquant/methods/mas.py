"""Modality-aware smoothing (MAS): one smoothing vector per modality, learned per layer.

Vectors start at the per-modality SmoothQuant rule ``s_m = sqrt(max|X_m| / max|W|)`` and are learned per
decoder layer with AdamW on the modality-weighted MAE of the layer output (weights ``l_m``), with ``Q(W * s_m)``
and activations fake-quantized (straight-through). ``method="mas"`` stores one weight per modality (ablation
upper bound); ``masquant`` stores one plus patches. A modality without tokens follows the text vector (warned).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..calibration import distributed
from ..calibration.pipeline import LayerContext, LayerPlan
from ..config import check_int
from ..modality import Modality
from ..runtime import kernels
from ..runtime.primitives import (
    IntGrid,
    choose_qparams,
    fake_quantize,
    fake_quantize_per_token,
    fake_quantize_weight,
    group_rows,
)
from ..runtime.qlinear import replace_module
from .registry import Method, register
from .smoothquant import group_weight_absmax, smoothquant_vector

log = logging.getLogger("masquant")


RECOMPUTE_MIN_ELEMENTS = 1 << 20  # weights at least this large are fake-quantized again in backward
COMPILE_MIN_ELEMENTS = 1 << 20  # weights / activations at least this large: compiled fake quantization


REFERENCE_LAMBDAS = {"text": 1.0, "vision": 0.15, "audio": 0.55}
MODALITY_NAMES = tuple(m.name.lower() for m in Modality)


def parse_lambdas(text: str) -> dict[str, float] | str:
    """``auto`` or ``vision=0.15,audio=0.55`` (the CLI's form of ``lambdas``)."""
    if text == "auto":
        return text
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"--lambdas takes 'auto' or modality=weight pairs such as vision=0.15,audio=0.55, "
                         f"got {text!r}") from None


@dataclass
class MasSettings:
    lambdas: dict[str, float] | str = field(default_factory=lambda: dict(REFERENCE_LAMBDAS), metadata={
        "help": "loss weight per modality (vision=0.15,audio=0.55) or auto (MBQ gradient ratios)",
        "parse": parse_lambdas})
    epochs: int = field(default=2, metadata={"help": "passes over the calibration set per layer"})
    mas_batch: int = field(default=1, metadata={
        "help": "calibration batches per AdamW step (>= the number of torchrun processes to spread MAS)"})
    lr: float = field(default=5e-2, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    min_scale: float = field(default=1e-2, metadata={"help": "entries of the vectors are kept >= this"})

    def __post_init__(self) -> None:
        if isinstance(self.lambdas, str):
            if self.lambdas != "auto":
                raise ValueError(f"lambdas must be a dict per modality or 'auto', got {self.lambdas!r}")
        else:
            unknown = sorted(set(self.lambdas) - set(MODALITY_NAMES))
            if unknown or any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0
                              for v in self.lambdas.values()):
                raise ValueError(f"lambdas must map {MODALITY_NAMES} to non-negative numbers, got {self.lambdas!r}")
        check_int("epochs", self.epochs, 0, 10_000)
        check_int("mas_batch", self.mas_batch, 1, 1_000_000)
        for name in ("lr", "min_scale"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0")

    def lambda_of(self, modality: str) -> float:
        """Fixed loss weight of a modality (text defaults to 1, others to the reference values)."""
        if isinstance(self.lambdas, str):
            raise ValueError("lambdas='auto' is resolved per layer from gradients, not from the config")
        return float(self.lambdas.get(modality, REFERENCE_LAMBDAS[modality]))


@dataclass
class MasRecord:
    loss_before_after: list[float]
    kept_learned: bool
    lambdas: dict[str, float]
    text_vector_for: dict[str, list[str]]  # per group, modalities routed through the text vector (CMC guard)


class _TrainableLinear(nn.Module):
    """Fake-quantized linear with a (learnable) per-modality smoothing table, MAS-only form."""

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor, ctx: LayerContext):
        super().__init__()
        self.linear, self.smooth, self.ctx = linear, smooth, ctx
        self.grid = IntGrid(ctx.config.w_bits, ctx.config.w_symmetric)
        self.weights: dict[Modality, torch.Tensor] = {}  # Q(W * s_m) of the current optimiser step
        self.fixed: dict[Modality, torch.Tensor] = {}  # the same for a table that is not learned

    def weight(self, m: Modality, present: list[Modality]) -> torch.Tensor:
        """``Q(W * s_m)``, once per optimiser step (once per fit for a fixed table). A small weight is quantized
        for every ``present`` modality in one stacked pass, since per-op fixed costs dominate small layers."""
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
        """Rows of ``x`` smoothed by their modality's vector and fake-quantized per token (float32), the modalities
        present (padding rows included), and with several, each one's rows and the gather back to row order."""
        routes = self.ctx.router.routes(x)  # (shared by every linear of the forward)
        rows = x.reshape(-1, self.linear.in_features).float()
        xq = _smoothed_tokens(rows, self.smooth, routes.ids, self.ctx.config.a_bits)
        present = [Modality(m) for m in sorted(routes.rows)]
        return xq, present, None if len(present) == 1 else routes.order()


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
    """Large tensors take the compiled forms below, where inductor fuses the elementwise passes of the fake
    quantization and its backward; small ones stay eager, not worth a compilation."""
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
    return torch.stack(rows).clamp_min(ctx.settings.min_scale)


def layer_lambdas(ctx: LayerContext) -> dict[Modality, float]:
    if ctx.settings.lambdas == "auto":
        ratios = ctx.ratios[ctx.index]
        return {m: ratios.get(m, 1.0) for m in Modality}
    return {m: ctx.settings.lambda_of(m.name.lower()) for m in Modality}


def learn_tables(ctx: LayerContext, tables: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Optimise the smoothing tables of the smoothed groups on the layer-output loss; returns the
    tables to use and the mean loss before and after (the learned tables are kept only if they
    do not raise it)."""
    params = {g.name: nn.Parameter(tables[g.name].clone()) for g in ctx.groups() if ctx.smoothed(g)}
    if not params or not ctx.settings.epochs:
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
    learned = {**tables, **{k: p.detach().clamp_min(ctx.settings.min_scale) for k, p in params.items()}}
    history = [before, _mean_loss(ctx, learned, weights)]
    if history[1] > history[0]:
        log.info("layer %d: learned smoothing raised the loss (%.3g -> %.3g); keeping the initial vectors",
                 ctx.index, *history)
        return tables, history
    return learned, history


def _optimise(ctx: LayerContext, params: list[nn.Parameter], weights: torch.Tensor,
              trainable: list[_TrainableLinear]) -> None:
    """AdamW for ``epochs`` over the samples, ``mas_batch`` samples (mean loss) per step. Data-parallel, each
    process backpropagates its own samples' share of a step and gradients are summed, so all take the same step."""
    config = ctx.settings
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
    with ctx.quantized(LayerPlan(tables, per_modality_weights=own)):
        losses = [float(_weighted_mae(ctx.run(i), ctx.target(i), s, weights)) for i, s in enumerate(ctx.samples)]
    total, count = distributed.all_reduce_floats([sum(losses), len(losses)])
    return total / count


def _weighted_mae(out: torch.Tensor, ref: torch.Tensor, sample, weights: torch.Tensor) -> torch.Tensor:
    err = (out - ref).abs().sum(-1)  # [batch, seq]
    w = weights.to(err.device)[sample.ids.to(err.device)]
    keep = sample.valid.to(err.device)
    return (err * w)[keep].sum() / (int(keep.sum()) * out.shape[-1])


def fit_tables(ctx: LayerContext) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The learned per-modality tables of every group (absent modalities follow the text
    vector) and the loss before and after learning."""
    tables = {g.name: initial_table(ctx, g) if ctx.smoothed(g) else ctx.identity(g) for g in ctx.groups()}
    _warn_missing(ctx)
    tables, history = learn_tables(ctx, tables)
    present = present_modalities(ctx)
    for table in tables.values():
        for m in set(Modality) - {Modality.TEXT, *present}:
            table[int(m)] = table[int(Modality.TEXT)]
    return tables, history


def present_modalities(ctx: LayerContext) -> tuple[Modality, ...]:
    """Non-text modalities with calibration tokens in this layer."""
    return tuple(m for m in ctx.modalities() if m != Modality.TEXT)


def record(ctx: LayerContext, history: list[float], text_vector_for: dict[str, list[str]]) -> MasRecord:
    lambdas = {m.name.lower(): v for m, v in layer_lambdas(ctx).items()}
    return MasRecord(history, len(history) == 2 and history[1] <= history[0], lambdas, text_vector_for)


def fit(ctx: LayerContext) -> LayerPlan:
    tables, history = fit_tables(ctx)
    return LayerPlan(tables, per_modality_weights=present_modalities(ctx), records={"mas": record(ctx, history, {})})


def _warn_missing(ctx: LayerContext) -> None:
    """Once per run (layer 0): modalities without tokens (too few: ``quantize`` warns for every method)."""
    if ctx.index:
        return
    expected = {Modality.TEXT, *ctx.router.table.values()}
    missing = sorted(expected - set(ctx.modalities()))
    if missing:
        log.warning("no calibration tokens for %s: those tokens will use the text smoothing vector and no patch",
                    ", ".join(m.name.lower() for m in missing))


def auto_lambdas(settings: MasSettings) -> bool:
    return settings.lambdas == "auto"


register(Method("mas", MasSettings, fit, help="MAS only: one learned vector and one stored weight per modality",
                gradient_ratios=auto_lambdas))
