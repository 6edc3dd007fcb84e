"""Full Qwen2.5-Omni checkpoints (``Qwen2_5OmniForConditionalGeneration``: thinker, talker, token2wav).

masquant quantizes the thinker (text, images, video and audio in, text out). The talker and token2wav
(speech out) are kept as the download has them (``talker=True``; the saved model loads as the full
class) or dropped (a thinker-only model, as masquant's other Omni models are)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

MODEL_TYPE = "qwen2_5_omni"
FULL_CLASS = "Qwen2_5OmniForConditionalGeneration"
SPEAKERS = "spk_dict.pt"  # the talker's voices: the full class's from_pretrained requires the file
TALKER_CHOICES = ("keep", "drop")


def is_full(config) -> bool:
    """Whether a config (object or ``config.json`` dict) is a full Qwen2.5-Omni model's."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return kind == MODEL_TYPE


def is_full_dir(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and is_full(json.loads(config.read_text()))


def thinker_of(model: nn.Module) -> nn.Module:
    """The module masquant quantizes and runs: a full Omni model's thinker, else the model itself."""
    return model.thinker if is_full(getattr(model, "config", None)) else model


def quantized_root(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module, its name in model)`` of the part that masquant quantized (holding its config and router)."""
    if hasattr(model, "masquant_config") or not is_full(getattr(model, "config", None)):
        return model, ""
    return model.thinker, "thinker"


def check_choice(talker: str | None, path: str, full: bool) -> None:
    """``--talker`` applies to full Omni checkpoints only; an unknown choice is refused."""
    if talker is None:
        return
    if talker not in TALKER_CHOICES:
        raise ValueError(f"--talker {talker!r}: choose {' or '.join(TALKER_CHOICES)}")
    if not full:
        raise ValueError(f"--talker applies to full Qwen2.5-Omni checkpoints (model_type {MODEL_TYPE!r}, thinker + "
                         f"talker + token2wav); {path} is not one: drop --talker")


def write_speakers(model: nn.Module, directory: Path) -> None:
    """A full model's talker voices, as its download has them (``spk_dict.pt``)."""
    import torch

    speakers = getattr(model, "speaker_map", None) if hasattr(model, "talker") else None
    if speakers:
        torch.save(dict(speakers), Path(directory) / SPEAKERS)


def read_speakers(model: nn.Module, directory: Path) -> None:
    if hasattr(model, "talker") and (Path(directory) / SPEAKERS).is_file():
        model.load_speakers(str(Path(directory) / SPEAKERS))
