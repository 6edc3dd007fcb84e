"""masquant: modality-aware post-training quantization of multimodal LLMs."""

from .api import CalibrationError, quantize
from .arch import (
    ADAPTERS,
    Adapter,
    LinearGroup,
    UnsupportedArchitectureError,
    generic_adapter,
    get_adapter,
    modality_ids,
)
from .config import QuantConfig
from .modality import Modality, modality_scope
from .qlinear import QuantLinear, set_runtime
from .report import QuantReport
from .serialization import IntegrityError, load, save, verify

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
__version__ = "0.1.0"
