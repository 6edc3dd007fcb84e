"""Round-to-nearest: no smoothing, every table row is 1."""

from __future__ import annotations

from ..pipeline import LayerContext, LayerPlan
from . import register


@register("rtn")
def rtn(ctx: LayerContext) -> LayerPlan:
    return LayerPlan({g.name: ctx.identity(g) for g in ctx.groups()})
