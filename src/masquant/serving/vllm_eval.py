"""A vLLM engine that scores what masquant's evaluation scores: the log-probability of every token of
given token ids (``token_logprobs``, which ``masquant.refmodels.tasks`` uses for answer ranking and
prose perplexity), full next-token distributions (``next_token_logprobs``, for the KL against
masquant's own runtime) and greedy answers (``generate_greedy``, for the generative tasks). Prompts
are the token ids masquant's processor makes (placeholders already expanded) with the raw images and
audio, which vLLM's processor turns into the same pixel values."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# (token ids, masquant processor media: images / videos / fps / audio)
Request = tuple[Sequence[int], Mapping[str, list]]


class VllmEngine:
    """``vllm.LLM`` on a model directory (float32 unless ``dtype``; eager unless ``enforce_eager=False``;
    other keywords go to ``vllm.LLM``), closed by ``close`` or ``with``."""

    def __init__(self, model: str | Path, *, dtype: str = "float32", max_model_len: int = 1024,
                 sample_rate: int = 16000, **engine):
        from vllm import LLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU (vLLM's default: most RAM)
        config = json.loads((Path(model) / "config.json").read_text())
        limits = {"image": 2, "video": 1, **({"audio": 1} if _has_audio(config) else {})}
        self.placeholders, self.sample_rate = _placeholders(config), sample_rate
        engine = {"enforce_eager": True, "max_logprobs": -1, "limit_mm_per_prompt": limits, "seed": 0,
                  **_omni_pixels(Path(model), config), **engine}
        self.llm = LLM(model=str(model), dtype=dtype, max_model_len=max_model_len, **engine)
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()

    def _prompt(self, ids: Sequence[int], items: Mapping[str, list]) -> dict:
        """What a client sends: one placeholder per image or clip (vLLM expands it again)."""
        collapsed = [t for i, t in enumerate(ids) if not (t in self.placeholders and i and ids[i - 1] == t)]
        prompt: dict = {"prompt_token_ids": collapsed}
        media = {}
        if items.get("images"):
            images = list(items["images"])
            media["image"] = images[0] if len(images) == 1 else images
        if items.get("videos"):
            fps = list(items.get("fps") or [2.0] * len(items["videos"]))
            media["video"] = [_video(frames, rate) for frames, rate in zip(items["videos"], fps, strict=True)]
        if items.get("audio"):
            media["audio"] = [(np.asarray(a, dtype=np.float32), self.sample_rate) for a in items["audio"]]
        if media:
            prompt["multi_modal_data"] = media
        return prompt

    def token_logprobs(self, requests: Sequence[Request]) -> list[np.ndarray]:
        """Per request, ``log p(token_t | tokens before t)`` for every position (position 0: NaN)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([self._prompt(ids, items) for ids, items in requests], params, use_tqdm=False)
        result = []
        for (ids, _), out in zip(requests, outs, strict=True):
            _same_tokens(ids, out.prompt_token_ids)
            row = [np.nan] + [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
            result.append(np.asarray(row, dtype=np.float64))
        return result

    def next_token_logprobs(self, requests: Sequence[Request]) -> np.ndarray:
        """``[requests, vocab]``: the log-probabilities of the token after each prompt."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1)
        outs = self.llm.generate([self._prompt(ids, items) for ids, items in requests], params, use_tqdm=False)
        dense = np.full((len(requests), self.vocab), -np.inf)
        for row, out in enumerate(outs):
            for token, lp in out.outputs[0].logprobs[0].items():
                if token < self.vocab:
                    dense[row, token] = lp.logprob
        return dense

    def generate_greedy(self, requests: Sequence[Request], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of each request's token ids (the generative reference tasks), stopped at the
        model's end-of-turn token as ``generation.generate_answers`` stops."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        outs = self.llm.generate([self._prompt(ids, items) for ids, items in requests], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs]

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _video(frames: Sequence, fps: float) -> tuple[np.ndarray, dict]:
    """A clip as vLLM takes it: ``[frames, height, width, 3]`` uint8 and its metadata (the frames are
    the sampled ones, ``fps`` their rate; vLLM resamples nothing)."""
    from PIL import Image

    images = [f if isinstance(f, Image.Image) else Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    rgb = [np.asarray(image.convert("RGB")) for image in images]
    meta = {"fps": float(fps), "duration": len(rgb) / fps, "total_num_frames": len(rgb),
            "frames_indices": list(range(len(rgb))), "video_backend": "opencv", "do_sample_frames": False}
    return np.stack(rgb), meta


def _omni_pixels(model: Path, config: dict) -> dict:
    """Qwen2.5-Omni's processor sizes videos by its own pixel bounds (128 to 768 patches of 28 x 28),
    not by its video processor's: a checkpoint whose processor says otherwise (the reference
    models' 56-pixel frames) needs them as ``mm_processor_kwargs`` (``--mm-processor-kwargs``)."""
    pre = model / "preprocessor_config.json"
    if "thinker_config" not in config or not pre.exists():
        return {}
    size = json.loads(pre.read_text()).get("size") or {}
    if "shortest_edge" not in size or "longest_edge" not in size:
        return {}
    return {"mm_processor_kwargs": {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}}


def _has_audio(config: dict) -> bool:
    return "audio_config" in config or "audio_config" in config.get("thinker_config", {})


_PLACEHOLDER_KEYS = {f"{m}_token_{s}" for m in ("image", "video", "audio") for s in ("id", "index")}


def _placeholders(config: dict) -> set[int]:
    """The image / video / audio placeholder token ids a config names (also in an Omni thinker config)."""
    found = set()
    for part in (config, config.get("thinker_config", {})):
        for key, value in part.items():
            if isinstance(value, int) and key in _PLACEHOLDER_KEYS:
                found.add(value)
    return found


def _same_tokens(ours: Sequence[int], theirs: Sequence[int]) -> None:
    ours, theirs = list(ours), list(theirs)
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                  min(len(ours), len(theirs)))
        near = slice(max(at - 3, 0), at + 3)
        raise ValueError(f"vLLM's processor made {len(theirs)} prompt tokens where masquant's made {len(ours)}, first "
                         f"differing at {at} (ours {ours[near]}, vLLM's {theirs[near]}): a different number of "
                         "placeholders per image or clip; the scores would not compare")
