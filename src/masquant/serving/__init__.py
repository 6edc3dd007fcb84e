"""Serving masquant models in vLLM with per-token modality routing (``vllm_plugin``); needs vLLM
(``scripts/setup_vllm.sh``), which the rest of masquant never imports."""
