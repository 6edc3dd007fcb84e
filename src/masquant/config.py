"""``QuantConfig``: the settings every method shares, plus the chosen method's own settings.

Each method declares its own settings as a dataclass (fields with ``help`` metadata, checked in
``__post_init__``) and registers it here by name (``masquant.methods.registry.register``); the
CLI's flags are made from those fields. ``QuantConfig(method="masquant", w_bits=4, rank=16)``
is the short form: options that are not common settings go to the method's dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

_SETTINGS: dict[str, type] = {}  # method name -> its settings dataclass


def register_settings(method: str, settings: type) -> None:
    """Make ``method`` (with its settings dataclass) known to ``QuantConfig``."""
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"the settings of method {method!r} must be a dataclass, got {settings!r}")
    _SETTINGS[method] = settings


def method_names() -> list[str]:
    return sorted(_SETTINGS)


def settings_type(method: str) -> type:
    """The settings dataclass of ``method``; a clear error for an unknown name."""
    try:
        return _SETTINGS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(method_names())}") from None


def method_options(method: str) -> tuple[str, ...]:
    """Names of ``method``'s own settings."""
    return tuple(f.name for f in fields(settings_type(method)))


def options_for(method: str, **options: Any) -> dict[str, Any]:
    """The ``options`` that ``method`` takes (for sweeps that give every method one set of settings)."""
    return {k: v for k, v in options.items() if k in method_options(method)}


@dataclass(init=False)
class QuantConfig:
    """What to quantize and how.

    * ``method``: a registered method (``rtn``, ``smoothquant``, ``awq``, ``mbq``, ``mas``, ``masquant``).
    * ``w_bits`` (2-8) / ``a_bits`` (2-8, or 16 = activations stay in floating point).
    * ``w_group_size``: 0 = one scale per output channel, -1 = per tensor, g = groups of g.
    * ``w_symmetric``: signed symmetric weight grid, else asymmetric with a zero point.
      Activations are always dynamic, per token, symmetric.
    * ``smooth_down_proj``: also smooth the groups the adapter leaves unsmoothed (``down_proj``).
    * ``calib_batch``: calibration samples per decoder-layer call (right-padded; padding never counts).
    * ``runtime``: ``"int"`` (int8 x int8 -> int32 GEMMs) or ``"fake"`` (dequantize, multiply in float).
    * ``w_rounding``: ``"rtn"`` (round to nearest) or ``"gptq"`` (GPTQ on the smoothed weight, same grid;
      ``masquant.calibration.gptq``).
    * ``settings``: the method's own settings (``masquant.methods.<name>``); or pass them as keywords.
    """

    method: str = "smoothquant"
    w_bits: int = field(default=8, metadata={"help": "weight bits, 2-8"})
    a_bits: int = field(default=8, metadata={"help": "activation bits, 2-8, or 16 for weight-only"})
    w_group_size: int = field(default=0, metadata={"help": "weight group size (0 = per channel, -1 = per tensor)"})
    w_symmetric: bool = field(default=True, metadata={"help": "symmetric weight grid (off: asymmetric, zero points)"})
    smooth_down_proj: bool = field(default=False, metadata={"help": "also smooth the down_proj input"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    calib_batch: int = field(default=8, metadata={"help": "calibration samples per decoder-layer call"})
    runtime: str = field(default="int", metadata={"help": "int (integer GEMMs) or fake (float simulation)",
                                                  "choices": ("int", "fake")})
    w_rounding: str = field(default="rtn", metadata={
        "help": "how stored weights are rounded: rtn (to nearest) or gptq (Hessian-aware, after smoothing)",
        "choices": ("rtn", "gptq")})
    settings: Any = None

    VERSION: ClassVar[int] = 2

    def __init__(self, method: str = "smoothquant", w_bits: int = 8, a_bits: int = 8, w_group_size: int = 0,
                 w_symmetric: bool = True, *, smooth_down_proj: bool = False, seed: int = 0, calib_batch: int = 8,
                 runtime: str = "int", w_rounding: str = "rtn", settings: Any = None, **options: Any):
        kind = settings_type(method)
        unknown = sorted(set(options) - set(method_options(method)))
        if unknown:
            owners = {name: [m for m in method_names() if name in method_options(m)] for name in unknown}
            where = "; ".join(f"{n} is a setting of {', '.join(o)}" if o else f"no method takes {n}"
                              for n, o in owners.items())
            raise ValueError(f"method {method!r} has no setting {', '.join(unknown)} ({where}); "
                             f"its settings: {', '.join(method_options(method)) or 'none'}")
        if settings is None:
            settings = kind(**options)
        elif not isinstance(settings, kind):
            raise ValueError(f"settings for method {method!r} must be a {kind.__name__}, got {type(settings).__name__}")
        elif options:
            settings = dataclasses.replace(settings, **options)
        object.__setattr__(self, "settings", settings)
        for name, value in (("method", method), ("w_bits", w_bits), ("a_bits", a_bits),
                            ("w_group_size", w_group_size), ("w_symmetric", w_symmetric),
                            ("smooth_down_proj", smooth_down_proj), ("seed", seed), ("calib_batch", calib_batch),
                            ("runtime", runtime), ("w_rounding", w_rounding)):
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        check_int("w_bits", self.w_bits, 2, 8)
        if self.a_bits != 16:
            check_int("a_bits", self.a_bits, 2, 8, extra=" or 16 (no activation quantization)")
        if isinstance(self.w_group_size, bool) or not isinstance(self.w_group_size, int) or self.w_group_size < -1:
            raise ValueError(f"w_group_size must be -1, 0 or a positive group size, got {self.w_group_size!r}")
        check_int("calib_batch", self.calib_batch, 1, 100_000)
        if self.runtime not in ("int", "fake"):
            raise ValueError(f"runtime must be 'int' or 'fake', got {self.runtime!r}")
        if self.w_rounding not in ("rtn", "gptq"):
            raise ValueError(f"w_rounding must be 'rtn' or 'gptq', got {self.w_rounding!r}")

    def __getattr__(self, name: str) -> Any:
        """The method's own settings (and their helpers) read through the config (``config.rank``)."""
        settings = self.__dict__.get("settings")
        if settings is not None and not name.startswith("_") and hasattr(settings, name):
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__} of method {self.__dict__.get('method')!r} has no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        settings = self.__dict__.get("settings")
        if settings is not None and name in {f.name for f in fields(settings)}:
            setattr(settings, name, value)
        else:
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Flat and versioned: the common settings, then the method's own (``QuantConfig(**d)`` rebuilds it)."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        return {"version": self.VERSION, **common, **asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        version = data.pop("version", None)
        if version not in (1, cls.VERSION):
            raise ValueError(f"quant config version {version!r} is not supported (expected 1 or {cls.VERSION})")
        method = data.get("method", "smoothquant")
        common = {f.name for f in fields(cls)} - {"settings"}
        unknown = sorted(set(data) - common - {n for m in method_names() for n in method_options(m)})
        if unknown:
            raise ValueError(f"unknown quant config fields: {', '.join(unknown)}")
        if version == 1:  # one flat record of every method's settings: keep what this method takes
            data = {k: v for k, v in data.items() if k in common or k in method_options(method)}
        return cls(**data)


def check_int(name: str, value: Any, lo: int, hi: int, extra: str = "") -> None:
    """``value`` is an int (not a bool) in ``[lo, hi]``, else a ValueError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]{extra}, got {value!r}")
