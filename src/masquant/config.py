"""``QuantConfig``: one validated, serialisable dataclass for every method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

MODALITY_NAMES = ("text", "vision", "audio")
PATCH_DTYPES = ("float16", "bfloat16", "float32")
REFERENCE_LAMBDAS = {"text": 1.0, "vision": 0.15, "audio": 0.55}


@dataclass
class QuantConfig:
    """What to quantize and how.

    * ``method``: ``"rtn"``, ``"smoothquant"``, ``"awq"``, ``"mbq"``, ``"mas"`` or ``"masquant"``.
    * ``w_bits`` (2-8) / ``a_bits`` (2-8, or 16 = activations stay in floating point).
    * ``w_group_size``: 0 = one scale per output channel, -1 = per tensor, g = groups of g.
    * ``w_symmetric``: signed symmetric weight grid, else asymmetric with a zero point.
      Activations are always dynamic, per token, symmetric.
    * ``alpha``: SmoothQuant migration strength. ``awq_grid``: number of exponents AWQ tries.
    * ``smooth_down_proj``: also smooth the ``down_proj`` input (off in the reference setting).
    * ``calib_batch``: calibration samples per decoder-layer call (right-padded batches;
      padding never counts). MAS takes one AdamW step per ``mas_batch`` such batches, so
      ``calib_batch=1, mas_batch=1`` is the paper's schedule (one step per sample).

    MAS / MASQuant (``method="mas"``: one quantized weight per modality, the accuracy upper
    bound; ``method="masquant"``: one weight ``Q(W * s_text)`` plus low-rank patches):

    * ``lambdas``: weight of each modality in the layer-output MAE, or ``"auto"`` for
      MBQ-style gradient ratios measured on the calibration set. ``epochs``, ``mas_batch``
      (calibration batches per AdamW step, mean loss), ``lr``,
      ``weight_decay``, ``min_scale`` (entries of s are kept >= it): the optimisation.
    * ``rank``: patch rank, an int or a float ratio of min(in, out) (0 = no patch).
      ``residual``: ``"fp"`` (``W*s_m - Q(W*s_text)``) or ``"quantized"``
      (``Q(W*s_m) - Q(W*s_text)``). ``whiten=False`` gives the plain-SVD ablation.
      ``ridge``: added to the activation covariance, relative to its mean diagonal.
      ``cmc_guard``: per group and modality, fall back to the text vector when the patched
      per-modality vector reconstructs that modality's outputs of the group's linears worse
      (not in the paper).
      ``patch_dtype``: how the patch factors are stored (``"float16"``, ``"bfloat16"`` or
      ``"float32"``); they are computed in float64 and applied in the model's dtype.
    * ``runtime``: ``"int"`` (int8 x int8 -> int32 GEMMs) or ``"fake"`` (dequantize and multiply
      in floating point, the simulation research code uses); same results up to float rounding.
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
    calib_batch: int = 8
    lambdas: dict[str, float] | str = field(default_factory=lambda: dict(REFERENCE_LAMBDAS))
    epochs: int = 2
    mas_batch: int = 1
    lr: float = 5e-2
    weight_decay: float = 0.0
    min_scale: float = 1e-2
    rank: int | float = 32
    residual: str = "fp"
    whiten: bool = True
    ridge: float = 1e-6
    cmc_guard: bool = True
    patch_dtype: str = "float16"
    runtime: str = "int"

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        from .methods import METHODS

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
        _check_int("calib_batch", self.calib_batch, 1, 100_000)
        self._check_mas()

    def _check_mas(self) -> None:
        if isinstance(self.lambdas, str):
            if self.lambdas != "auto":
                raise ValueError(f"lambdas must be a dict per modality or 'auto', got {self.lambdas!r}")
        else:
            unknown = sorted(set(self.lambdas) - set(MODALITY_NAMES))
            if unknown or any(not isinstance(v, int | float) or v < 0 for v in self.lambdas.values()):
                raise ValueError(f"lambdas must map {MODALITY_NAMES} to non-negative numbers, got {self.lambdas!r}")
        _check_int("epochs", self.epochs, 0, 10_000)
        _check_int("mas_batch", self.mas_batch, 1, 1_000_000)
        for name in ("lr", "min_scale"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.ridge < 0:
            raise ValueError("weight_decay and ridge must be >= 0")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int | float) or self.rank < 0 or (
                isinstance(self.rank, float) and self.rank > 1):
            raise ValueError(f"rank must be an int >= 0 or a float ratio in [0, 1] of min(in, out), got {self.rank!r}")
        if self.residual not in ("fp", "quantized"):
            raise ValueError(f"residual must be 'fp' or 'quantized', got {self.residual!r}")
        if self.runtime not in ("int", "fake"):
            raise ValueError(f"runtime must be 'int' or 'fake', got {self.runtime!r}")
        if self.patch_dtype not in PATCH_DTYPES:
            raise ValueError(f"patch_dtype must be one of {', '.join(PATCH_DTYPES)}, got {self.patch_dtype!r}")

    def lambda_of(self, modality: str) -> float:
        """Fixed loss weight of a modality (text defaults to 1, others to the reference values)."""
        if isinstance(self.lambdas, str):
            raise ValueError("lambdas='auto' is resolved per layer from gradients, not from the config")
        return float(self.lambdas.get(modality, REFERENCE_LAMBDAS[modality]))

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
