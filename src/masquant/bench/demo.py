"""The built-in default job.

``run_demo``: the shipped reference model ``ref-vl`` (a small Qwen2.5-VL trained on real
data) quantized at W4A8 with SmoothQuant and with MASQuant; prints full precision vs both,
per modality (image tasks: accuracy; text: prose perplexity; SQNR per token modality).

``run_tiny_demo``: tiny random-weight Qwen2.5-VL / Omni-thinker models and every method.
The models are random-weight instances of the real transformers classes and the
calibration / held-out inputs are synthetic, so the numbers say that the pipeline works
end to end, not how the methods rank on a trained model (that is the reference models'
job). It prints, per method and bit-width, the per-modality SQNR of the decoder output on
held-out samples and the logit cosine to full precision.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..calibration.quantize import quantize
from ..config import QuantConfig, options_for
from ..evaluation.evaluate import compare
from ..refmodels import tiny

log = logging.getLogger("masquant")

SETTINGS = [("rtn", 8, 8), ("smoothquant", 8, 8), ("awq", 8, 8), ("mbq", 8, 8), ("masquant", 8, 8),
            ("rtn", 4, 8), ("smoothquant", 4, 8), ("awq", 4, 8), ("mbq", 4, 8), ("mas", 4, 8), ("masquant", 4, 8),
            ("rtn", 4, 16), ("awq", 4, 16), ("mbq", 4, 16)]


def _models(quick: bool) -> list[tuple[str, torch.nn.Module, dict]]:
    hidden, layers = (64, 2) if quick else (128, 4)
    return [
        ("tiny-qwen2.5-vl", tiny.tiny_qwen2_5_vl(hidden, layers), {"family": "vl", "image": True, "image_grid": 8}),
        ("tiny-qwen2.5-omni-thinker", tiny.tiny_qwen2_5_omni_thinker(hidden, layers),
         {"family": "omni", "image": True, "audio": True, "image_grid": 8}),
    ]


def run_demo(quick: bool = False, out: Path | None = None, progress: bool = True) -> list[dict]:
    """ref-vl at W4A8: FP vs SmoothQuant vs MASQuant, per modality; ref-omni too where it was trained for spoken
    sentences (its WER is the demo's audio line)."""
    from ..refmodels.registry import model_dir, slices
    from .accuracy import run_settings

    try:
        model_dir("ref-vl")
    except FileNotFoundError as err:
        log.warning("%s; running the tiny-model demo instead", err)
        return run_tiny_demo(quick, out, progress)
    names = ["ref-vl"] + (["ref-omni"] if "sentence" in slices("ref-omni", "test") else [])
    rows = []
    for name in names:
        part = run_settings(name, [("W4A8", "smoothquant"), ("W4A8", "masquant")], quick, progress)
        print(format_reference_table(part))
        rows += part
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(rows, indent=1))
    return rows


# (column, the row's task, its score in percent; None: the value itself) of the demo's table, shown where the
# first row has the task
_COLUMNS = (("item acc (vision)", "item", "accuracy"), ("digit acc (vision)", "digit", "accuracy"),
            ("read exact (vision)", "read", "exact"), ("sign exact (vision)", "sign", "exact"),
            ("word acc (audio)", "word", "accuracy"), ("sentence WER (audio)", "sentence", "wer"),
            ("prose ppl (text)", "prose_ppl", None))


def _cell(row: dict, task: str, score: str | None) -> str:
    return f"{row[task]:.2f}" if score is None else f"{100 * row[task][score]:.1f}"


def format_reference_table(rows: list[dict]) -> str:
    """One reference model's demo rows: its tasks' scores and the SQNR of each token modality."""
    columns = [c for c in _COLUMNS if c[1] in rows[0]]
    mods = [m for m in ("text", "vision", "audio") if any(m in r.get("decoder_sqnr", {}) for r in rows)]
    head = [rows[0]["model"], *(label for label, _, _ in columns), *(f"SQNR {m}" for m in mods)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.get("decoder_sqnr", {})
        name = "full precision" if r["method"] == "fp" else f"{r['method']} {r['bits']}"
        cells = [name, *(_cell(r, task, score) for _, task, score in columns),
                 *(f"{s[m]:.1f}" if m in s else "-" for m in mods)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_tiny_demo(quick: bool = False, out: Path | None = None, progress: bool = True) -> list[dict]:
    """Quantize both tiny models with every baseline; return (and print) the results."""
    n_calib, n_test = (4, 2) if quick else (16, 8)
    rows = []
    for name, model, kind in _models(quick):
        calib = [tiny.tiny_sample(i, **kind) for i in range(n_calib)]
        test = [tiny.tiny_sample(10_000 + i, **kind) for i in range(n_test)]
        for method, w_bits, a_bits in SETTINGS:
            config = QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, w_group_size=0 if a_bits < 16 else 32,
                                 w_symmetric=a_bits < 16, **options_for(method, rank=0.25))
            qmodel = copy.deepcopy(model)
            report = quantize(qmodel, calib, config, progress=progress)
            scores = compare(model, qmodel, test)
            rows.append({"model": name, "method": method, "bits": f"W{w_bits}A{a_bits}",
                         "decoder_sqnr": scores["decoder_sqnr"], "logit_cosine": scores["logit_cosine"]["all"],
                         "calib_seconds": report.seconds})
    print(format_table(rows))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(rows, indent=1))
        log.info("wrote %s", out / "demo.json")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | method | bits | SQNR text | SQNR vision | SQNR audio | logit cos | calib s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["decoder_sqnr"]
        cells = [f"{s[k]:.1f}" if k in s else "-" for k in ("text", "vision", "audio")]
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | " + " | ".join(cells)
                     + f" | {r['logit_cosine']:.4f} | {r['calib_seconds']:.1f} |")
    return "\n".join(lines)
