"""Tokenizer and processor of the reference models.

The processor turns chat messages with images into exactly the inputs
``Qwen2_5_VLProcessor`` produces (``input_ids``, ``attention_mask``, ``pixel_values``,
``image_grid_thw``, ``mm_token_type_ids``): the chat template marks each image with
``<|vision_start|><|image_pad|><|vision_end|>`` and the pad is repeated once per merged
patch. It uses transformers' PIL image processor; ``Qwen2_5_VLProcessor`` itself needs
torchvision (for its video processor), which does not install beside the CPU torch here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|AUDIO|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'audio' %}<|audio_start|><|AUDIO|><|audio_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE, PATCH, MERGE = 56, 7, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (as Qwen's) with the Qwen special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=IMAGE_SIZE * IMAGE_SIZE)


def to_rgb(image: np.ndarray):
    """A grayscale uint8 array as a ``IMAGE_SIZE`` square RGB PIL image."""
    from PIL import Image

    return Image.fromarray(image).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


class RefProcessor:
    """Chat messages + images -> model inputs, like ``Qwen2_5_VLProcessor``."""

    def __init__(self, tokenizer, images=None):
        self.tokenizer = tokenizer
        self.image_processor = images or image_processor()
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, text: list[str], images: list | None = None, return_tensors: str = "pt") -> dict:
        out: dict = {}
        per_image: list[int] = []
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            per_image = (vision["image_grid_thw"].prod(-1) // MERGE**2).tolist()
        expanded, queue = [], iter(per_image)
        for t in text:
            parts = t.split("<|image_pad|>")
            expanded.append(parts[0] + "".join("<|image_pad|>" * next(queue) + p for p in parts[1:]))
        enc = self.tokenizer(expanded, return_tensors="pt", padding=True, padding_side="left")
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_pad).long()
        return out

    def decode(self, ids: torch.Tensor | list[int], **kw) -> str:
        return self.tokenizer.decode(ids, **kw)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / "masquant_processor.json").write_text(json.dumps({"class": "RefProcessor", "version": 1}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RefProcessor:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return cls(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path))
