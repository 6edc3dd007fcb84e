"""Qwen2.5-VL / Qwen2.5-Omni processors without torchvision.

transformers' Qwen processors build a video processor, which needs torchvision; on a CPU-only
install without it ``AutoProcessor`` refuses every Qwen checkpoint. transformers itself falls back
to ``Qwen2VLImageProcessorPil`` for images; ``PilProcessor`` does the same around the checkpoint's
own tokenizer, chat template and (Omni) Whisper feature extractor, with the placeholder expansion
of masquant's reference processor, and refuses videos with a message naming torchvision."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..refmodels.processor import RefProcessor

log = logging.getLogger("masquant")

# what a Qwen checkpoint keeps of its processor besides the tokenizer and the image processor
EXTRA_FILES = ("chat_template.json", "chat_template.jinja", "video_preprocessor_config.json", "processor_config.json")


class PilProcessor(RefProcessor):
    """A Qwen checkpoint's processor from its files, images through PIL (no torchvision)."""

    def __init__(self, tokenizer, images, family: str, features, source: Path, chat_template: str | None):
        super().__init__(tokenizer, images, family=family, features=features, tokens=placeholders(tokenizer, family))
        self.source, self.chat_template = Path(source), chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            **template_kwargs) -> str:
        """The prompt text, as the Qwen processors give it (``add_vision_id`` and the like pass to the template)."""
        if tokenize:
            raise ValueError("PilProcessor.apply_chat_template returns the prompt text (tokenize=False); call the "
                             "processor on it with the media, which expands their placeholders")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **template_kwargs)

    def __call__(self, text: list[str], images: list | None = None, audio: list | None = None,
                 videos: list | None = None, fps: list[float] | None = None, return_tensors: str = "pt") -> dict:
        if videos:
            raise ValueError(f"videos need the Qwen video processor of {self.source}, which needs torchvision: "
                             "pip install torchvision (the release matching your torch), then rerun")
        return super().__call__(text, images=images, audio=audio, return_tensors=return_tensors)

    def save_pretrained(self, path: str | Path) -> None:
        """The checkpoint's processor files as they were (no masquant marker: loaded by
        ``AutoProcessor`` where torchvision is installed, by this class where not)."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        for name in ("preprocessor_config.json", *EXTRA_FILES):
            if (self.source / name).exists() and (self.source / name).resolve() != (path / name).resolve():
                shutil.copy2(self.source / name, path / name)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PilProcessor:
        from transformers import AutoTokenizer, WhisperFeatureExtractor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        omni = _is_omni(path)
        features = WhisperFeatureExtractor.from_pretrained(path) if omni else None
        return cls(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path), "omni" if omni else "vl", features, path,
                   _chat_template(path) or tokenizer.chat_template)


def placeholders(tokenizer, family: str) -> tuple[str, str, str]:
    """The image, video and audio placeholder tokens of a Qwen tokenizer: those its config names,
    else the first in its vocabulary of Qwen2.5-Omni's (``<|IMAGE|>``, ...) and Qwen2.5-VL's names."""
    vocab = tokenizer.get_vocab()
    omni = (("<|IMAGE|>", "<|image_pad|>"), ("<|VIDEO|>", "<|video_pad|>"), ("<|AUDIO|>",))
    out = []
    for attr, names in zip(("image_token", "video_token", "audio_token"), omni, strict=True):
        named = getattr(tokenizer, attr, None)
        order = ([named] if isinstance(named, str) else []) + list(names if family == "omni" else names[::-1])
        found = [t for t in order if t in vocab]
        if not found and attr != "audio_token":
            raise ValueError(f"the tokenizer has none of {', '.join(order)} for {attr.split('_')[0]}s: not a "
                             "Qwen2.5-VL / Omni tokenizer, or its tokenizer_config.json is incomplete (re-download it)")
        out.append(found[0] if found else names[0])
    return tuple(out)


def fallback(path: Path, err: Exception):
    """``PilProcessor`` for a Qwen checkpoint whose processor failed to load for want of
    torchvision (one warning), or None where that is not the reason."""
    if "torchvision" not in str(err).lower() or not qwen_images(_settings(path).get("image_processor") or {}):
        return None
    log.warning("torchvision is not installed: %s's processor runs its images through transformers' PIL image "
                "processor (the same values), and videos are refused (pip install torchvision for them)", path.name)
    return PilProcessor.from_pretrained(path)


def qwen_images(preprocessor: dict) -> bool:
    """Whether a ``preprocessor_config.json`` is Qwen2-VL's image processor's (fast or PIL)."""
    return str(preprocessor.get("image_processor_type", "")).startswith("Qwen2VLImageProcessor")


def _settings(path: Path) -> dict:
    """``{"image_processor": ..., "feature_extractor": ...}`` as a checkpoint keeps them: a download's
    ``preprocessor_config.json`` (both in one), or the ``processor_config.json`` transformers 5 saves."""
    pre, nested = path / "preprocessor_config.json", path / "processor_config.json"
    if pre.exists():
        flat = json.loads(pre.read_text())
        return {"image_processor": flat, "feature_extractor": flat if "feature_extractor_type" in flat else None}
    return json.loads(nested.read_text()) if nested.exists() else {}


def _is_omni(path: Path) -> bool:
    config = path / "config.json"
    kind = json.loads(config.read_text()).get("model_type", "") if config.exists() else ""
    features = _settings(path).get("feature_extractor") or {}
    return kind.startswith("qwen2_5_omni") or features.get("feature_extractor_type") == "WhisperFeatureExtractor"


def _chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return None
