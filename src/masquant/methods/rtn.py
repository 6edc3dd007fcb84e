"""Round-to-nearest: no smoothing, every table row is 1."""

from __future__ import annotations

from dataclasses import dataclass

from ..calibration.pipeline import LayerContext, LayerPlan
from .registry import Method, register


@dataclass
class RtnSettings:
    """Round-to-nearest has no settings of its own."""


def fit(ctx: LayerContext) -> LayerPlan:
    return LayerPlan({g.name: ctx.identity(g) for g in ctx.groups()})


register(Method("rtn", RtnSettings, fit, help="round-to-nearest, no smoothing"))
