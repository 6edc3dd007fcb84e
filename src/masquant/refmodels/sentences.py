"""Spoken sentences for ref-omni's transcription task: clauses of the prose corpus read by espeak-ng.

A clause is a run of 3-7 words between punctuation marks in Moby-Dick, lower-cased, whose words are all
among the ``VOCABULARY`` most frequent words of the training chapters (a small model cannot learn to
spell every word of a novel from 2 cores' worth of training; the page says so). Train, calib and test
clauses come from the corpus's disjoint chapter splits and are read by disjoint espeak-ng voice variants
(``speech.VARIANTS``), so a test sentence and its speaker were never heard in training.
"""

from __future__ import annotations

import collections
import functools
import random
import re
from pathlib import Path

import numpy as np

from . import data, speech

VOCABULARY = 150  # spoken sentences; reading.VOCABULARY for the written words
WORDS_PER_CLAUSE = (3, 7)
MAX_SECONDS = 4.0
_WORD = re.compile(r"[a-z]+")
_BREAK = re.compile(r"[.;:!?,\"()\u2014-]+")


@functools.cache
def vocabulary(size: int = VOCABULARY) -> frozenset[str]:
    """The ``size`` most frequent words of the training chapters."""
    counts = collections.Counter(w for p in data.moby_dick("train") for w in _WORD.findall(p.lower()))
    return frozenset(w for w, _ in counts.most_common(size))


def clauses(split: str, size: int = VOCABULARY) -> list[str]:
    """Distinct clauses of the split's chapters whose words are all in the vocabulary, in corpus order; a
    calib or test split leaves out the clauses the training chapters also have (short ones recur)."""
    vocab, low, high = vocabulary(size), *WORDS_PER_CLAUSE
    seen, out = set() if split == "train" else set(clauses("train", size)), []
    for paragraph in data.moby_dick(split):
        for part in _BREAK.split(paragraph.lower()):
            words = _WORD.findall(part.replace("'", ""))
            text = " ".join(words)
            if low <= len(words) <= high and all(w in vocab for w in words) and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def spliced(split: str, n: int, rng: random.Random) -> list[str]:
    """``n`` word sequences of 3-7 words: half the split's clauses, half the start of one clause joined to the end
    of another (new sequences with the corpus's local word order, so that a model cannot learn clauses by heart)."""
    texts, low, high = [c.split() for c in clauses(split)], *WORDS_PER_CLAUSE
    out = []
    for _ in range(n):
        first = rng.choice(texts)
        if rng.random() < 0.5:
            out.append(" ".join(first))
            continue
        second = rng.choice(texts)
        head = first[: rng.randrange(1, len(first) + 1)]
        tail = second[rng.randrange(len(second)):]
        words = (head + tail)[:high]
        out.append(" ".join(words if len(words) >= low else first))
    return out


def spoken_sentences(split: str, n: int, seed: int = data.SEED, splice: bool = False
                     ) -> tuple[list[np.ndarray], list[str]]:
    """``n`` clips of the split's clauses (cycled when ``n`` is larger; with ``splice``, ``spliced`` sequences)
    read by the split's speakers, and their transcripts; clips longer than ``MAX_SECONDS`` (slow voices) are read
    again faster."""
    rng = random.Random(f"{seed}-sentences-{split}")
    texts = clauses(split)
    order = spliced(split, n, rng) if splice else rng.sample(texts, len(texts))
    clips, out = [], []
    for i in range(n):
        text = order[i % len(order)]
        voice, variant = rng.choice(speech.VOICES), rng.choice(speech.VARIANTS[split])
        speed, pitch = rng.randrange(130, 201), rng.randrange(25, 76)
        clip = speech.synthesize(text, voice, variant, speed, pitch)
        while len(clip) > MAX_SECONDS * speech.RATE and speed < 400:
            speed = int(speed * 1.25)
            clip = speech.synthesize(text, voice, variant, speed, pitch)
        clips.append(clip[: int(MAX_SECONDS * speech.RATE)])
        out.append(text)
    return clips, out


def cache(split: str, n: int, folder: Path | None = None, splice: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """``spoken_sentences`` cached on disk (synthesis takes minutes for a training set)."""
    name = f"sentences-{split}-{n}-v{VOCABULARY}{'-spliced' if splice else ''}.npz"
    clips, texts = speech.cached(name, lambda: spoken_sentences(split, n, splice=splice), folder)
    return clips, [str(t) for t in texts]
