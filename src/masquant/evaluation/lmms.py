"""lmms-eval model ``masquant``: run lmms-eval benchmarks on a quantized model, a Hugging Face
checkpoint or a reference model (anything ``masquant.io.loading.load_any`` accepts as ``pretrained``).

Install lmms-eval (tested: 0.7.3) without its own requirements, plus what running a task needs::

    pip install --no-deps "lmms-eval==0.7.3"
    pip install "evaluate==0.4.6" "loguru==0.7.3" "sacrebleu==2.6.0" "tenacity==9.2.1" \\
        "pytablewriter==1.2.1" "pillow" "filelock<4"

Run ``python -m masquant.evaluation.lmms --model masquant --model_args pretrained=DIR --tasks ...``
(or ``lmms-eval --model masquant`` through the ``lmms_eval.models`` entry point). Model arguments:
``device``, ``max_new_tokens`` (default 256), ``system_prompt``. Generation is greedy, one request at
a time; images and audio clips go before the text (images at ``<image N>`` placeholders if any);
video is unsupported. lmms-eval 0.7.3 itself cannot score ``loglikelihood``/``multiple_choice``
tasks (it stringifies the answers and takes the argmin); generation-scored tasks are unaffected.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without lmms-eval
    raise ImportError("masquant.evaluation.lmms needs lmms-eval, installed without its own requirements: "
                      "pip install --no-deps 'lmms-eval==0.7.3' && pip install 'evaluate==0.4.6' 'loguru==0.7.3' "
                      "'sacrebleu==2.6.0' 'tenacity==9.2.1' 'pytablewriter==1.2.1' pillow 'filelock<4' "
                      "(see the top of masquant/evaluation/lmms.py)") from err

log = logging.getLogger("masquant")

NAME = "masquant"
DEFAULT_MAX_NEW_TOKENS = 256
_PLACEHOLDER = re.compile(r"<image (\d+)>")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class MasquantLMM(lmms):
    """An lmms-eval ``lmms`` over any model ``masquant.io.loading.load_any`` loads (batch size 1)."""

    is_simple = True

    def __init__(self, pretrained: str = "ref-vl", device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, system_prompt: str | None = None,
                 max_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        from ..io.loading import load_any

        if kwargs:
            log.warning("masquant lmms-eval model: ignoring unknown model arguments %s", sorted(kwargs))
        if str(batch_size) not in ("1", "auto") or max_batch_size not in (None, 1):
            log.warning("masquant lmms-eval model: runs one request at a time (batch_size=%s ignored)", batch_size)
        model, processor, _ = load_any(str(pretrained))
        if processor is None:
            raise ValueError(f"{pretrained} has no processor files; save the model with its processor "
                             "(masquant.save(model, dir, processor=processor))")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.batch_size = 1
        self._warned_sampling = False

    # -- inputs ---------------------------------------------------------------------------------

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        return list(_flatten(visuals or []))

    def _media(self, visuals: Sequence) -> tuple[list, list]:
        """``(images, audio)``: PIL RGB images and 1-D float arrays at the processor's sampling rate."""
        from PIL import Image

        images, audio = [], []
        for v in visuals:
            if isinstance(v, str) and v.lower().endswith(_IMAGE_SUFFIXES):
                v = Image.open(v)
            if isinstance(v, Image.Image):
                images.append(v.convert("RGB"))
            elif isinstance(v, dict) and "array" in v:
                rate = getattr(getattr(self.processor, "feature_extractor", None), "sampling_rate", None)
                if rate is None:
                    raise ValueError("this model's processor takes no audio")
                if v.get("sampling_rate", rate) != rate:
                    raise ValueError(f"audio at {v['sampling_rate']} Hz; the processor wants {rate} Hz "
                                     "(resample it in the task's doc_to_visual)")
                audio.append(v["array"])
            else:
                raise ValueError(f"unsupported visual input {type(v).__name__} {str(v)[:80]!r}: "
                                 "the masquant model takes images and audio clips, not video")
        return images, audio

    def _messages(self, context: str, images: list, n_audio: int) -> tuple[list[dict], list]:
        """The chat messages of one request, and its images in the order the messages place them."""
        text = context.replace("<image>", "").strip()
        pieces = _PLACEHOLDER.split(text) if images else [text]  # text, number, text, number, ..., text
        wanted = [int(n) - 1 for n in pieces[1::2]]
        if wanted and all(0 <= i < len(images) for i in wanted):
            # interleave each <image N> with the N-th image; images no placeholder names go first
            rest = [i for i in range(len(images)) if i not in wanted]
            order = rest + wanted
            parts = [{"type": "image"}] * len(rest)
            for i, piece in enumerate(pieces):
                if i % 2:
                    parts.append({"type": "image"})
                elif piece.strip():
                    parts.append({"type": "text", "text": piece})
        else:
            order = list(range(len(images)))
            parts = [*([{"type": "image"}] * len(images)), {"type": "text", "text": _PLACEHOLDER.sub("", text)}]
        messages = [{"role": "user", "content": [*([{"type": "audio"}] * n_audio), *parts]}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages, [images[i] for i in order]

    def _prompt(self, context: str, visuals: Sequence) -> dict[str, torch.Tensor]:
        """Processor outputs (batch of one) for the user turn plus the assistant generation prompt."""
        images, audio = self._media(visuals)
        messages, images = self._messages(context, images, len(audio))
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        kwargs: dict[str, Any] = {"images": images or None}
        if audio:
            kwargs["audio"] = audio
        batch = self.processor(text=[text], return_tensors="pt", **kwargs)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in dict(batch).items() if torch.is_tensor(v)}

    # -- lmms-eval API --------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="masquant generate", disable=len(requests) < 2):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
            if sampling and not self._warned_sampling:
                log.warning("masquant lmms-eval model: generation is greedy; sampling arguments are ignored")
                self._warned_sampling = True
            batch = self._prompt(context, self._visuals(doc_to_visual, doc_id, task, split))
            start = batch["input_ids"].shape[1]
            stop = _StopStrings(self.tokenizer, until, start) if until else None
            ids = self.model.generate(**batch, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                      stopping_criteria=[stop] if stop else None,
                                      pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(ids[0, start:], skip_special_tokens=True)
            out.append(_cut(text, until))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[-1])
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(sum of the continuation's token log-probabilities, is_greedy)`` per request, scoring the
        continuation as the start of the assistant's answer (leading whitespace dropped, no end-of-turn)."""
        out = []
        for req in requests:
            # (context, continuation, doc_to_visual, doc_id, task, split); the unconditional requests
            # of acc_mutual_info are only (context, continuation)
            context, continuation, *where = req.args
            doc_to_visual, doc_id, task, split = where if len(where) == 4 else (None, None, None, None)
            if callable(continuation):
                continuation = continuation(self._doc(task, split, doc_id))
            if isinstance(continuation, list | tuple):
                continuation = continuation[0]
            batch = self._prompt(context, self._visuals(doc_to_visual, doc_id, task, split))
            cont = self.tokenizer(str(continuation).lstrip(), add_special_tokens=False,
                                  return_tensors="pt")["input_ids"].to(self.device)
            if cont.shape[1] == 0:
                out.append((0.0, True))
                continue
            batch = _extend(batch, cont)
            logits = self.model(**batch, use_cache=False).logits
            n, start = cont.shape[1], batch["input_ids"].shape[1] - cont.shape[1]
            logp = F.log_softmax(logits[0, start - 1: start - 1 + n].float(), dim=-1)
            target = cont[0]
            score = float(logp.gather(-1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            out.append((score, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (score, greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the masquant lmms-eval model does not run multi-round tasks")


class _StopStrings:
    """Stop generating once the decoded new tokens contain one of ``stops``."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row[self.start:], skip_special_tokens=True) for s in self.stops)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for s in until:
        text = text.split(s, 1)[0]
    return text


PER_TOKEN = ("attention_mask", "mm_token_type_ids", "token_type_ids")


def _extend(batch: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Append text tokens ``ids`` (``[1, n]``) to a processor batch, with the per-token inputs
    (attention mask 1, token-type ids 0) extended to match."""
    prompt = batch["input_ids"]
    out = dict(batch)
    out["input_ids"] = torch.cat([prompt, ids], dim=1)
    for key, value in batch.items():  # the inputs that hold one entry per token (not e.g. audio frame masks)
        if key in PER_TOKEN and value.dim() == 2 and value.shape == prompt.shape:
            fill = torch.ones_like(ids) if key == "attention_mask" else torch.zeros_like(ids)
            out[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    return out


def _flatten(items):
    for item in items:
        if isinstance(item, list | tuple):
            yield from _flatten(item)
        else:
            yield item


def manifest():
    """The lmms-eval model manifest of the ``masquant`` model (for the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=NAME, simple_class_path=f"{__name__}.MasquantLMM")


def _register() -> None:
    """Register ``masquant`` with lmms-eval's model registries (legacy decorator registry and the
    manifest registry its evaluator and CLI resolve model names with)."""
    from lmms_eval.api.registry import register_model

    register_model(NAME)(MasquantLMM)
    models = sys.modules.get("lmms_eval.models")
    if models is not None and not hasattr(models, "MODEL_REGISTRY_V2"):
        return  # loaded by lmms-eval's own entry-point scan, which registers manifest() itself
    try:
        import lmms_eval.models as models
    except ImportError:  # pragma: no cover - lmms-eval without the manifest registry
        return
    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        registry.register_manifest(manifest(), overwrite=True)


if __name__ != "__main__":
    _register()
else:  # python -m masquant.evaluation.lmms [lmms-eval CLI arguments]
    from lmms_eval.cli.dispatch import main

    import masquant.evaluation.lmms  # noqa: F401  registers the importable class

    main()
