"""The reference tasks: image question answering in varied phrasings, and prose.

An image example is a user turn (image + question) and an assistant answer (the class
name); a prose example is a paragraph of held-out-able text. Accuracy ranks every class
answer by its log-likelihood under the model (and reports that of the right one).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageSet
from .processor import RefProcessor, to_rgb

TEMPLATES = {
    "item": ("What is this item?", "Which piece of clothing is shown?", "Name the object in the picture.",
             "What do you see in this image?", "Tell me what this product is."),
    "digit": ("Which digit is this?", "What number is written here?", "Read the handwritten digit.",
              "What digit do you see?", "Name the number in the picture."),
    "word": ("Which word is spoken?", "What did the speaker say?", "Transcribe the spoken word.",
             "What word do you hear?", "Repeat the word from the recording."),
    "match": ("Does the spoken word name this item?", "Is the word you hear the thing in the picture?",
              "Do the sound and the image agree?", "Does the recording describe the picture?",
              "Is this item what the speaker says?"),
    # generative tasks: the answer is written out (greedy decoding), scored by WER / CER / exact match
    "transcribe": ("Transcribe the recording.", "What does the speaker say?", "Write down the spoken sentence.",
                   "What is said in this clip?", "Type out what you hear."),
    "read": ("What is written in the image?", "Read the text.", "What does the text say?",
             "Which words are shown?", "Read out the writing in the picture."),
    "sign": ("What is written on the {} sign?", "What does the {} sign say?", "Read the {} sign.",
             "Which word is on the {} sign?", "What is the text on the {} sign?"),
}


def qa_messages(task: str, template: int, answer: str | None = None, media: str = "image") -> list[dict]:
    """A question about an image (or, ``media="video"``, a clip) in the task's ``template``-th wording."""
    return media_messages(task, template, (media,), answer)


def media_messages(task: str, template: int, media: tuple[str, ...], answer: str | None = None,
                   colour: str = "") -> list[dict]:
    """A user turn with ``media`` items (``"image"``, ``"audio"``) then the task's ``template``-th question
    (``colour`` fills the sign task's blank); with ``answer``, the assistant's reply."""
    question = TEMPLATES[task][template].format(colour)
    msgs = [{"role": "user", "content": [*({"type": m} for m in media), {"type": "text", "text": question}]}]
    return [*msgs, {"role": "assistant", "content": answer}] if answer is not None else msgs


FAMILY_TASKS = {"vl": ("item", "digit", "read", "sign"), "omni": ("item", "digit", "word", "match", "transcribe")}


def prompt_texts(family: str = "vl") -> list[str]:
    """Every prompt and answer string of a family's tasks, for the tokenizer."""
    from .data import DIGIT_WORDS, FASHION_CLASSES
    from .reading import SIGN_COLOURS

    questions = [t.format(c) if "{}" in t else t for task in FAMILY_TASKS[family] for t in TEMPLATES[task]
                 for c in (SIGN_COLOURS if "{}" in t else ("",))]
    extra = () if family == "vl" else ("yes", "no")
    return [*questions, *FASHION_CLASSES, *DIGIT_WORDS, *extra]


def answer_labels(input_ids: torch.Tensor, processor: RefProcessor) -> torch.Tensor:
    """Labels that keep only the last assistant turn (answer + <|im_end|>), -100 elsewhere."""
    tok = processor.tokenizer
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids.tolist()):
        last = max(i for i, t in enumerate(ids) if t == start) + 3  # <|im_start|> assistant \n
        stop = next(i for i in range(last, len(ids)) if ids[i] == end)
        labels[row, last: stop + 1] = input_ids[row, last: stop + 1]
    return labels


@torch.no_grad()
def rank_answers(model, processor: RefProcessor, prompts: list[tuple[list[dict], dict]],
                 candidates: tuple[str, ...], chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """For each ``(messages, media)`` prompt (user turn; processor ``images`` / ``audio`` lists): the most likely
    candidate and every candidate's log-likelihood, ``chunk`` prompts per forward. A serving engine
    (``token_logprobs``, e.g. ``masquant.serving.vllm_eval.VllmEngine``) scores the same token ids."""
    if hasattr(model, "token_logprobs"):
        scores = _engine_answer_scores(model, processor, prompts, candidates).reshape(-1, len(candidates))
        return scores.argmax(1), scores
    scores = []
    for first in range(0, len(prompts), chunk):
        texts, media = [], {}
        for messages, items in prompts[first: first + chunk]:
            for text in _answered(processor, messages, candidates):
                texts.append(text)
                for key, values in items.items():
                    media.setdefault(key, []).extend(values)
        batch = processor(texts, **media)
        labels = answer_labels(batch["input_ids"], processor)
        logits = model(**batch, use_cache=False).logits
        logp = F.log_softmax(logits[:, :-1].float(), -1)
        target = labels[:, 1:]
        ll = (logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (target != -100)).sum(-1)
        scores.append(ll.reshape(-1, len(candidates)).numpy())
    scores = np.concatenate(scores)
    return scores.argmax(1), scores


def accuracy(model, processor: RefProcessor, prompts: list, labels: np.ndarray, candidates: tuple[str, ...]) -> dict:
    picks, scores = rank_answers(model, processor, prompts, candidates)
    n = len(labels)
    return {"accuracy": float((picks == labels).mean()), "answer_nll": float(-scores[np.arange(n), labels].mean()),
            "n": n, "picks": picks.tolist()}


def image_accuracy(model, processor: RefProcessor, dataset: ImageSet, n: int, template: int = 0) -> dict:
    prompts = [(qa_messages(dataset.name, template), {"images": [to_rgb(x)]}) for x in dataset.images[:n]]
    return accuracy(model, processor, prompts, dataset.labels[:n], dataset.classes)


def _answered(processor: RefProcessor, messages: list[dict], candidates: tuple[str, ...]) -> list[str]:
    """The chat of ``messages`` answered by each candidate, as text."""
    return [processor.apply_chat_template([*messages, {"role": "assistant", "content": c}]) for c in candidates]


def _engine_answer_scores(engine, processor: RefProcessor, prompts: list[tuple[list[dict], dict]],
                          candidates: tuple[str, ...]) -> np.ndarray:
    """Each prompt x candidate's answer log-likelihood from an engine's per-token log-probabilities of
    the processor's token ids (the positions ``answer_labels`` keeps, as ``rank_answers`` sums)."""
    requests, keep = [], []
    for messages, items in prompts:
        for text in _answered(processor, messages, candidates):
            ids = processor([text], **items)["input_ids"]
            requests.append((ids[0].tolist(), items))
            keep.append((answer_labels(ids, processor)[0] != -100).numpy())
    return np.array([lp[k].sum() for lp, k in zip(engine.token_logprobs(requests), keep, strict=True)])


@torch.no_grad()
def prose_perplexity(model, processor: RefProcessor, paragraphs: list[str], max_tokens: int = 96) -> float:
    total, count = 0.0, 0
    rows = [processor.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens] for text in paragraphs]
    rows = [ids for ids in rows if ids.shape[1] >= 2]
    if hasattr(model, "token_logprobs"):  # a serving engine: the same tokens' log-probabilities
        for lp in model.token_logprobs([(ids[0].tolist(), {}) for ids in rows]):
            total, count = total - float(lp[1:].sum()), count + len(lp) - 1
        return float(np.exp(total / max(count, 1)))
    for ids in rows:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        total += float(out.loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return float(np.exp(total / max(count, 1)))
