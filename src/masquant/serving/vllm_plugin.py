"""vLLM's entry point into masquant (``vllm.general_plugins``), loaded by every vLLM process:
registers the ``masquant`` quantization method and the routed model classes that
``masquant export --format vllm`` names. Importing masquant itself never imports vLLM."""

from __future__ import annotations

from ..io.export_vllm import ROUTED_PREFIX, SERVABLE


def register() -> None:
    from vllm import ModelRegistry

    from . import vllm_quant  # noqa: F401  (registers the quantization method)

    for arch in SERVABLE:
        name = ROUTED_PREFIX + arch
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"masquant.serving.vllm_models:{name}")
