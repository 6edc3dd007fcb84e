"""Collate calibration samples (processor outputs) into padded batches.

Calibration runs each decoder layer many times per sample, and on small and medium models framework
overhead dominates, so ``calib_batch`` samples run per call. Padding is on the right and masked everywhere;
the model builds the batch's masks and (m)rope positions itself, so nothing architecture-specific is rebuilt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0,
                 "labels": -100}  # None: the model's pad token
CONCAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
               "video_second_per_grid")
FRAME_KEYS = {"input_features": 0.0, "feature_attention_mask": 0}  # [batch, ..., frames], padded on frames


class CollateError(ValueError):
    pass


def collate(samples: list[dict], batch_size: int, pad_token_id: int = 0) -> list[dict]:
    """Consecutive groups of ``batch_size`` samples, each merged into one padded batch."""
    if batch_size <= 1:
        return samples
    return [merge(samples[i: i + batch_size], pad_token_id) for i in range(0, len(samples), batch_size)]


def merge(samples: list[dict], pad_token_id: int = 0) -> dict:
    """One batch from several processor outputs (each with a batch dimension)."""
    if len(samples) == 1:
        return samples[0]
    keys = {k for s in samples for k, v in s.items() if v is not None}
    unknown = sorted(keys - set(SEQUENCE_KEYS) - set(CONCAT_KEYS) - set(FRAME_KEYS))
    if unknown:
        raise CollateError(f"cannot batch calibration inputs with keys {unknown}; use calib_batch=1")
    samples = [_with_mask(s) for s in samples]
    length = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for key, pad in SEQUENCE_KEYS.items():
        if key not in keys and key != "attention_mask":
            continue
        value = pad_token_id if pad is None else pad
        parts = [_filled(s, key) for s in samples]
        out[key] = torch.cat([F.pad(p, (0, length - p.shape[1]), value=value) for p in parts])
    for key in CONCAT_KEYS:
        parts = [s[key] for s in samples if s.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for p in parts for x in p]
    for key, pad in FRAME_KEYS.items():
        parts = [s[key] for s in samples if s.get(key) is not None]
        if parts:
            frames = max(p.shape[-1] for p in parts)
            out[key] = torch.cat([F.pad(p, (0, frames - p.shape[-1]), value=pad) for p in parts])
    return out


def _filled(sample: dict, key: str) -> torch.Tensor:
    """``sample[key]``, or what its absence means: no multimodal token types (all text), or
    no labels (every text token counts as an answer, as ``capture`` reads it)."""
    if sample.get(key) is not None:
        return sample[key]
    if key == "labels":
        return sample["input_ids"].clone()
    return torch.zeros_like(sample["input_ids"])


def _with_mask(sample: dict) -> dict:
    if sample.get("attention_mask") is None:
        return {**sample, "attention_mask": torch.ones_like(sample["input_ids"])}
    return sample
