"""AWQ: per-channel ``s = mean|x|^a`` (normalised by sqrt(max*min)), ``a`` searched on a grid.

The search minimises the MSE of the decoder-layer output with only the searched group
quantized (weights, and activations when ``a_bits < 16``: the weight-activation variant).
``a = 0`` (no smoothing, i.e. RTN) is always on the grid.
"""

from __future__ import annotations

import torch

from ..modality import NUM_MODALITIES
from ..pipeline import LayerContext, LayerPlan
from . import register


def awq_vector(act_absmean: torch.Tensor, exponent: float) -> torch.Tensor:
    s = act_absmean.float().clamp_min(1e-4).pow(exponent)
    return s / (s.max() * s.min()).sqrt()


@register("awq")
def awq(ctx: LayerContext) -> LayerPlan:
    plan = LayerPlan({})
    for group in ctx.groups():
        plan.smooth[group.name] = ctx.identity(group)
        if not ctx.smoothed(group):
            continue
        mean = ctx.site(group).absmean()
        losses = {}
        for k in range(ctx.config.awq_grid):
            exponent = k / ctx.config.awq_grid
            table = awq_vector(mean, exponent).expand(NUM_MODALITIES, -1).clone()
            losses[exponent] = (ctx.block_mse({group.name: table}), table)
        best = min(losses, key=lambda a: losses[a][0])
        plan.smooth[group.name] = losses[best][1]
        plan.info[group.name] = {"alpha": best, "block_mse": losses[best][0], "rtn_block_mse": losses[0.0][0]}
    return plan
