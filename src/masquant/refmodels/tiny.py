"""Tiny random-weight multimodal models and synthetic inputs (tests and the offline demo).

Everything here is built from the real transformers config classes, so the code paths are
the ones a real Qwen2.5-VL / Qwen2.5-Omni checkpoint takes; nothing touches the network.
"""

from __future__ import annotations

import torch

from ..modality import Modality

VOCAB = 256
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = 250, 251, 252
VISION_START, VISION_END, AUDIO_START, AUDIO_END = 246, 247, 248, 249
BOS, EOS = 1, 2


def _text_config(hidden: int, layers: int, intermediate: int | None = None, heads: int = 4) -> dict:
    half = hidden // heads // 2  # mrope splits half the head dim as in Qwen (1/4, 3/8, 3/8)
    return dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]},
    )


def _vision_config(hidden: int) -> dict:
    return dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
        patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
        out_hidden_size=hidden, fullatt_block_indexes=[1],
    )


def tiny_qwen2_5_vl(hidden: int = 64, layers: int = 2, seed: int = 0, intermediate: int | None = None,
                    heads: int = 4) -> torch.nn.Module:
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (small for unit tests; the speed
    benchmark builds Qwen2.5-VL-3B-wide layers with ``hidden=2048, intermediate=11008, heads=16``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=_text_config(hidden, layers, intermediate, heads), vision_config=_vision_config(hidden),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen2_5_omni_thinker(hidden: int = 64, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A random-weight ``Qwen2_5OmniThinkerForConditionalGeneration`` (text + vision + audio)."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                 d_model=32, output_dim=hidden, max_source_positions=64, n_window=8)
    vision = _vision_config(hidden)
    vision["out_hidden_size"] = hidden
    config = Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=_text_config(hidden, layers),
        audio_token_index=AUDIO_TOKEN, image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, audio_start_token_id=AUDIO_START,
        audio_end_token_id=AUDIO_END,
    )
    torch.manual_seed(seed)
    return Qwen2_5OmniThinkerForConditionalGeneration(config).eval()


def _text_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 240, (n,), generator=gen).tolist()


def _image_part(gen: torch.Generator, grid: tuple[int, int, int]) -> tuple[list[int], dict]:
    t, h, w = grid
    patch_dim = 3 * 2 * 4 * 4
    pixels = torch.randn(t * h * w, patch_dim, generator=gen)
    n_tokens = t * h * w // 4
    ids = [VISION_START] + [IMAGE_TOKEN] * n_tokens + [VISION_END]
    return ids, {"pixel_values": pixels, "image_grid_thw": torch.tensor([list(grid)])}


def _audio_part(gen: torch.Generator, frames: int) -> tuple[list[int], dict]:
    feats = torch.randn(1, 16, frames, generator=gen)
    after_cnn = (frames - 1) // 2 + 1
    n_tokens = (after_cnn - 2) // 2 + 1
    ids = [AUDIO_START] + [AUDIO_TOKEN] * n_tokens + [AUDIO_END]
    extra = {"input_features": feats, "feature_attention_mask": torch.ones(1, frames, dtype=torch.long)}
    return ids, extra


def tiny_sample(seed: int, family: str = "vl", image: bool = True, audio: bool = False,
                text_len: int = 12, image_grid: int = 4) -> dict:
    """One synthetic sample laid out like that family's processor output (batch of 1). ``family``: ``"vl"``
    (Qwen2.5-VL, with ``mm_token_type_ids``) or ``"omni"``; an image of ``image_grid`` x ``image_grid``
    patches gives ``image_grid**2 / 4`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids, extra = [BOS, *_text_ids(gen, text_len // 2)], {}
    if image:
        part, more = _image_part(gen, (1, image_grid, image_grid))
        ids += part
        extra.update(more)
    if audio:
        part, more = _audio_part(gen, 32)
        ids += part
        extra.update(more)
    ids += _text_ids(gen, text_len - text_len // 2)
    input_ids = torch.tensor([ids])
    types = torch.zeros_like(input_ids)
    types[input_ids == IMAGE_TOKEN] = 1
    types[input_ids == VIDEO_TOKEN] = 2
    sample = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if family == "vl":
        sample["mm_token_type_ids"] = types
    sample.update(extra)
    return sample


def expected_modalities(input_ids: torch.Tensor) -> torch.Tensor:
    """Ground truth for the tiny vocabularies, written independently of the adapters."""
    out = torch.full_like(input_ids, int(Modality.TEXT))
    out[(input_ids == IMAGE_TOKEN) | (input_ids == VIDEO_TOKEN)] = int(Modality.VISION)
    out[input_ids == AUDIO_TOKEN] = int(Modality.AUDIO)
    return out
