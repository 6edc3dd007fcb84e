"""AWQ: per-channel ``s = mean|x|^a`` (normalised by sqrt(max*min)), ``a`` searched on a grid.

The search minimises the MSE of the decoder-layer output with only the searched group
quantized (weights, and activations when ``a_bits < 16``: the weight-activation variant).
``a = 0`` (no smoothing, i.e. RTN) is always on the grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..modality import NUM_MODALITIES
from ..pipeline import LayerContext, LayerPlan
from . import register


def awq_vector(act_absmean: torch.Tensor, exponent: float) -> torch.Tensor:
    s = act_absmean.float().clamp_min(1e-4).pow(exponent)
    return s / (s.max() * s.min()).sqrt()


def search_exponent(ctx: LayerContext, group, vector: Callable[[float], torch.Tensor],
                    loss: Callable[[dict[str, torch.Tensor]], float]) -> tuple[float, torch.Tensor, dict[float, float]]:
    """Try ``vector(a)`` for ``a`` in ``k / awq_grid``; return the best exponent, its table, all losses."""
    tables, losses = {}, {}
    for k in range(ctx.config.awq_grid):
        exponent = k / ctx.config.awq_grid
        tables[exponent] = vector(exponent).expand(NUM_MODALITIES, -1).clone()
        losses[exponent] = loss({group.name: tables[exponent]})
    best = min(losses, key=losses.__getitem__)
    return best, tables[best], losses


@register("awq")
def awq(ctx: LayerContext) -> LayerPlan:
    plan = LayerPlan({})
    for group in ctx.groups():
        plan.smooth[group.name] = ctx.identity(group)
        if not ctx.smoothed(group):
            continue
        mean = ctx.site(group).absmean()
        best, table, losses = search_exponent(ctx, group, lambda a, mean=mean: awq_vector(mean, a), ctx.block_mse)
        plan.smooth[group.name] = table
        plan.info[group.name] = {"alpha": best, "block_mse": losses[best], "rtn_block_mse": losses[0.0]}
    return plan
