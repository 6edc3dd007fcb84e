"""Tokenizer and processor of the reference models.

The processor turns chat messages with images (and audio) into exactly the inputs
``Qwen2_5_VLProcessor`` / ``Qwen2_5OmniProcessor`` produce, with the pad token repeated once per
merged patch (audio token) between ``<|vision_start|>``/``<|vision_end|>`` (``<|audio_start|>``/
``<|audio_end|>``). It uses transformers' PIL image processor and Whisper feature extractor, since the
HF processors need torchvision, which does not install beside the CPU torch.
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
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'audio' %}<|audio_start|><|AUDIO|><|audio_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE, PATCH, MERGE = 56, 7, 2
MAX_PIXELS = 168 * 42  # the reading tasks' widest image (reading.SCENE); squares stay IMAGE_SIZE
MEL_BINS, SAMPLE_RATE = 80, 16_000


def audio_tokens(frames: int) -> int:
    """Tokens of a clip of ``frames`` mel frames after the Omni audio tower's convolutions and pooling."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


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
                                    min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=MAX_PIXELS)


def to_rgb(image: np.ndarray):
    """A grayscale uint8 array as a ``IMAGE_SIZE`` square RGB PIL image."""
    from PIL import Image

    return Image.fromarray(image).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


class RefProcessor:
    """Chat messages + images (+ audio) -> model inputs, like the Qwen2.5-VL / Omni processors.

    ``family``: ``"vl"`` adds ``mm_token_type_ids`` (Qwen2.5-VL takes them), ``"omni"`` does not.
    ``tokens``: the image, video and audio placeholders (Qwen2.5-Omni's downloads name them otherwise).
    """

    def __init__(self, tokenizer, images=None, family: str = "vl", features=None,
                 tokens: tuple[str, str, str] = ("<|image_pad|>", "<|video_pad|>", "<|AUDIO|>")):
        from transformers import WhisperFeatureExtractor

        self.tokenizer, self.family = tokenizer, family
        self.image_processor = images or image_processor()
        self.feature_extractor = features or WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLE_RATE)
        self.image_token, self.video_token, self.audio_token = tokens
        self.image_pad = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_pad = tokenizer.convert_tokens_to_ids(self.video_token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # (this module's template, also for models saved before it knew video items)
        return self.tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text: list[str], images: list | None = None, audio: list | None = None,
                 videos: list | None = None, fps: list[float] | None = None, return_tensors: str = "pt") -> dict:
        out: dict = {}
        per_image: list[int] = []
        per_clip: list[int] = []
        per_video: list[int] = []
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
            per_image = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        if videos:
            out.update(self._videos(videos, fps or [2.0] * len(videos)))
            per_video = (out["video_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        if audio:
            out["input_features"], out["feature_attention_mask"] = self._audio(audio)
            per_clip = [audio_tokens(int(n)) for n in out["feature_attention_mask"].sum(-1)]
        text = _expand(_expand(_expand(text, self.image_token, per_image), self.video_token, per_video),
                       self.audio_token, per_clip)
        enc = self.tokenizer(text, return_tensors="pt", padding=True, padding_side="left")
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        if self.family == "vl":  # 1 image, 2 video, as Qwen2.5-VL's processor marks them
            out["mm_token_type_ids"] = (enc["input_ids"] == self.image_pad).long() + 2 * (
                enc["input_ids"] == self.video_pad).long()
        return out

    def _audio(self, clips: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features and their mask as Qwen2.5-Omni's processor makes them: ``ceil(samples / hop)``
        frames per clip, the last one partly padding (it pads every clip to 30 s); here the clips are
        padded to just past that frame, which gives the same values (the zeros never raise a clip's
        maximum, the only thing the normalization reads)."""
        hop = self.feature_extractor.hop_length
        frames = [-(-len(c) // hop) for c in clips]
        width = (max(frames) + 1) * hop
        padded = [np.pad(np.asarray(c, dtype=np.float32), (0, width - len(c))) for c in clips]
        feats = self.feature_extractor(padded, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="pt")
        mask = (torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).long()
        return feats["input_features"][:, :, : max(frames)], mask

    def _videos(self, videos: list, fps: list[float]) -> dict:
        """Qwen2.5-VL's video inputs: each pair of frames one temporal patch (the image processor
        patches each frame, repeated in time; the pairs take one copy of each frame)."""
        values, grids = [], []
        for frames in videos:
            frames = [_square(f) for f in frames]
            if len(frames) % 2:
                frames.append(frames[-1])
            vision = self.image_processor(images=frames, return_tensors="pt")
            (_, h, w), per = vision["image_grid_thw"][0].tolist(), int(vision["image_grid_thw"][0].prod())
            patches = vision["pixel_values"].reshape(len(frames), per, 3, 2, PATCH, PATCH)[:, :, :, 0]
            pairs = patches.reshape(len(frames) // 2, 2, per, 3, PATCH, PATCH).permute(0, 2, 3, 1, 4, 5)
            values.append(pairs.reshape(len(frames) // 2 * per, 3 * 2 * PATCH * PATCH))
            grids.append([len(frames) // 2, h, w])
        seconds = "video_second_per_grid" if self.family == "omni" else "second_per_grid_ts"  # (each model's name)
        return {"pixel_values_videos": torch.cat(values), "video_grid_thw": torch.tensor(grids),
                seconds: torch.tensor([2.0 / f for f in fps])}

    def decode(self, ids: torch.Tensor | list[int], **kw) -> str:
        return self.tokenizer.decode(ids, **kw)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / "masquant_processor.json").write_text(json.dumps({"class": "RefProcessor", "version": 1,
                                                                  "family": self.family}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RefProcessor:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        meta = json.loads((Path(path) / "masquant_processor.json").read_text())
        return cls(AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path),
                   family=meta.get("family", "vl"))


def _square(frame):
    """A frame (grey or RGB, array or image) as a ``IMAGE_SIZE`` square RGB PIL image."""
    from PIL import Image

    image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
    return image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)


def _expand(texts: list[str], pad: str, counts: list[int]) -> list[str]:
    """Repeat the ``i``-th ``pad`` of the batch ``counts[i]`` times."""
    queue, out = iter(counts), []
    for t in texts:
        parts = t.split(pad)
        out.append(parts[0] + "".join(pad * next(queue) + p for p in parts[1:]))
    return out
