"""Train ``ref-vl``: a small ``Qwen2_5_VLForConditionalGeneration`` on real offline data.

``python -m masquant.refmodels.train_vl --out models/ref-vl --minutes 45`` regenerates the
shipped model from scratch with a fixed seed (data: ``scripts/prepare_data.sh``).
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

from . import data
from .processor import RefProcessor, to_rgb, train_tokenizer
from .tasks import TEMPLATES, answer_labels, image_accuracy, prompt_texts, prose_perplexity, qa_messages

log = logging.getLogger("masquant.train")


def build_model(vocab_size: int, tokenizer) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    vision = dict(depth=4, hidden_size=128, intermediate_size=384, num_heads=4, in_channels=3, patch_size=7,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=28, out_hidden_size=256,
                  fullatt_block_indexes=[1, 3])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                              video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                              vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    return Qwen2_5_VLForConditionalGeneration(config)


class Batches:
    """Random training batches mixing image QA (Fashion-MNIST, digits) and prose."""

    def __init__(self, processor: RefProcessor, batch_size: int, rng: random.Random):
        self.processor, self.batch_size, self.rng = processor, batch_size, rng
        self.images = {s.name: s for s in data.image_sets("train")}
        self.prose = data.moby_dick("train")

    def qa(self) -> tuple[str, object]:
        task = "item" if self.rng.random() < 0.7 else "digit"
        ds = self.images[task]
        i = self.rng.randrange(len(ds.labels))
        msgs = qa_messages(task, self.rng.randrange(len(TEMPLATES[task])), ds.classes[ds.labels[i]])
        return self.processor.apply_chat_template(msgs), to_rgb(ds.images[i])

    def prose_window(self, words: int = 40) -> str:
        para = self.prose[self.rng.randrange(len(self.prose))].split()
        start = self.rng.randrange(max(1, len(para) - words))
        return " ".join(para[start: start + words])

    def next(self) -> dict:
        n_qa = round(self.batch_size * 0.65)
        qa = [self.qa() for _ in range(n_qa)]
        batch = self.processor([t for t, _ in qa], images=[im for _, im in qa])
        batch["labels"] = answer_labels(batch["input_ids"], self.processor).masked_fill(batch["attention_mask"] == 0,
                                                                                       -100)
        prose = self.processor([self.prose_window() for _ in range(self.batch_size - n_qa)])
        prose["labels"] = prose["input_ids"].masked_fill(prose["attention_mask"] == 0, -100)
        return {"qa": batch, "prose": prose}


def train(out: Path, minutes: float, seed: int = 0, batch_size: int = 32, lr: float = 2e-3) -> dict:
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(data.moby_dick("train") + prompt_texts() * 50, vocab_size=2048)
    processor = RefProcessor(tokenizer)
    model = build_model(len(tokenizer), tokenizer).train()
    batches = Batches(processor, batch_size, random.Random(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    deadline, start, step, ema = time.time() + 60 * minutes, time.time(), 0, None
    est_steps = None
    while time.time() < deadline:
        b = batches.next()
        loss = model(**b["qa"], use_cache=False).loss + model(**b["prose"], use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step += 1
        if step == 20:
            est_steps = int(20 * 60 * minutes / (time.time() - start))
        frac = min(1.0, step / est_steps) if est_steps else 0.0
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if step % 100 == 0:
            log.info("step %d loss %.3f (%.0f s)", step, ema, time.time() - start)
    model.eval()
    metrics = evaluate(model, processor)
    metrics.update(steps=step, minutes=(time.time() - start) / 60, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(metrics, indent=1))
    log.info("saved %s: %s", out, metrics)
    return metrics


def evaluate(model, processor: RefProcessor, n: int = 200) -> dict:
    out = {s.name: image_accuracy(model, processor, s, n) for s in data.image_sets("test")}
    out["prose_ppl"] = prose_perplexity(model, processor, data.moby_dick("test")[:100])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/ref-vl"))
    parser.add_argument("--minutes", type=float, default=45)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.out, args.minutes, args.seed)


if __name__ == "__main__":
    main()
