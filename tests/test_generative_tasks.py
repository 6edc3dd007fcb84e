"""The generative reference tasks (issue 26): scoring, greedy answers, and the data they are built from
(clauses of the prose corpus, espeak-ng speech, rendered text; those tests skip where the data is not
installed: scripts/prepare_data.sh)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from masquant.refmodels import data, reading, registry, sentences, speech
from masquant.refmodels.evaluate import QUICK, generative_prompts, generative_scores
from masquant.refmodels.generation import edit_distance, error_rates, generate_answers
from masquant.refmodels.tasks import media_messages, prompt_texts


def _has_corpus() -> bool:
    try:
        data.moby_dick_dir()
    except data.DataMissingError:
        return False
    return True


needs_corpus = pytest.mark.skipif(not _has_corpus(), reason="Moby-Dick not installed (scripts/prepare_data.sh)")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _has_fonts() -> bool:
    try:
        return bool(reading.fonts())
    except data.DataMissingError:
        return False


needs_fonts = pytest.mark.skipif(not _has_fonts(), reason="no TrueType fonts installed")


def test_edit_distance_and_error_rates():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance([], list("abc")) == 3
    assert edit_distance(list("abc"), list("abc")) == 0
    scores = error_rates(["the cat sat", "a dog"], ["the sat on", "a dog"])
    # "the cat sat" -> "the sat on": one deletion and one insertion; 2 edits over 5 reference words
    assert scores["wer"] == pytest.approx(2 / 5) and scores["exact"] == 0.5 and scores["n"] == 2
    assert scores["cer"] == pytest.approx(edit_distance("the cat sat", "the sat on") / 16)
    assert error_rates(["Call me, Ishmael."], ["call me ishmael"])["wer"] == 0  # case and punctuation ignored


def test_media_messages_fill_the_sign_colour():
    msgs = media_messages("sign", 0, ("image",), answer="whale", colour="red")
    assert msgs[0]["content"][0] == {"type": "image"} and "red sign" in msgs[0]["content"][1]["text"]
    assert msgs[1] == {"role": "assistant", "content": "whale"}
    assert any("blue sign" in t for t in prompt_texts("vl")) and not any("{}" in t for t in prompt_texts("vl"))
    assert any("Transcribe" in t for t in prompt_texts("omni")) and not any("Transcribe" in t for t in prompt_texts())


def test_flac_slices_round_trip_exactly():
    rng = np.random.default_rng(0)
    clips = [rng.integers(-32767, 32767, n).astype(np.float32) / 32767 for n in (1600, 4000, 321)]
    back = speech.unpack_flac(speech.pack_flac(clips, prefix="x_"), prefix="x_")
    assert all(np.array_equal(a, b) for a, b in zip(clips, back, strict=True))  # lossless at 16 bits


def test_batched_greedy_answers_equal_one_at_a_time():
    """Left-padded batches give each prompt the answer it gets alone (a padding or mask bug would not)."""
    model, processor = registry.load("ref-vl")
    items = registry.slices("ref-vl", "test")["item"][0][:5]
    sizes = [(56, 56), (168, 28), (168, 42), (56, 56), (112, 56)]  # other token counts: padding differs by row
    prompts = [(media_messages("read", i % 5, ("image",)), {"images": [Image.fromarray(x).convert("RGB").resize(s)]})
               for i, (x, s) in enumerate(zip(items, sizes, strict=True))]
    batched = generate_answers(model, processor, prompts, max_new_tokens=6, chunk=5)
    alone = [generate_answers(model, processor, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone and all(isinstance(a, str) for a in alone)


def test_generative_scores_on_a_slice():
    """Scores for each generative task the slices hold: references paired with the greedy answers."""
    model, processor = registry.load("ref-vl")
    images = registry.slices("ref-vl", "test")["item"][0][:3]
    strips = np.stack([np.asarray(Image.fromarray(x).convert("RGB").resize((168, 28))) for x in images])
    scenes = np.stack([np.asarray(Image.fromarray(x).convert("RGB").resize((168, 42))) for x in images])
    part = {"read": (strips, ["whale", "the sea", "ship"]), "sign": (scenes, [["red", "oil"], ["blue", "sea"],
                                                                              ["green", "ahab"]])}
    prompts, refs = generative_prompts(part, "sign", 2)
    assert refs == ["oil", "sea"] and "red sign" in prompts[0][0][0]["content"][1]["text"]
    out = generative_scores(model, processor, part, QUICK)
    assert set(out) == {"read", "sign"} and out["read"]["n"] == 3 and len(out["sign"]["answers"]) == 3
    assert 0 <= out["read"]["exact"] <= 1 and out["read"]["cer"] >= 0


@needs_corpus
def test_clauses_are_in_the_vocabulary_and_the_splits_disjoint():
    vocab = sentences.vocabulary()
    splits = {s: sentences.clauses(s) for s in ("train", "calib", "test")}
    assert len(splits["test"]) >= 60 and len(splits["calib"]) >= 48 and len(splits["train"]) > 500
    for clauses in splits.values():
        assert all(3 <= len(c.split()) <= 7 and set(c.split()) <= vocab for c in clauses)
    assert not set(splits["test"]) & set(splits["train"]) and not set(splits["calib"]) & set(splits["train"])


@needs_corpus
@needs_espeak
def test_spoken_sentences_are_deterministic_and_bounded():
    clips, texts = sentences.spoken_sentences("test", 4)
    again, same = sentences.spoken_sentences("test", 4)
    assert texts == same and all(np.array_equal(a, b) for a, b in zip(clips, again, strict=True))
    assert all(0.3 * speech.RATE < len(c) <= sentences.MAX_SECONDS * speech.RATE for c in clips)
    assert set(texts) <= set(sentences.clauses("test"))


@needs_corpus
@needs_fonts
def test_rendered_text_is_deterministic_and_fits_the_processor():
    from masquant.refmodels.processor import MAX_PIXELS, PATCH, image_processor

    images, texts = reading.reading_set("test", 6)
    again, same = reading.reading_set("test", 6)
    assert texts == same and np.array_equal(images, again) and images.shape == (6, 28, 168, 3)
    assert all(t in reading.words() or t in reading.phrases("test") for t in texts)
    scenes, colours, _ = reading.sign_set("test", 3)
    assert scenes.shape == (3, 42, 168, 3) and set(colours) <= set(reading.SIGN_COLOURS)
    grid = image_processor()(images=[Image.fromarray(scenes[0])], return_tensors="pt")["image_grid_thw"][0]
    assert grid.tolist() == [1, 42 // PATCH, 168 // PATCH] and MAX_PIXELS >= 168 * 42  # no resize: text stays sharp
    rng = random.Random(0)
    a, b = reading.render_strip("ahab", rng), reading.render_strip("ahab", rng)
    assert not np.array_equal(a, b)  # each rendering its own font, colours and distortion


def test_missing_fonts_are_named(monkeypatch, tmp_path):
    reading.fonts.cache_clear()
    monkeypatch.setattr(reading, "FONT_DIRS", (str(tmp_path),))
    try:
        with pytest.raises(data.DataMissingError, match=r"prepare_data\.sh"):
            reading.fonts()
    finally:
        reading.fonts.cache_clear()


@pytest.mark.parametrize("family", ["omni", "vl"])
def test_tower_ctc_scores_each_example_of_a_batch_as_alone(family):
    """The training-only CTC loss of a batch is the mean of each clip's or strip's loss alone (a wrong split of
    the tower's concatenated tokens, lengths off by a frame, or a reading order mixing images would not be)."""
    import torch

    from masquant.refmodels.train import TowerCTC

    model, processor = registry.load(f"ref-{family}")
    ctc = TowerCTC(model, family)
    rng = np.random.default_rng(0)
    texts = ["the whale", "call me ishmael"]
    if family == "omni":
        media = {"audio": [rng.normal(0, 0.1, n).astype(np.float32) for n in (16000, 40000)]}
    else:
        media = {"images": [Image.fromarray(rng.integers(0, 255, (28, w, 3), dtype=np.uint8)) for w in (168, 112)]}
    kind = "audio" if family == "omni" else "image"

    def loss(idx):
        part = processor([processor.apply_chat_template(media_messages(("transcribe", "read")[kind == "image"], 0,
                                                                       (kind,), texts[i])) for i in idx],
                         **{k: [v[i] for i in idx] for k, v in media.items()})
        with torch.no_grad():
            model(**part, use_cache=False)
            return float(ctc.loss(part, [texts[i] for i in idx]))

    both, alone = loss([0, 1]), [loss([0]), loss([1])]
    assert np.isfinite(both) and both > 0 and both == pytest.approx(np.mean(alone), rel=1e-4)


def test_training_resumes_from_its_checkpoint(monkeypatch, tmp_path):
    """A run cut short and resumed goes on from the step and weights it kept (a resume that restarted, or kept
    no optimizer state, would count steps from zero or load other weights)."""
    import torch
    from safetensors.torch import load_file

    from masquant import switches
    from masquant.refmodels import train as train_mod

    class Prose:  # a stand-in for the real batches: prose only, no media data needed
        def __init__(self, processor, family, batch_size, rng):
            self.processor, self.rng = processor, rng

        def next(self):
            words = " ".join(self.rng.choice(["the", "whale", "sea", "ship"]) for _ in range(12))
            batch = self.processor([words, words])
            return {"prose": {**batch, "labels": batch["input_ids"].clone()}}

        def mixture(self):
            return {"prose": 2}

        def tower_part(self):
            strips = [Image.fromarray(np.full((28, 168, 3), 40 * i, np.uint8)) for i in range(2)]
            texts = [self.processor.apply_chat_template(media_messages("read", 0, ("image",), w)) for w in ("a", "b")]
            return {**self.processor(texts, images=strips), "transcripts": ["a", "b"]}

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    switches.reload()
    monkeypatch.setattr(train_mod, "Batches", Prose)
    monkeypatch.setattr(train_mod.data, "moby_dick", lambda split: ["the whale and the sea and the ship"] * 20)
    monkeypatch.setattr(train_mod, "refresh", lambda out, family: json.loads((out / "training.json").read_text()))
    first = train_mod.train("vl", tmp_path / "a", minutes=0.05)
    kept = torch.load(tmp_path / "cache" / "masquant" / "train" / "ref-vl-seed0.pt", weights_only=False)
    assert kept["run"]["step"] == first["steps"] > 0
    again = train_mod.train("vl", tmp_path / "b", minutes=0.05, resume=True)  # its time is spent: no new step
    assert again["steps"] == first["steps"]
    weights = [load_file(tmp_path / d / "model.safetensors") for d in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    longer = train_mod.train("vl", tmp_path / "c", minutes=0.1, resume=True)
    assert longer["steps"] > first["steps"] and longer["minutes"] >= 0.1 and longer["tower_steps"] == 0

    # a run that is all tower stage moves the vision tower only (the language model and its embeddings stay)
    staged = train_mod.train("vl", tmp_path / "d", minutes=0.03, seed=1, tower_minutes=1)
    start = train_mod.train("vl", tmp_path / "e", minutes=0.0, seed=1)
    assert staged["tower_steps"] == staged["steps"] > 0 and start["steps"] == 0
    after, before = (load_file(tmp_path / d / "model.safetensors") for d in "de")
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(".visual." in k or k.startswith("visual.") for k in moved)
    switches.reload()


@pytest.mark.parametrize("family", ["omni", "vl"])
def test_training_groups_hold_each_parameter_once_at_its_towers_rate(family):
    from masquant.refmodels.train import TOWER_LR, TowerCTC, _parameter_groups

    model, _ = registry.load(f"ref-{family}")
    ctc = TowerCTC(model, family)
    groups = _parameter_groups(model, ctc)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters())) + len(list(ctc.parameters()))
    vision = next(g for g in groups if any(p is model.model.visual.patch_embed.proj.weight for p in g["params"]))
    assert vision["scale"] == TOWER_LR["visual"]
    head = next(g for g in groups if any(p is ctc.head.weight for p in g["params"]))
    tower = model.model.audio_tower if family == "omni" else model.model.visual
    assert any(p is next(tower.parameters()) for p in head["params"])
