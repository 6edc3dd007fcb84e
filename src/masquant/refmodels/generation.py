"""Generative reference tasks: greedy answers and their scores (word / character error rate, exact match).

A quantized model's per-token errors compound over a generated sequence; these scores show it where the
one-word ranking tasks forgive it (as the paper's LibriSpeech WER and OCR answers do)."""

from __future__ import annotations

import numpy as np
import torch

from .processor import RefProcessor


def edit_distance(reference: list, hypothesis: list) -> int:
    """Levenshtein distance between two sequences (substitutions, insertions, deletions cost 1)."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation (the references are written so)."""
    return " ".join(text.lower().replace(",", " ").replace(".", " ").split())


def error_rates(references: list[str], hypotheses: list[str]) -> dict:
    """Corpus WER and CER (edits over reference words / characters), exact match, and the items."""
    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps, strict=True))
    chars = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps, strict=True))
    return {"wer": words / max(1, sum(len(r.split()) for r in refs)),
            "cer": chars / max(1, sum(len(r) for r in refs)),
            "exact": float(np.mean([r == h for r, h in zip(refs, hyps, strict=True)])) if refs else 0.0,
            "n": len(refs), "answers": hyps}


@torch.no_grad()
def generate_answers(model, processor: RefProcessor, prompts: list[tuple[list[dict], dict]],
                     max_new_tokens: int = 16, chunk: int = 16) -> list[str]:
    """Greedy answers to ``(messages, media)`` user turns, ``chunk`` prompts per batch (left-padded, as the
    processor pads), stopped at ``<|im_end|>``. A serving engine (``generate_greedy``) answers the same ids."""
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages, _ in prompts]
    if hasattr(model, "generate_greedy"):
        requests = [(processor([t], **items)["input_ids"][0].tolist(), items)
                    for t, (_, items) in zip(texts, prompts, strict=True)]
        return [processor.decode(ids, skip_special_tokens=True).strip()
                for ids in model.generate_greedy(requests, max_new_tokens)]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    out = []
    for first in range(0, len(prompts), chunk):
        media: dict = {}
        for _, items in prompts[first: first + chunk]:
            for key, values in items.items():
                media.setdefault(key, []).extend(values)
        batch = processor(texts[first: first + chunk], **media)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                             pad_token_id=pad)
        out += [processor.decode(row, skip_special_tokens=True).strip() for row in ids[:, batch["input_ids"].shape[1]:]]
    return out
