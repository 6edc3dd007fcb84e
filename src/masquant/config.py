"""``QuantConfig``: one validated, serialisable dataclass for every method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

PLANNED_METHODS = ("mbq", "mas", "masquant")


@dataclass
class QuantConfig:
    """What to quantize and how.

    * ``method``: ``"rtn"``, ``"smoothquant"`` or ``"awq"``.
    * ``w_bits`` (2-8) / ``a_bits`` (2-8, or 16 = activations stay in floating point).
    * ``w_group_size``: 0 = one scale per output channel, -1 = per tensor, g = groups of g.
    * ``w_symmetric``: signed symmetric weight grid, else asymmetric with a zero point.
      Activations are always dynamic, per token, symmetric.
    * ``alpha``: SmoothQuant migration strength. ``awq_grid``: number of exponents AWQ tries.
    * ``smooth_down_proj``: also smooth the ``down_proj`` input (off in the reference setting).
    """

    method: str = "smoothquant"
    w_bits: int = 8
    a_bits: int = 8
    w_group_size: int = 0
    w_symmetric: bool = True
    alpha: float = 0.5
    awq_grid: int = 20
    smooth_down_proj: bool = False
    seed: int = 0

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        from .methods import METHODS

        if self.method in PLANNED_METHODS:
            raise ValueError(f"method {self.method!r} is not implemented yet; available: "
                             f"{', '.join(sorted(METHODS))}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        _check_int("w_bits", self.w_bits, 2, 8)
        if self.a_bits != 16:
            _check_int("a_bits", self.a_bits, 2, 8, extra=" or 16 (no activation quantization)")
        if not isinstance(self.w_group_size, int) or self.w_group_size < -1:
            raise ValueError(f"w_group_size must be -1, 0 or a positive group size, got {self.w_group_size!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        _check_int("awq_grid", self.awq_grid, 1, 1000)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        version = data.pop("version", None)
        if version != cls.VERSION:
            raise ValueError(f"quant config version {version!r} is not supported (expected {cls.VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quant config fields: {', '.join(unknown)}")
        return cls(**data)


def _check_int(name: str, value: Any, lo: int, hi: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]{extra}, got {value!r}")
