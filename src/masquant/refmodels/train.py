"""Train the reference models from scratch on real offline data (``scripts/prepare_data.sh``).

``python -m masquant.refmodels.train --model ref-vl --minutes 40`` (or ``ref-omni``)
regenerates a shipped model with a fixed seed, then evaluates it and cuts its data slices.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from PIL import Image

from ..switches import switches
from . import data, reading, sentences, speech
from .evaluate import audio_messages, evaluate_reference, match_messages
from .processor import RefProcessor, audio_tokens, to_rgb, train_tokenizer
from .registry import WEIGHTS, export_slices
from .tasks import answer_labels, media_messages, prompt_texts, qa_messages

log = logging.getLogger("masquant.train")
SENTENCE_CLIPS = 12000  # synthesised training clips of the transcription task (spliced; cached on disk)
CTC_WEIGHT = 0.5  # of a tower's training-only CTC loss on the transcription / reading examples
CHARACTERS = " abcdefghijklmnopqrstuvwxyz"
# learning rate of each media tower (and of its CTC head) relative to the language model's: the vision tower
# learns to read at a quarter of it and hardly at all at the full rate; the audio tower is slower at a quarter
TOWER_LR = {"visual": 0.25, "audio_tower": 1.0}

TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
VISION = dict(depth=4, hidden_size=128, intermediate_size=384, num_heads=4, in_channels=3, patch_size=7,
              spatial_merge_size=2, temporal_patch_size=2, window_size=28, out_hidden_size=256,
              fullatt_block_indexes=[1, 3])
AUDIO = dict(num_mel_bins=80, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=384, d_model=128,
             output_dim=256, max_source_positions=1500, n_window=50)


def build_model(family: str, tokenizer) -> torch.nn.Module:
    ids = tokenizer.convert_tokens_to_ids
    text = {**TEXT, "vocab_size": len(tokenizer), "bos_token_id": None, "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>")}
    tokens = dict(vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if family == "vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(text_config=text, vision_config=VISION, image_token_id=ids("<|image_pad|>"),
                                  video_token_id=ids("<|video_pad|>"), tie_word_embeddings=False, **tokens)
        return Qwen2_5_VLForConditionalGeneration(config)
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    config = Qwen2_5OmniThinkerConfig(
        audio_config=AUDIO, vision_config=VISION, text_config=text, image_token_index=ids("<|image_pad|>"),
        video_token_index=ids("<|video_pad|>"), audio_token_index=ids("<|AUDIO|>"),
        audio_start_token_id=ids("<|audio_start|>"), audio_end_token_id=ids("<|audio_end|>"), **tokens)
    return Qwen2_5OmniThinkerForConditionalGeneration(config)


class TowerCTC(torch.nn.Module):
    """A training-only character CTC head on a media tower's output (the audio tower for omni, the vision tower
    for vl), fitted on the transcription or reading examples: it makes the tower's tokens spell the text in
    order, which the language model then reads (a tiny model trained on the answer tokens alone is slow to
    learn where the letters are). Not saved with the model."""

    def __init__(self, model: torch.nn.Module, family: str):
        super().__init__()
        self.tower_name = "audio_tower" if family == "omni" else "visual"  # a key of TOWER_LR
        tower = getattr(model.model, self.tower_name)
        width = tower.config.output_dim if family == "omni" else tower.config.out_hidden_size
        self.head = torch.nn.Linear(width, len(CHARACTERS) + 1)  # blank = 0
        self.states = None
        tower.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        pooled = getattr(output, "pooler_output", None)  # the vision tower's merged tokens, in image order
        self.states = pooled if pooled is not None else output.last_hidden_state

    def _sequences(self, part: dict) -> list[torch.Tensor]:
        """The last forward's tower tokens of each clip or image, in reading order (left to right; for an image,
        each column's rows top to bottom)."""
        if "feature_attention_mask" in part:
            lengths = [audio_tokens(int(n)) for n in part["feature_attention_mask"].sum(-1)]
            return list(torch.split(self.states, lengths))
        grids = part["image_grid_thw"].tolist()
        pieces = torch.split(self.states, [t * h * w // 4 for t, h, w in grids])
        return [x.reshape(h // 2, w // 2, -1).transpose(0, 1).reshape(-1, x.shape[-1])
                for x, (_, h, w) in zip(pieces, grids, strict=True)]

    def encode(self, model: torch.nn.Module, part: dict) -> None:
        """Run the tower alone on ``part``'s clips or images (the hook keeps its tokens for ``loss``)."""
        if "feature_attention_mask" in part:
            model.get_audio_features(part["input_features"], part["feature_attention_mask"])
        else:
            model.get_image_features(part["pixel_values"], part["image_grid_thw"])

    def loss(self, part: dict, texts: list[str]) -> torch.Tensor:
        """CTC loss of the last forward (``part``'s clips or images) against their texts' characters."""
        sequences = self._sequences(part)
        log_probs = torch.log_softmax(self.head(torch.nn.utils.rnn.pad_sequence(sequences)).float(), -1)
        targets = [[CHARACTERS.index(c) + 1 for c in text if c in CHARACTERS] for text in texts]
        return torch.nn.functional.ctc_loss(
            log_probs, torch.tensor([i for t in targets for i in t]), torch.tensor([len(x) for x in sequences]),
            torch.tensor([len(t) for t in targets]), blank=0, zero_infinity=True)


def _parameter_groups(model: torch.nn.Module, ctc: TowerCTC) -> list[dict]:
    """AdamW groups: the language model at the full rate, each media tower at its ``TOWER_LR`` scale, the CTC
    head with the tower it reads."""
    towers = {name: getattr(model.model, name) for name in TOWER_LR if hasattr(model.model, name)}
    taken = {id(p) for tower in towers.values() for p in tower.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in taken], "scale": 1.0}]
    for name, tower in towers.items():
        heads = list(ctc.parameters()) if name == ctc.tower_name else []
        groups.append({"params": [*tower.parameters(), *heads], "scale": TOWER_LR[name]})
    return groups


def _answered(messages: list[dict], answer: str) -> list[dict]:
    return [*messages, {"role": "assistant", "content": answer}]


class Batches:
    """Random training batches: image QA and prose; for vl reading text in strips and on signs, for omni
    spoken words, image / word matching and spoken-sentence transcription."""

    def __init__(self, processor: RefProcessor, family: str, batch_size: int, rng: random.Random):
        self.processor, self.family, self.batch_size, self.rng = processor, family, batch_size, rng
        self.images = {s.name: s for s in data.image_sets("train")}
        self.prose = data.moby_dick("train")
        if family == "omni":
            self.clips, self.words = speech.cache("train", 6000)
            self.sentence_clips, self.sentences = sentences.cache("train", SENTENCE_CLIPS, splice=True)
        else:
            self.phrases = reading.phrases("train")

    def _answers(self, texts: list[str], **media) -> dict:
        batch = self.processor(texts, **media)
        batch["labels"] = answer_labels(batch["input_ids"], self.processor).masked_fill(
            batch["attention_mask"] == 0, -100)
        return batch

    def qa(self, n: int) -> dict:
        texts, images = [], []
        for _ in range(n):
            task = "item" if self.rng.random() < 0.7 else "digit"
            ds = self.images[task]
            i = self.rng.randrange(len(ds.labels))
            texts.append(self.processor.apply_chat_template(
                qa_messages(task, self.rng.randrange(5), ds.classes[ds.labels[i]])))
            images.append(to_rgb(ds.images[i]))
        return self._answers(texts, images=images)

    def spoken(self, n: int) -> dict:
        picks = [self.rng.randrange(len(self.words)) for _ in range(n)]
        texts = [self.processor.apply_chat_template(_answered(audio_messages(self.rng.randrange(5)),
                                                              speech.WORDS[self.words[i]])) for i in picks]
        return self._answers(texts, audio=[self.clips[i] for i in picks])

    def match(self, n: int) -> dict:
        items = self.images["item"]
        texts, images, clips = [], [], []
        word_of = {w: [i for i, x in enumerate(self.words) if speech.WORDS[x] == w] for w in data.FASHION_CLASSES}
        for _ in range(n):
            i = self.rng.randrange(len(items.labels))
            same = self.rng.random() < 0.5
            word = items.classes[items.labels[i]] if same else self.rng.choice(
                [c for c in data.FASHION_CLASSES if c != items.classes[items.labels[i]]])
            texts.append(self.processor.apply_chat_template(_answered(match_messages(self.rng.randrange(5)),
                                                                      "yes" if same else "no")))
            images.append(to_rgb(items.images[i]))
            clips.append(self.clips[self.rng.choice(word_of[word])])
        return self._answers(texts, images=images, audio=clips)

    def transcribe(self, n: int) -> dict:
        picks = [self.rng.randrange(len(self.sentences)) for _ in range(n)]
        texts = [self.processor.apply_chat_template(media_messages("transcribe", self.rng.randrange(5), ("audio",),
                                                                   self.sentences[i])) for i in picks]
        batch = self._answers(texts, audio=[self.sentence_clips[i] for i in picks])
        batch["transcripts"] = [self.sentences[i] for i in picks]  # for TowerCTC, popped before the forward
        return batch

    def read(self, n: int) -> dict:
        texts, images, written = [], [], []
        for _ in range(n):
            pixels, text = reading.strip_example(self.rng, self.phrases)
            texts.append(self.processor.apply_chat_template(media_messages("read", self.rng.randrange(5), ("image",),
                                                                           text)))
            images.append(Image.fromarray(pixels))
            written.append(text)
        return {**self._answers(texts, images=images), "transcripts": written}

    def signs(self, n: int) -> dict:
        texts, images = [], []
        for _ in range(n):
            pixels, colour, word = reading.sign_example(self.rng)
            texts.append(self.processor.apply_chat_template(media_messages("sign", self.rng.randrange(5), ("image",),
                                                                           word, colour)))
            images.append(Image.fromarray(pixels))
        return self._answers(texts, images=images)

    def prose_batch(self, n: int, words: int = 40) -> dict:
        texts = []
        for _ in range(n):
            para = self.prose[self.rng.randrange(len(self.prose))].split()
            start = self.rng.randrange(max(1, len(para) - words))
            texts.append(" ".join(para[start: start + words]))
        batch = self.processor(texts)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    def mixture(self) -> dict[str, int]:
        """Examples of each task in one batch."""
        b = self.batch_size
        if self.family == "vl":
            return {"qa": b // 4, "read": 3 * b // 8, "sign": b // 8, "prose": b // 4}
        return {"qa": b // 4, "spoken": b // 8, "transcribe": 3 * b // 8, "match": b // 8, "prose": b // 5}

    def tower_part(self) -> dict:
        """A whole batch of the CTC task's examples (transcription for omni, reading strips for vl)."""
        return self.transcribe(self.batch_size) if self.family == "omni" else self.read(self.batch_size)

    def next(self) -> dict:
        makers = {"qa": self.qa, "read": self.read, "sign": self.signs, "spoken": self.spoken,
                  "transcribe": self.transcribe, "match": self.match, "prose": self.prose_batch}
        return {task: makers[task](n) for task, n in self.mixture().items()}


def train(family: str, out: Path, minutes: float, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
          resume: bool = False, tower_minutes: float = 0.0) -> dict:
    """Train for ``minutes`` of wall time in all (a cosine schedule over that time), the first ``tower_minutes``
    of it the media tower alone with its CTC head (a tower step costs a fraction of a whole-model step, so it
    sees several times more strips or clips a minute); with ``resume``, go on from the checkpoint an interrupted
    or shorter run of the same model and seed left (kept every few minutes)."""
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(data.moby_dick("train") + prompt_texts(family) * 50, vocab_size=2048)
    processor = RefProcessor(tokenizer, family=family)
    model = build_model(family, tokenizer).train()
    batches = Batches(processor, family, batch_size, random.Random(seed))
    ctc = TowerCTC(model, family)
    groups = _parameter_groups(model, ctc)
    params = [p for group in groups for p in group["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    checkpoint = switches().cache / "train" / f"ref-{family}-seed{seed}.pt"
    run = {"step": 0, "tower_steps": 0, "seconds": 0.0, "ema": None, "curve": []}
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        for part, state in zip((model, ctc, opt), saved["states"], strict=True):
            part.load_state_dict(state)
        batches.rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        run = {"tower_steps": 0, **saved["run"]}
        log.info("resumed %s at step %d (%.1f of %.1f minutes)", checkpoint, run["step"], run["seconds"] / 60, minutes)
    began, kept = time.time() - run["seconds"], time.time()
    while (elapsed := time.time() - began) < 60 * minutes:
        if elapsed < 60 * tower_minutes:  # first stage: the tower and its CTC head alone, on the task's media
            part = batches.tower_part()
            transcripts = part.pop("transcripts")
            ctc.encode(model, part)
            loss = ctc.loss(part, transcripts)
            run["tower_steps"] += 1
        else:
            loss = 0.0
            for part in batches.next().values():
                transcripts = part.pop("transcripts", None)
                loss = loss + model(**part, use_cache=False).loss
                if transcripts is not None:
                    loss = loss + CTC_WEIGHT * ctc.loss(part, transcripts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run["step"] += 1
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / 60 / minutes))  # down to a tenth at the end
        stage_steps = run["step"] - run["tower_steps"] if elapsed >= 60 * tower_minutes else run["step"]
        warm = min(1.0, stage_steps / 200)  # each stage warms up: in the second, the language model starts afresh
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"] * warm * cosine
        opt.step()
        value = float(loss.detach())
        run["ema"] = value if run["ema"] is None else 0.98 * run["ema"] + 0.02 * value
        if run["step"] % 100 == 0:
            log.info("step %d loss %.3f (%.0f s)", run["step"], run["ema"], elapsed)
            run["curve"].append([run["step"], round(run["ema"], 4), round(elapsed, 1)])
        if time.time() - kept > 300 or time.time() - began >= 60 * minutes:
            run["seconds"], kept = time.time() - began, time.time()
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            states = [model.state_dict(), ctc.state_dict(), opt.state_dict()]
            torch.save({"states": states, "rng": batches.rng.getstate(), "torch_rng": torch.get_rng_state(),
                        "run": run}, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {"steps": run["step"], "minutes": (time.time() - began) / 60, "seed": seed, "batch_size": batch_size,
              "lr": lr, "batch": batches.mixture(), "tower_ctc_weight": CTC_WEIGHT, "tower_lr": TOWER_LR,
              "threads": torch.get_num_threads(), "tower_minutes": tower_minutes, "tower_steps": run["tower_steps"],
              "loss_curve": run["curve"]}  # (step, smoothed summed loss of the batch's parts, seconds)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return refresh(out, family)


def refresh(out: Path, family: str) -> dict:
    """Re-cut the data slices of a trained model folder and re-measure its held-out scores."""
    from .registry import load

    export_slices(out, family)
    model, processor = load(out)
    run = json.loads((out / "training.json").read_text())
    run["test"] = evaluate_reference(model, processor, out)
    (out / "training.json").write_text(json.dumps(run, indent=1))
    log.info("%s: %s", out, run)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("ref-vl", "ref-omni"), default="ref-vl")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's weights folder")
    parser.add_argument("--minutes", type=float, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--tower-minutes", type=float, default=0.0,
                        help="the first minutes (of --minutes) train the media tower alone with its CTC head")
    parser.add_argument("--refresh", action="store_true", help="only re-cut slices and re-evaluate --out")
    parser.add_argument("--resume", action="store_true",
                        help="go on from this model and seed's last checkpoint (kept every 5 minutes in the cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out, family = args.out or WEIGHTS / args.model, args.model.removeprefix("ref-")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.refresh:
        refresh(out, family)
    else:
        train(family, out, args.minutes, args.seed, resume=args.resume, tower_minutes=args.tower_minutes)


if __name__ == "__main__":
    main()
