"""vLLM's multimodal models with masquant's per-token routing: at every step the model records
which scheduled tokens receive encoder outputs (vLLM's ``is_multimodal`` mask, correct across
batched requests, chunked prefill and prefix caching) in the checkpoint's ``StepRouter``, which its
quantized linears read. A model without masquant's quantization runs unchanged."""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from .vllm_quant import MasquantConfig

log = logging.getLogger("masquant")


class _Routed:
    """Mixed in before a vLLM model class."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.quant_config
        routed = isinstance(config, MasquantConfig)
        if routed:
            _eager(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.masquant_router = config.router if routed else None

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        if self.masquant_router is not None:
            self.masquant_router.record(input_ids, is_multimodal)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, *args, **kwargs):
        if self.masquant_router is not None and _capturing():
            raise RuntimeError("masquant: per-token modality routing cannot run inside a CUDA graph (it would replay "
                               "the captured step's routes); serve with --enforce-eager / enforce_eager=True")
        try:
            return super().forward(*args, **kwargs)
        finally:  # (a later forward without an embedding call, e.g. a dummy run, is text)
            if self.masquant_router is not None:
                self.masquant_router.ids = None


def _eager(vllm_config) -> None:
    """The routes change at every step and are read in Python, which a graph traced or captured once
    would freeze: the decoder runs eagerly, without torch.compile or CUDA graphs (as with
    ``--enforce-eager``; logged when vLLM would have used either)."""
    from vllm.config import CompilationMode
    from vllm.config.compilation import CUDAGraphMode

    compilation = vllm_config.compilation_config
    graphs = compilation.cudagraph_mode not in (None, CUDAGraphMode.NONE)
    if compilation.mode != CompilationMode.NONE or graphs:
        log.warning("masquant: per-token modality routing runs eagerly; torch.compile and CUDA graphs are off for "
                    "this model (pass --enforce-eager / enforce_eager=True to say so)")
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE


def _capturing() -> bool:
    """Whether a CUDA graph is being captured (a model run eagerly must not be)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class MasquantQwen2_5_VLForConditionalGeneration(_Routed, Qwen2_5_VLForConditionalGeneration):
    pass


class MasquantQwen2_5OmniThinkerForConditionalGeneration(_Routed, Qwen2_5OmniThinkerForConditionalGeneration):
    pass
