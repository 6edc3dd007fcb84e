"""MBQ (Modality-Balanced Quantization, CVPR 2025): a modality-weighted scale search.

Per layer, the error on non-text tokens is weighted by the gradient ratio of that modality
to the answer text (``masquant.gradients``); text tokens that are not answers do not count.
One unified vector per group is searched on a grid of exponents: AWQ's ``mean|x|^a``
family for weight-only quantization (``a_bits=16``), SmoothQuant's
``max|X|^a / max|W|^(1-a)`` family for weight-activation quantization.
"""

from __future__ import annotations

from ..pipeline import LayerContext, LayerPlan
from . import register
from .awq import awq_vector, search_exponent
from .smoothquant import group_weight_absmax, smoothquant_vector


def candidate(ctx: LayerContext, group, exponent: float):
    site = ctx.site(group)
    if ctx.config.a_bits >= 16:
        return awq_vector(site.absmean(), exponent)
    return smoothquant_vector(site.absmax(), group_weight_absmax(ctx, group), exponent)


@register("mbq", needs_ratios=lambda config: True)
def mbq(ctx: LayerContext) -> LayerPlan:
    weights = ctx.prepared["ratios"][ctx.index]
    plan = LayerPlan({}, {"mbq": {"weights": {m.name.lower(): w for m, w in weights.items()}}})
    for group in ctx.groups():
        plan.smooth[group.name] = ctx.identity(group)
        if not ctx.smoothed(group):
            continue
        best, table, losses = search_exponent(
            ctx, group, lambda a, group=group: candidate(ctx, group, a),
            lambda smooth: ctx.block_mse(smooth, weights, answer_only=True))
        plan.smooth[group.name] = table
        plan.info[group.name] = {"alpha": best, "weighted_mse": losses[best], "rtn_weighted_mse": losses[0.0]}
    return plan

