"""Evaluate a (quantized) reference model on its held-out slices, and build its calibration set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import DIGIT_WORDS, FASHION_CLASSES, ImageSet
from .generation import error_rates, generate_answers
from .processor import RefProcessor, to_rgb
from .registry import slices
from .speech import WORDS
from .tasks import accuracy, answer_labels, image_accuracy, media_messages, prose_perplexity, qa_messages

CLASSES = {"item": FASHION_CLASSES, "digit": DIGIT_WORDS}
YES_NO = ("yes", "no")


@dataclass
class EvalSizes:
    item: int = 300
    digit: int = 300
    prose: int = 100
    word: int = 300
    match: int = 200
    sentence: int = 150
    read: int = 200
    sign: int = 150


FULL = EvalSizes()
QUICK = EvalSizes(item=60, digit=60, prose=20, word=60, match=40, sentence=30, read=40, sign=30)
ANSWER_TOKENS = {"sentence": 20, "read": 8, "sign": 6}  # greedy decoding budget (the longest answers + 2)


def audio_messages(template: int = 0) -> list[dict]:
    return media_messages("word", template, ("audio",))


def match_messages(template: int = 0) -> list[dict]:
    return media_messages("match", template, ("image", "audio"))


def match_pairs(part: dict, n: int, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(image, clip, label)`` with label 0 = yes (the word names the item), 1 = no; half each."""
    rng = np.random.default_rng(seed)
    images, item_labels = part["item"]
    clips, word_labels = part["word"]
    by_word = {w: [i for i, x in enumerate(word_labels) if WORDS[x] == w] for w in FASHION_CLASSES}
    pairs = []
    for i in range(len(images)):
        if len(pairs) == n:
            break
        same = i % 2 == 0
        name = FASHION_CLASSES[item_labels[i]]
        word = name if same else rng.choice([c for c in FASHION_CLASSES if c != name and by_word[c]])
        if by_word.get(word):
            pairs.append((images[i], clips[rng.choice(by_word[word])], 0 if same else 1))
    return pairs


def evaluate_reference(model, processor: RefProcessor, name, sizes: EvalSizes = FULL) -> dict:
    """Per-task accuracy (answer ranking), answer NLL and prose perplexity on the test slices."""
    test = slices(name, "test")
    out = {}
    for task in ("item", "digit"):
        images, labels = test[task]
        n = min(getattr(sizes, task), len(labels))
        out[task] = image_accuracy(model, processor, ImageSet(task, images, labels, CLASSES[task]), n)
    if "word" in test:
        clips, labels = test["word"]
        n = min(sizes.word, len(labels))
        out["word"] = accuracy(model, processor, [(audio_messages(), {"audio": [c]}) for c in clips[:n]],
                               labels[:n], WORDS)
        pairs = match_pairs(test, sizes.match)
        out["match"] = accuracy(model, processor,
                                [(match_messages(), {"images": [to_rgb(im)], "audio": [c]}) for im, c, _ in pairs],
                                np.array([y for _, _, y in pairs]), YES_NO)
    out.update(generative_scores(model, processor, test, sizes))
    out["prose_ppl"] = prose_perplexity(model, processor, test["prose"][: sizes.prose])
    return out


def generative_prompts(part: dict, task: str, n: int | None = None) -> tuple[list, list[str]]:
    """``(prompts, references)`` of a generative task (``sentence``, ``read``, ``sign``) in a slice."""
    from PIL import Image

    media, refs = part[task]
    media, refs = media[:n], refs[:n]
    if task == "sentence":
        return [(media_messages("transcribe", 0, ("audio",)), {"audio": [c]}) for c in media], list(refs)
    if task == "read":
        return [(media_messages("read", 0, ("image",)), {"images": [Image.fromarray(x)]}) for x in media], list(refs)
    return ([(media_messages("sign", 0, ("image",), colour=colour), {"images": [Image.fromarray(x)]})
             for x, (colour, _) in zip(media, refs, strict=True)], [word for _, word in refs])


def generative_scores(model, processor: RefProcessor, test: dict, sizes: EvalSizes = FULL) -> dict:
    """Greedy answers of the generative tasks the slices hold: WER / CER / exact match per task."""
    out = {}
    for task in ("sentence", "read", "sign"):
        if task in test:
            prompts, refs = generative_prompts(test, task, getattr(sizes, task))
            out[task] = error_rates(refs, generate_answers(model, processor, prompts, ANSWER_TOKENS[task]))
    return out


def _with_answer(processor: RefProcessor, messages: list[dict], answer: str, **media) -> dict:
    text = processor.apply_chat_template([*messages, {"role": "assistant", "content": answer}])
    batch = processor([text], **media)
    batch["labels"] = answer_labels(batch["input_ids"], processor)
    return batch


def qa_inputs(processor: RefProcessor, task: str, images, labels, template: int = 0) -> list[dict]:
    """One processor output per image: question + answer, with answer ``labels`` (for MBQ)."""
    return [_with_answer(processor, qa_messages(task, (template + i) % 5), CLASSES[task][int(label)],
                         images=[to_rgb(image)])
            for i, (image, label) in enumerate(zip(images, labels, strict=True))]


def audio_inputs(processor: RefProcessor, clips, labels) -> list[dict]:
    return [_with_answer(processor, audio_messages(i % 5), WORDS[int(label)], audio=[clip])
            for i, (clip, label) in enumerate(zip(clips, labels, strict=True))]


def match_inputs(processor: RefProcessor, part: dict, n: int) -> list[dict]:
    return [_with_answer(processor, match_messages(i % 5), YES_NO[y], images=[to_rgb(im)], audio=[clip])
            for i, (im, clip, y) in enumerate(match_pairs(part, n))]


def prose_inputs(processor: RefProcessor, paragraphs: list[str], max_tokens: int = 96) -> list[dict]:
    samples = []
    for text in paragraphs:
        enc = processor.tokenizer(text, return_tensors="pt")
        samples.append({k: v[:, :max_tokens] for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return samples


def _inputs(processor: RefProcessor, part: dict, n: int | None) -> list[dict]:
    take = (lambda x: x) if n is None else (lambda x: x[:n])
    samples = (qa_inputs(processor, "item", take(part["item"][0]), take(part["item"][1]))
               + qa_inputs(processor, "digit", take(part["digit"][0]), take(part["digit"][1])))
    if "word" in part:
        samples += audio_inputs(processor, take(part["word"][0]), take(part["word"][1]))
        samples += match_inputs(processor, part, n or 32)
    for task in ("sentence", "read", "sign"):
        if task in part:
            prompts, refs = generative_prompts(part, task, n)
            samples += [_with_answer(processor, messages, ref, **items)
                        for (messages, items), ref in zip(prompts, refs, strict=True)]
    return samples + prose_inputs(processor, take(part["prose"]))


def calibration_inputs(processor: RefProcessor, name) -> list[dict]:
    """The default calibration set (calib split): image QA with answers, spoken words, matching, the generative
    tasks with their answers (transcripts, text read), prose."""
    return _inputs(processor, slices(name, "calib"), None)


def comparison_inputs(processor: RefProcessor, name, n: int = 24) -> list[dict]:
    """Held-out inputs (test split) for per-modality SQNR / KL against full precision."""
    return _inputs(processor, slices(name, "test"), n)
