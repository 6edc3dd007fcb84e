"""MBQ (Modality-Balanced Quantization, CVPR 2025): a modality-weighted scale search.

Per layer, the error on non-text tokens is weighted by the gradient ratio of that modality
to the answer text (``masquant.calibration.gradients``); text tokens that are not answers do
not count. One unified vector per group is searched on a grid of exponents: AWQ's
``mean|x|^a`` family for weight-only quantization (``a_bits=16``), SmoothQuant's
``max|X|^a / max|W|^(1-a)`` family for weight-activation quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..calibration.pipeline import LayerContext, LayerPlan
from .awq import AwqSettings, awq_vector, search_exponent
from .registry import Method, register
from .smoothquant import group_weight_absmax, smoothquant_vector


@dataclass
class MbqSettings(AwqSettings):
    """MBQ searches AWQ's grid of exponents."""


@dataclass
class MbqRecord:
    alpha: float
    weighted_mse: float
    rtn_weighted_mse: float


@dataclass
class MbqWeights:
    weights: dict[str, float]  # the loss weight of each modality in this layer


def candidate(ctx: LayerContext, group, exponent: float):
    site = ctx.site(group)
    if ctx.config.a_bits >= 16:
        return awq_vector(site.absmean(), exponent)
    return smoothquant_vector(site.absmax(), group_weight_absmax(ctx, group), exponent)


def fit(ctx: LayerContext) -> LayerPlan:
    weights = ctx.ratios[ctx.index]
    plan = LayerPlan({}, records={"mbq": MbqWeights({m.name.lower(): w for m, w in weights.items()})})
    for group in ctx.groups():
        plan.smooth[group.name] = ctx.identity(group)
        if not ctx.smoothed(group):
            continue
        best, table, losses = search_exponent(
            ctx, lambda a, group=group: candidate(ctx, group, a), group,
            lambda smooth: ctx.block_mse(smooth, weights, answer_only=True))
        plan.smooth[group.name] = table
        plan.records[group.name] = MbqRecord(best, losses[best], losses[0.0])
    return plan


register(Method("mbq", MbqSettings, fit, help="one vector per group searched on the gradient-weighted error",
                gradient_ratios=lambda settings: True))
