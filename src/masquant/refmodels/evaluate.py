"""Evaluate a (quantized) reference model on its held-out slices, and build its calibration set."""

from __future__ import annotations

from dataclasses import dataclass

from .data import DIGIT_WORDS, FASHION_CLASSES, ImageSet
from .processor import RefProcessor, to_rgb
from .registry import slices
from .tasks import answer_labels, image_accuracy, prose_perplexity, qa_messages

CLASSES = {"item": FASHION_CLASSES, "digit": DIGIT_WORDS}


@dataclass
class EvalSizes:
    item: int = 300
    digit: int = 300
    prose: int = 100


FULL = EvalSizes()
QUICK = EvalSizes(item=60, digit=60, prose=20)


def evaluate_reference(model, processor: RefProcessor, name: str, sizes: EvalSizes = FULL) -> dict:
    """Per-task accuracy (answer ranking), answer NLL and prose perplexity on the test slices."""
    test = slices(name, "test")
    out = {}
    for task in ("item", "digit"):
        images, labels = test[task]
        n = min(getattr(sizes, task), len(labels))
        out[task] = image_accuracy(model, processor, ImageSet(task, images, labels, CLASSES[task]), n)
    out["prose_ppl"] = prose_perplexity(model, processor, test["prose"][: sizes.prose])
    return out


def qa_inputs(processor: RefProcessor, task: str, images, labels, template: int = 0) -> list[dict]:
    """One processor output per image: question + answer, with answer ``labels`` (for MBQ)."""
    samples = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        msgs = qa_messages(task, (template + i) % 5, CLASSES[task][int(label)])
        batch = processor([processor.apply_chat_template(msgs)], images=[to_rgb(image)])
        batch["labels"] = answer_labels(batch["input_ids"], processor)
        samples.append(batch)
    return samples


def prose_inputs(processor: RefProcessor, paragraphs: list[str], max_tokens: int = 96) -> list[dict]:
    samples = []
    for text in paragraphs:
        enc = processor.tokenizer(text, return_tensors="pt")
        samples.append({k: v[:, :max_tokens] for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return samples


def calibration_inputs(processor: RefProcessor, name: str, split: str = "calib") -> list[dict]:
    """The default calibration set: image QA with answers (both tasks) and prose."""
    part = slices(name, split)
    return (qa_inputs(processor, "item", *part["item"]) + qa_inputs(processor, "digit", *part["digit"])
            + prose_inputs(processor, part["prose"]))


def comparison_inputs(processor: RefProcessor, name: str, n: int = 24) -> list[dict]:
    """Held-out inputs for per-modality SQNR / KL against full precision."""
    part = slices(name, "test")
    return (qa_inputs(processor, "item", part["item"][0][:n], part["item"][1][:n])
            + qa_inputs(processor, "digit", part["digit"][0][:n], part["digit"][1][:n])
            + prose_inputs(processor, part["prose"][:n]))
