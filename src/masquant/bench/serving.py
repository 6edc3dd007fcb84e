"""``masquant bench --serving`` (in the venv of scripts/setup_vllm.sh): the reference models served by
vLLM with masquant's plugin, against masquant's own runtime on the same token ids.

Per setting (full precision, SmoothQuant and MASQuant at W8A8 / W4A8): the reference tasks scored by
both (answer ranking, NLL, prose perplexity); the KL between their next-token distributions on held-out
image and text prompts; each one's KL against full precision (the non-text gain, served); and vLLM's
throughput on image prefill and on decoding, with the routing switched off (``MASQUANT_ROUTING=0``:
every token on the text path, no patches) for the cost of routing.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..calibration.quantize import quantize
from ..config import QuantConfig
from ..io.export_vllm import export_vllm
from ..io.serialization import save
from ..refmodels import registry
from ..refmodels.evaluate import FULL, QUICK, audio_messages, calibration_inputs, evaluate_reference
from ..refmodels.processor import to_rgb
from ..refmodels.tasks import qa_messages
from .serving_speed import DECODE_TOKENS, speed_only, throughput, wide_markdown, wide_rows

log = logging.getLogger("masquant")

SETTINGS = (("FP32", "fp"), ("W8A8", "smoothquant"), ("W8A8", "masquant"), ("W4A8", "smoothquant"),
            ("W4A8", "masquant"))
BITS = {"W8A8": (8, 8), "W4A8": (4, 8)}


def next_token_requests(processor, name: str, n: int) -> dict[str, list]:
    """Held-out prompts by modality, ending where the model answers: image questions (test images),
    spoken-word questions (test clips, models with audio) or video questions (clips of test
    images, models without), and prose prefixes."""
    test = registry.slices(name, "test")
    out: dict[str, list] = {"image": []}
    for i, image in enumerate(test["item"][0][:n]):
        out["image"].append(_request(processor, qa_messages("item", i % 5), {"images": [to_rgb(image)]}))
    if "word" in test:
        out["audio"] = [_request(processor, audio_messages(i % 5), {"audio": [clip]})
                        for i, clip in enumerate(test["word"][0][:n])]
    else:  # (Qwen2.5-VL: 4-frame clips at 4 fps, where transformers and vLLM place the text after them alike)
        frames = [to_rgb(image) for image in test["item"][0][n: 5 * n]]
        out["video"] = [_request(processor, qa_messages("item", i % 5, media="video"),
                                 {"videos": [frames[4 * i: 4 * i + 4]], "fps": [4.0]}) for i in range(n)]
    out["text"] = [(processor.tokenizer(p)["input_ids"][:48], {}) for p in test["prose"][:n]]
    return out


def _request(processor, messages: list[dict], items: dict) -> tuple[list[int], dict]:
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor([text], **items)["input_ids"][0].tolist(), items


MEDIA_TEXT = {"images": "<|vision_start|><|image_pad|><|vision_end|>",
              "videos": "<|vision_start|><|video_pad|><|vision_end|>", "audio": "<|audio_start|><|AUDIO|><|audio_end|>"}


def runtime_inputs(model, processor, ids: list[int], items: dict) -> dict:
    """A transformers forward's inputs for token ids (placeholders expanded) and their media."""
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if items:
        media = processor(["".join(MEDIA_TEXT[k] * len(v) for k, v in items.items() if k in MEDIA_TEXT)], **items)
        batch.update({k: v for k, v in media.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")})
        if "mm_token_type_ids" in media:  # (Qwen2.5-VL marks its image tokens 1, its video tokens 2)
            ids = batch["input_ids"]
            batch["mm_token_type_ids"] = ((ids == model.config.image_token_id).long()
                                          + 2 * (ids == model.config.video_token_id).long())
    return batch


@torch.no_grad()
def runtime_next_token(model, processor, requests) -> np.ndarray:
    """``[requests, vocab]`` next-token log-probabilities from a transformers model (masquant's runtime)."""
    rows = []
    for ids, items in requests:
        logits = model(**runtime_inputs(model, processor, ids, items), use_cache=False).logits[0, -1]
        rows.append(torch.log_softmax(logits.double(), -1).numpy())
    return np.stack(rows)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean ``KL(p || q)`` over rows of log-probabilities, each row renormalized first (vLLM returns
    float32 log-probabilities); a token ``q`` gives no mass to costs +inf."""
    p, q = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (p, q))
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(np.isneginf(p), 0.0, np.exp(p) * (p - q))
    return float(terms.sum(-1).mean())


def _serve(directory: Path, processor, name, sizes, requests, speed_requests) -> dict:
    """Scores, next-token distributions and throughput of ``directory`` served by vLLM (float32)."""
    from ..serving.vllm_eval import VllmEngine

    with VllmEngine(directory, enable_prefix_caching=False) as engine:
        return {"scores": evaluate_reference(engine, processor, name, sizes),
                "next": {m: engine.next_token_logprobs(r) for m, r in requests.items()},
                "speed": throughput(engine, speed_requests)}


def run_serving_bench(models: tuple[str, ...] = ("ref-vl",), quick: bool = False, progress: bool = True,
                      wide: bool = True, done: dict | None = None, on_update=None) -> dict:
    """``{"models": rows per reference model and setting, "wide": the 3B-wide throughput rows}``.
    Rows in ``done`` (an earlier result: same model, setting and ``quick``) are reused; ``on_update(result)``
    is called after every new row (the command writes its page there, so a failure loses nothing)."""
    done = done or {"models": [], "wide": []}
    result = {"models": [], "wide": list(done["wide"]) if wide else []}
    update = on_update or (lambda _: None)
    if wide and not result["wide"]:
        with tempfile.TemporaryDirectory() as tmp:
            result["wide"] = wide_rows(Path(tmp))
        update(result)
    previous = {(r["model"], r["bits"], r["method"]): r for r in done["models"] if r["quick"] == quick}
    for row in model_rows(models, quick, progress, previous):
        result["models"].append(row)
        update(result)
    return result


def model_rows(models: tuple[str, ...], quick: bool, progress: bool, previous: dict | None = None):
    """Yield a row per reference model and setting (``previous`` ones as they are)."""
    previous = previous or {}
    sizes = QUICK if quick else FULL
    for name in models:
        if all((name, bits, method) in previous for bits, method in SETTINGS):
            yield from (previous[name, bits, method] for bits, method in SETTINGS)
            continue
        fp, processor = registry.load(name)
        calib = calibration_inputs(processor, name)
        if quick:
            calib = calib[::4]
        requests = next_token_requests(processor, name, 8 if quick else 24)
        fp_next = {m: runtime_next_token(fp, processor, r) for m, r in requests.items()}
        speed_requests = requests["image"][:8]  # (the throughput of image prompts: the routed, patched rows)
        with tempfile.TemporaryDirectory() as tmp:
            for bits, method in SETTINGS:
                if (name, bits, method) in previous:
                    yield previous[name, bits, method]
                    continue
                if method == "fp":
                    model, directory = fp, Path(tmp) / "fp-vllm"
                    export_vllm(registry.model_dir(name), directory)  # (as vLLM reads it: the Omni thinker wrapped)
                else:
                    model = copy.deepcopy(fp)
                    w, a = BITS[bits]
                    quantize(model, calib, QuantConfig(method=method, w_bits=w, a_bits=a, calib_batch=1,
                                                       **({"rank": 32, "epochs": 1 if quick else 2}
                                                          if method == "masquant" else {})), progress=progress)
                    saved, directory = Path(tmp) / f"{bits}-{method}", Path(tmp) / f"{bits}-{method}-vllm"
                    save(model, saved, processor=processor, reference=name)
                    export_vllm(saved, directory)
                runtime = {"scores": evaluate_reference(model, processor, name, sizes),
                           "next": {m: runtime_next_token(model, processor, r) for m, r in requests.items()}}
                served = _serve(directory, processor, name, sizes, requests, speed_requests)
                flips = sum(a != b for t in runtime["scores"] if isinstance(runtime["scores"][t], dict)
                            for a, b in zip(runtime["scores"][t]["picks"], served["scores"][t]["picks"], strict=True))
                row = {"model": name, "bits": bits, "method": method, "quick": quick, "flips": int(flips),
                       "runtime": runtime["scores"], "served": served["scores"], "speed": served["speed"],
                       "kl_served_runtime": {m: kl(runtime["next"][m], served["next"][m]) for m in requests},
                       "kl_fp_runtime": {m: kl(fp_next[m], runtime["next"][m]) for m in requests},
                       "kl_fp_served": {m: kl(fp_next[m], served["next"][m]) for m in requests}}
                if method == "fp":
                    row["speed_bf16"] = speed_only(directory, speed_requests, dtype="bfloat16")
                elif method == "masquant":
                    row["speed_unrouted"] = speed_only(directory, speed_requests, routing=False)
                log.info("%s %s %s: served %s", name, bits, method, row["served"])
                yield row


HEADER = """# Serving in vLLM with per-token modality routing

Generated by `{command}` in the venv of `scripts/setup_vllm.sh` (vLLM {vllm}, CPU build, torch {torch},
{cpu}); do not edit by hand. Each quantized model is exported with `masquant export --format vllm`
and served by vLLM with masquant's plugin (`masquant.serving`): one stored weight per linear, the
smoothing vectors and CMC patches applied to the tokens vLLM marks as image / audio placeholders.
"runtime" is masquant's own PyTorch runtime on the same token ids. Accuracy ranks the answers by
their prompt log-probabilities (vLLM's `prompt_logprobs`), in % on the reference test slices;
"answers ranked differently" counts test questions whose top answer differs between the two (near
ties that float noise decides). KL: mean over held-out prompts of the next-token distributions
(vLLM's full-vocabulary `logprobs`), per prompt modality.

## Serve a model

```bash
./scripts/setup_vllm.sh                                   # .venv-vllm: vLLM's CPU build + masquant
.venv/bin/masquant quantize --model ref-omni --method masquant --w-bits 4 --out q-omni
.venv/bin/masquant export q-omni --format vllm --out q-omni-vllm
.venv-vllm/bin/vllm serve q-omni-vllm --dtype float32 --enforce-eager
```

```python
from vllm import LLM, SamplingParams   # in .venv-vllm

if __name__ == "__main__":              # vLLM spawns its engine
    llm = LLM(model="q-omni-vllm", dtype="float32", enforce_eager=True)
    prompt = ("<|im_start|>user\\n<|audio_start|><|AUDIO|><|audio_end|>Which word is spoken?<|im_end|>\\n"
              "<|im_start|>assistant\\n")
    request = {"prompt": prompt, "multi_modal_data": {"audio": (waveform, 16000)}}  # float32 samples, 16 kHz
    print(llm.generate(request, SamplingParams(max_tokens=8))[0].outputs[0].text)
```
"""


def markdown(result: dict) -> str:
    rows = result["models"]
    if not rows:
        return wide_markdown(result)
    tasks = [t for t in ("item", "digit", "word", "match") if any(t in r["runtime"] for r in rows)]
    mods = list(dict.fromkeys(m for r in rows for m in r["kl_served_runtime"]))
    head = ["model", "bits", "method", *(f"{t} runtime / served" for t in tasks), "prose ppl runtime / served",
            "max |acc gap| (points)", "answers ranked differently", *(f"KL served vs runtime, {m}" for m in mods)]
    lines = ["## Parity with masquant's runtime", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        run, srv = r["runtime"], r["served"]
        gap = max(abs(100 * (run[t]["accuracy"] - srv[t]["accuracy"])) for t in tasks if t in run)
        lines.append("| " + " | ".join([r["model"], r["bits"], r["method"],
                                        *(f"{100 * run[t]['accuracy']:.1f} / {100 * srv[t]['accuracy']:.1f}"
                                          if t in run else "-" for t in tasks),
                                        f"{run['prose_ppl']:.3f} / {srv['prose_ppl']:.3f}", f"{gap:.1f}",
                                        str(r.get("flips", "-")),
                                        *(f"{r['kl_served_runtime'][m]:.1e}" if m in r["kl_served_runtime"]
                                          else "-" for m in mods)]) + " |")
    lines += ["", "## What quantization costs, served and in the runtime (KL against full precision)", "",
              "| model | bits | method | " + " | ".join(f"{m}: runtime / served" for m in mods) + " |",
              "|---" * (3 + len(mods)) + "|"]
    for r in rows:
        if r["method"] != "fp":
            lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | " + " | ".join(
                f"{r['kl_fp_runtime'][m]:.4f} / {r['kl_fp_served'][m]:.4f}" if m in r["kl_fp_runtime"] else "-"
                for m in mods) + " |")
    lines += ["", "## Throughput in vLLM (tokens/s; 8 image prompts, prefill, then "
              f"{DECODE_TOKENS} decoded tokens each)", "",
              "| model | setting | prefill tok/s | decode tok/s |", "|---|---|---|---|"]
    for r in rows:
        label = "FP32" if r["method"] == "fp" else f"{r['method']} {r['bits']}"
        speeds = [(label, r["speed"])]
        if "speed_bf16" in r:
            speeds.append(("BF16", r["speed_bf16"]))
        if "speed_unrouted" in r:
            speeds.append((f"{label}, routing off (every token text, no patches)", r["speed_unrouted"]))
        lines += [f"| {r['model']} | {lab} | {s['prefill_tok_s']:.0f} | {s['decode_tok_s']:.0f} |" for lab, s in speeds]
    return "\n".join(lines) + "\n" + wide_markdown(result)


def write(result: dict, out: Path, results: Path | None, command: str) -> str:
    import platform

    import vllm

    from .pages import write_page
    from .perf import cpu_name

    cpu = f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}"
    text = HEADER  # (its Python sample has braces: the fields are replaced one by one)
    for field, value in (("command", command), ("vllm", vllm.__version__), ("torch", torch.__version__), ("cpu", cpu)):
        text = text.replace("{" + field + "}", value)
    text += "\n" + markdown(result) + "\n"
    write_page(out, "serving_bench", result, text, results)
    return text
