"""masquant: modality-aware post-training quantization of multimodal LLMs."""

from .arch import (
    ADAPTERS,
    Adapter,
    LinearGroup,
    UnsupportedArchitectureError,
    generic_adapter,
    get_adapter,
    modality_ids,
)
from .calibration.quantize import CalibrationError, quantize
from .calibration.report import QuantReport
from .config import QuantConfig
from .io.serialization import IntegrityError, load, save, verify
from .modality import Modality, modality_scope
from .runtime.qlinear import QuantLinear, set_runtime
from .version import __version__ as __version__

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CalibrationError",
    "IntegrityError",
    "LinearGroup",
    "Modality",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "UnsupportedArchitectureError",
    "generic_adapter",
    "get_adapter",
    "load",
    "modality_ids",
    "modality_scope",
    "quantize",
    "save",
    "set_runtime",
    "verify",
]
