"""Export a saved masquant model for vLLM with masquant's plugin (``masquant.serving``): every
quantized linear as masquant stores it, nothing re-quantized, per-token routing kept.

Per quantized linear ``X`` (names as in the Hugging Face checkpoint):

* ``X.weight``: the codes of ``Q(W * s_text)`` (int8 ``[out, in]``; uint8 ``[out, ceil(in / 2)]``,
  two per byte, at <= 4 bits), ``X.weight_scale`` / ``X.weight_zero``: float32 ``[out, groups]``;
* ``X.smooth``: the smoothing table ``[modalities, in]`` (rows text, vision, audio);
* ``X.patch_l1_<modality>`` / ``X.patch_l2_<modality>``: MASQuant's low-rank patches;
* ``X.bias`` and every other tensor of the model as they are.

``config.json`` names masquant's routed architecture (``Masquant<architecture>``) and carries
``quantization_config`` with ``quant_method: "masquant"``: the ``QuantConfig``, the token-id ->
modality table and each linear's layout, keyed by decoder layer (``"<i>.<path>"``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..arch import get_adapter
from ..version import __version__
from .serialization import QUANT_CONFIG, read_meta, refuse_nonempty, staged_directory, weight_files

log = logging.getLogger("masquant")

QUANT_METHOD = "masquant"
FORMAT_VERSION = 1
ROUTED_PREFIX = "Masquant"  # config.json's architecture: the plugin's routed subclass of vLLM's model
SERVABLE = {  # Hugging Face architecture -> the vLLM architecture the plugin routes
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5OmniThinkerForConditionalGeneration": "Qwen2_5OmniThinkerForConditionalGeneration",
}
_SKIPPED_FILES = {QUANT_CONFIG, "config.json", "model.safetensors", "model.safetensors.index.json"}


def linear_key(name: str, layers: str) -> str:
    """``"<layer index>.<path in the layer>"`` of a quantized linear's full name."""
    if not name.startswith(layers + "."):
        raise ValueError(f"quantized linear {name!r} is not inside the decoder layers {layers!r}")
    return name[len(layers) + 1:]


def export_vllm(source: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the vLLM checkpoint of the masquant model saved at ``source`` to ``out``; returns
    its ``quantization_config``."""
    from safetensors.torch import save_file

    from ..runtime.qlinear import QuantLinear
    from .serialization import load

    source, out = Path(source), Path(out)
    refuse_nonempty(out, overwrite)
    meta = read_meta(source)
    model = load(source)
    config = model.masquant_config
    arch = type(model).__name__
    if arch not in SERVABLE:
        raise ValueError(f"vLLM serving with masquant's plugin supports {', '.join(SERVABLE)}; {source} holds {arch}")
    if config.method == "mas":
        raise ValueError("MAS-only models keep one weight per modality; vLLM serving takes one stored weight per "
                         "linear (export a masquant or single-vector model)")
    if config.w_group_size == -1:
        raise ValueError("per-tensor weight scales (--w-group-size -1) are not served; quantize per channel "
                         "(0) or per group")
    adapter = get_adapter(model)
    tensors, linears = {}, {}
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, layer in quantized.items():
        weight = layer.qweight
        groups = weight.scale.numel() // layer.out_features
        tensors[f"{name}.weight"] = weight.codes
        tensors[f"{name}.weight_scale"] = weight.scale.reshape(layer.out_features, groups).float()
        tensors[f"{name}.weight_zero"] = weight.zero.reshape(layer.out_features, groups).float()
        tensors[f"{name}.smooth"] = layer.smooth.float()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
        for modality, patch in layer.patches.items():
            tensors[f"{name}.patch_l1_{modality}"] = patch.l1
            tensors[f"{name}.patch_l2_{modality}"] = patch.l2
        linears[linear_key(name, adapter.layers)] = {
            "in": layer.in_features, "out": layer.out_features, "groups": groups,
            "patches": {m: int(p.l1.shape[1]) for m, p in layer.patches.items()}}
    inside = tuple(f"{name}." for name in quantized)
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(inside):
            continue
        if value.data_ptr() in seen:  # tied (the embeddings and the head): vLLM ties them from the config
            continue
        seen[value.data_ptr()] = key
        tensors[key] = value
    quantization = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "masquant_version": __version__,
                    "quant_config": config.to_dict(), "router": meta["router"], "layers": adapter.layers,
                    "linears": linears}
    with staged_directory(out, overwrite) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf_config = json.loads((source / "config.json").read_text())
        hf_config["architectures"] = [ROUTED_PREFIX + SERVABLE[arch]]
        hf_config["quantization_config"] = quantization
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in _SKIPPED_FILES and path not in weight_files(source):
                shutil.copy2(path, tmp / path.name)
    log.info("exported %d quantized linears for vLLM to %s", len(linears), out)
    return quantization
