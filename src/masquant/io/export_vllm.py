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
from . import omni
from .pil_processor import qwen_images
from .serialization import QUANT_CONFIG, read_meta, refuse_nonempty, staged_directory, weight_files

log = logging.getLogger("masquant")

QUANT_METHOD = "masquant"
FORMAT_VERSION = 1
ROUTED_PREFIX = "Masquant"  # a quantized export's architecture: the plugin's routed subclass of vLLM's model
SERVABLE = {  # Hugging Face architecture -> the name vLLM serves it under (full precision)
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5OmniThinkerForConditionalGeneration": "Qwen2_5OmniForConditionalGeneration",
}
_OMNI = "Qwen2_5OmniThinkerForConditionalGeneration"
_SKIPPED_FILES = {QUANT_CONFIG, "config.json", "model.safetensors", "model.safetensors.index.json"}
_OMNI_NAMES = (("model.language_model.", "model."), ("model.visual.", "visual."),
               ("model.audio_tower.", "audio_tower."))
_OMNI_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|AUDIO|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}


def linear_key(name: str, layers: str) -> str:
    """``"<layer index>.<path in the layer>"`` of a quantized linear's full name."""
    if not name.startswith(layers + "."):
        raise ValueError(f"quantized linear {name!r} is not inside the decoder layers {layers!r}")
    return name[len(layers) + 1:]


def export_vllm(source: str | Path, out: str | Path, overwrite: bool = False) -> dict | None:
    """Write the vLLM checkpoint of the model at ``source`` to ``out``: a masquant model (its
    ``quantization_config`` is returned) or a full-precision checkpoint, laid out as vLLM serves it
    (None; for comparisons: the Omni thinker needs the full model's config and names)."""
    from safetensors.torch import load_file, save_file

    source, out = Path(source), Path(out)
    refuse_nonempty(out, overwrite)
    hf_config = json.loads((source / "config.json").read_text())
    skipped = set(_SKIPPED_FILES)
    if omni.is_full(hf_config) and (source / QUANT_CONFIG).exists():  # saved with its talker: vLLM serves the thinker
        log.warning("%s holds a full Qwen2.5-Omni model: its quantized thinker is exported (vLLM serves Qwen2.5-Omni's "
                    "thinker, text out); the talker and token2wav are not", source)
        hf_config = {**hf_config["thinker_config"], "architectures": [_OMNI]}
        skipped.add(omni.SPEAKERS)
    arch = (hf_config.get("architectures") or [None])[0]
    if arch not in SERVABLE:
        raise ValueError(f"vLLM serving with masquant's plugin supports {', '.join(SERVABLE)}; {source} holds {arch}")
    if (source / QUANT_CONFIG).exists():
        tensors, quantization = _quantized(source)
    else:
        tensors, quantization = {}, None
        for path in weight_files(source):
            tensors.update(load_file(str(path)))
    if arch == _OMNI:
        hf_config, tensors = _omni_layout(hf_config, tensors)
    hf_config["architectures"] = [ROUTED_PREFIX + arch if quantization else SERVABLE[arch]]
    if quantization:
        hf_config["quantization_config"] = quantization
    with staged_directory(out, overwrite) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in skipped and path not in weight_files(source):
                shutil.copy2(path, tmp / path.name)
        if arch == _OMNI:
            _omni_processor_files(tmp, hf_config["thinker_config"]["audio_config"]["num_mel_bins"])
        _video_processor_file(tmp)
    log.info("exported %s for vLLM to %s", f"{len(quantization['linears'])} quantized linears" if quantization
             else "a full-precision model", out)
    return quantization


def _quantized(source: Path) -> tuple[dict, dict]:
    """The tensors and ``quantization_config`` of a masquant model."""
    from ..runtime.qlinear import QuantLinear
    from .serialization import load

    meta = read_meta(source)
    model = omni.thinker_of(load(source))
    config = model.masquant_config
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
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key.startswith(inside) or value.data_ptr() in seen:  # (tied tensors: vLLM ties them from the config)
            continue
        seen.add(value.data_ptr())
        tensors[key] = value
    return tensors, {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "masquant_version": __version__,
                     "quant_config": config.to_dict(), "router": meta["router"], "linears": linears}


def _omni_layout(thinker: dict, tensors: dict) -> tuple[dict, dict]:
    """A thinker checkpoint as vLLM reads Qwen2.5-Omni: the full model's config around the thinker's,
    and the thinker's tensors under ``thinker.`` in the original (flat) names."""
    renamed = {}
    for key, value in tensors.items():
        for old, new in _OMNI_NAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[f"thinker.{key}"] = value
    thinker = {k: v for k, v in thinker.items() if k not in ("architectures", "quantization_config")}
    if "text_config" in thinker:  # vLLM ties the head by the text config; the thinker's own setting is the one used
        thinker["text_config"] = {**thinker["text_config"], "tie_word_embeddings": thinker.get("tie_word_embeddings",
                                                                                               False)}
    return {"model_type": "qwen2_5_omni", "enable_audio_output": False, "thinker_config": thinker}, renamed


def _omni_processor_files(directory: Path, mel_bins: int) -> None:
    """What Qwen2.5-Omni's processor reads (vLLM builds it), where a thinker-only checkpoint lacks it:
    the Whisper feature extractor's settings beside the image processor's (16 kHz, the audio
    tower's mel bins), and the placeholder tokens named in the tokenizer's config."""
    from transformers import WhisperFeatureExtractor

    pre = directory / "preprocessor_config.json"
    config = json.loads(pre.read_text()) if pre.exists() else {}
    features = WhisperFeatureExtractor(feature_size=mel_bins, sampling_rate=16_000).to_dict()
    pre.write_text(json.dumps({**features, **config, "processor_class": "Qwen2_5OmniProcessor"}, indent=1))
    tok, vocab = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if tok.exists() and vocab.exists():
        tokenizer = json.loads(tok.read_text())
        known = vocab.read_text()
        if not isinstance(tokenizer.get("extra_special_tokens"), dict) and all(
                json.dumps(t) in known for t in _OMNI_TOKENS.values()):
            tokenizer["extra_special_tokens"] = _OMNI_TOKENS
            tok.write_text(json.dumps(tokenizer, indent=1))


_VIDEO_KEYS = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
               "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size")


def _video_processor_file(directory: Path) -> None:
    """Qwen2-VL's video processor settings where a checkpoint has only its image processor's (the
    reference models): the same patching and normalization, frames taken as given (no resampling
    in time), 2 frames per second as masquant's processor assumes."""
    pre, video = directory / "preprocessor_config.json", directory / "video_preprocessor_config.json"
    if video.exists() or not pre.exists():
        return
    image = json.loads(pre.read_text())
    if not qwen_images(image):
        return
    settings = {k: image[k] for k in _VIDEO_KEYS if k in image}
    video.write_text(json.dumps({**settings, "video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": False,
                                 "fps": 2.0}, indent=1))
