"""SmoothQuant: one vector per input group from all calibration tokens.

``s_i = max|X_i|^alpha / max|W_:,i|^(1-alpha)`` over the concatenated weights of the group,
kept as an activation pre-scale (not folded into the norm), so ``o_proj`` can be smoothed too.
Channels with no signal keep ``s = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration.pipeline import LayerContext, LayerPlan
from ..modality import NUM_MODALITIES
from .registry import Method, register

MIN_SCALE = 1e-5


@dataclass
class SmoothQuantSettings:
    alpha: float = field(default=0.5, metadata={"help": "SmoothQuant migration strength in [0, 1]"})

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")


@dataclass
class AlphaRecord:
    alpha: float


def smoothquant_vector(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """The SmoothQuant factor per input channel."""
    s = act_absmax.float().pow(alpha) / weight_absmax.float().pow(1 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s.clamp_min(MIN_SCALE))


def group_weight_absmax(ctx: LayerContext, group) -> torch.Tensor:
    """Per-input-channel max |W| over every linear of the group."""
    return torch.stack([lin.weight.detach().abs().amax(0).float() for lin in ctx.linears(group)]).amax(0)


def fit(ctx: LayerContext) -> LayerPlan:
    plan = LayerPlan({})
    for group in ctx.groups():
        if not ctx.smoothed(group):
            plan.smooth[group.name] = ctx.identity(group)
            continue
        alpha = ctx.settings.alpha
        s = smoothquant_vector(ctx.site(group).absmax(), group_weight_absmax(ctx, group), alpha)
        plan.smooth[group.name] = s.expand(NUM_MODALITIES, -1).clone()
        plan.records[group.name] = AlphaRecord(alpha)
    return plan


register(Method("smoothquant", SmoothQuantSettings, fit, help="one smoothing vector per input from all tokens"))
