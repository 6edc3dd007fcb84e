"""The method contract: one ``Method`` record per method, registered by name.

A method is ``fit(ctx) -> LayerPlan`` for one decoder layer (``masquant.calibration.pipeline``)
plus its own settings dataclass and what it needs measured first. A new method is one module
that calls ``register`` (and one import line in ``masquant/methods/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..calibration.pipeline import LayerContext, LayerPlan
from ..config import method_names, register_settings


def _never(settings: Any) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """``name``: what ``QuantConfig.method`` says; ``settings``: its dataclass; ``fit``: the
    per-layer decision; ``help``: one line for the CLI; ``second_moments``: the pipeline also
    collects ``X^T X`` at smoothed inputs; ``gradient_ratios(settings)``: MBQ's modality
    gradient ratios are measured first (``ctx.ratios``); ``text_moments(settings)``: ``X^T X`` of text tokens too."""

    name: str
    settings: type
    fit: Callable[[LayerContext], LayerPlan]
    help: str
    second_moments: bool = False
    gradient_ratios: Callable[[Any], bool] = _never
    text_moments: Callable[[Any], bool] = _never


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    register_settings(method.name, method.settings)
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a clear error listing the others."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return METHODS[name]
