"""AWQ: per-channel ``s = mean|x|^a`` (normalised by sqrt(max*min)), ``a`` searched on a grid.

The search minimises the MSE of the decoder-layer output with only the searched group
quantized (weights, and activations when ``a_bits < 16``: the weight-activation variant).
``a = 0`` (no smoothing, i.e. RTN) is always on the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..calibration.pipeline import LayerContext, LayerPlan
from ..config import check_int
from ..modality import NUM_MODALITIES
from .registry import Method, register


@dataclass
class AwqSettings:
    awq_grid: int = field(default=20, metadata={"help": "exponents the scale search tries: k / awq_grid, k < awq_grid"})

    def __post_init__(self) -> None:
        check_int("awq_grid", self.awq_grid, 1, 1000)


@dataclass
class AwqRecord:
    alpha: float
    block_mse: float
    rtn_block_mse: float


def awq_vector(act_absmean: torch.Tensor, exponent: float) -> torch.Tensor:
    s = act_absmean.float().clamp_min(1e-4).pow(exponent)
    return s / (s.max() * s.min()).sqrt()


def search_exponent(ctx: LayerContext, vector: Callable[[float], torch.Tensor], group,
                    loss: Callable[[dict[str, torch.Tensor]], float]) -> tuple[float, torch.Tensor, dict[float, float]]:
    """Try ``vector(a)`` for ``a`` in ``k / awq_grid``; return the best exponent, its table, all losses."""
    tables, losses = {}, {}
    grid = ctx.settings.awq_grid
    for k in range(grid):
        exponent = k / grid
        tables[exponent] = vector(exponent).expand(NUM_MODALITIES, -1).clone()
        losses[exponent] = loss({group.name: tables[exponent]})
    best = min(losses, key=losses.__getitem__)
    return best, tables[best], losses


def fit(ctx: LayerContext) -> LayerPlan:
    plan = LayerPlan({})
    for group in ctx.groups():
        plan.smooth[group.name] = ctx.identity(group)
        if not ctx.smoothed(group):
            continue
        mean = ctx.site(group).absmean()
        best, table, losses = search_exponent(ctx, lambda a, mean=mean: awq_vector(mean, a), group, ctx.block_mse)
        plan.smooth[group.name] = table
        plan.records[group.name] = AwqRecord(best, losses[best], losses[0.0])
    return plan


register(Method("awq", AwqSettings, fit, help="activation-aware scales mean|x|^a, a searched per group"))
