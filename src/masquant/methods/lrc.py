"""``lrc``: SmoothQuant plus one low-rank error patch for every token (the same-budget baseline).

SmoothQuant's single vector ``s``, the stored weight ``Q(W * s)``, and one whitened low-rank patch of
``W * s - Q(W * s)`` fitted on the covariance of all calibration tokens (LoRC / EoRA-style rounding-error
compensation), applied to every token: the same rank and patch dtype as MASQuant, so the two compare at
(about) equal bytes. It asks whether MASQuant's gain on non-text tokens comes from spending the patch on
them, or would come from any patch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..calibration.pipeline import LayerContext, LayerPlan
from ..runtime.qlinear import QuantLinear
from . import smoothquant
from .cmc import PatchSettings, compensate_linear
from .registry import Method, register


@dataclass
class LrcSettings(smoothquant.SmoothQuantSettings, PatchSettings):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_patch()


def patch(ctx: LayerContext, qlinear: QuantLinear, linear: nn.Linear, path: str, report: bool) -> dict:
    """The shared patch of one quantized linear (``LayerPlan.patch``)."""
    return compensate_linear(qlinear, linear, ctx.stats[path], ctx.settings, where=f"layer {ctx.index} {path}: ",
                             cache=ctx.patches, report=report, shared=True)


def fit(ctx: LayerContext) -> LayerPlan:
    plan = smoothquant.fit(ctx)
    plan.patch = patch
    return plan


register(Method("lrc", LrcSettings, fit, second_moments=True, text_moments=lambda settings: True,
                help="SmoothQuant plus one whitened low-rank error patch for all tokens (same-budget baseline)"))
