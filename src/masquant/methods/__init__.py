"""Quantization methods: one module each, registering a ``Method`` (``registry.py``).

Every module of this package is imported here, so a new method is one new file.
"""

import importlib
import pkgutil

from .registry import METHODS, Method, get_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "get_method", "register"]
