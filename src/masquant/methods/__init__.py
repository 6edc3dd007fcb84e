"""Quantization methods. Each is a function ``LayerContext -> LayerPlan`` registered by name.

A new method is one module plus one ``@register`` line; the pipeline does not change.
"""

from __future__ import annotations

from collections.abc import Callable

METHODS: dict[str, Callable] = {}


def register(name: str, second_moments: bool = False,
             needs_ratios: Callable | None = None) -> Callable[[Callable], Callable]:
    """Register ``fn`` as method ``name``; ``second_moments`` asks the pipeline for X^T X;
    ``needs_ratios(config)`` says whether the method reads the gradient ratios
    (``masquant.gradients``; ``ctx.prepared["ratios"]``), which the pipeline then measures first."""

    def wrap(fn: Callable) -> Callable:
        fn.second_moments = second_moments
        fn.needs_ratios = needs_ratios or (lambda config: False)
        METHODS[name] = fn
        return fn

    return wrap


from . import awq, mas, mbq, rtn, smoothquant  # noqa: E402,F401  (registration)
