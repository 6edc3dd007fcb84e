"""SmoothQuant: one vector per input group from all calibration tokens.

``s_i = max|X_i|^alpha / max|W_:,i|^(1-alpha)`` over the concatenated weights of the group.
The vector is kept as an activation pre-scale (not folded into the norm), so every group,
including ``o_proj``, can be smoothed. Channels with no signal keep ``s = 1``.
"""

from __future__ import annotations

import torch

from ..modality import NUM_MODALITIES
from ..pipeline import LayerContext, LayerPlan
from . import register

MIN_SCALE = 1e-5


def smoothquant_vector(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """The SmoothQuant factor per input channel."""
    s = act_absmax.float().pow(alpha) / weight_absmax.float().pow(1 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(MIN_SCALE))


def group_weight_absmax(ctx: LayerContext, group) -> torch.Tensor:
    """Per-input-channel max |W| over every linear of the group."""
    return torch.stack([lin.weight.detach().abs().amax(0).float() for lin in ctx.linears(group)]).amax(0)


@register("smoothquant")
def smoothquant(ctx: LayerContext) -> LayerPlan:
    plan = LayerPlan({})
    for group in ctx.groups():
        if not ctx.smoothed(group):
            plan.smooth[group.name] = ctx.identity(group)
            continue
        s = smoothquant_vector(ctx.site(group).absmax(), group_weight_absmax(ctx, group), ctx.config.alpha)
        plan.smooth[group.name] = s.expand(NUM_MODALITIES, -1).clone()
        plan.info[group.name] = {"alpha": ctx.config.alpha}
    return plan
