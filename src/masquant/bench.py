"""``masquant bench``: every method and bit-width on the reference models.

Writes ``bench.json`` and ``bench.md`` (and ``bench.png`` when matplotlib is installed);
``--results docs/RESULTS.md`` regenerates the results page from the same run.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from .api import quantize
from .config import QuantConfig
from .evaluate import compare
from .qlinear import QuantLinear
from .refmodels import registry
from .refmodels.evaluate import FULL, QUICK, calibration_inputs, comparison_inputs, evaluate_reference

log = logging.getLogger("masquant")

WA_METHODS = ("rtn", "smoothquant", "awq", "mbq", "mas", "masquant")
WEIGHT_ONLY_METHODS = ("rtn", "awq", "mbq")
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A6": (4, 6), "W4A16": (4, 16)}


def settings(quick: bool) -> list[tuple[str, str]]:
    if quick:
        return [("W4A8", m) for m in ("rtn", "smoothquant", "masquant")]
    rows = [(bits, m) for bits in ("W8A8", "W4A8", "W4A6") for m in WA_METHODS]
    return rows + [("W4A16", m) for m in WEIGHT_ONLY_METHODS]


def config_for(bits: str, method: str, quick: bool) -> QuantConfig:
    w_bits, a_bits = BITS[bits]
    extra = {"w_group_size": 128, "w_symmetric": False} if a_bits == 16 else {}
    return QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, rank=32, epochs=1 if quick else 2, **extra)


def storage_bytes(model: torch.nn.Module) -> dict[str, int]:
    total = {"weight": 0, "patches": 0}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for k, v in module.storage_bytes().items():
                total[k] += v
    return total


def run_settings(name: str, todo: list[tuple[str, str]], quick: bool, progress: bool = True) -> list[dict]:
    """Full precision plus each ``(bits, method)`` on one reference model."""
    sizes = QUICK if quick else FULL
    fp, processor = registry.load(name)
    calib = calibration_inputs(processor, name)
    if quick:
        calib = calib[::4]
    held_out = comparison_inputs(processor, name, n=8 if quick else 24)
    rows = [{"model": name, "bits": "FP32", "method": "fp", **evaluate_reference(fp, processor, name, sizes)}]
    for bits, method in todo:
        qmodel = copy.deepcopy(fp)
        start = time.perf_counter()
        report = quantize(qmodel, calib, config_for(bits, method, quick), progress=progress)
        seconds = time.perf_counter() - start
        scores = compare(fp, qmodel, held_out)
        row = {"model": name, "bits": bits, "method": method, **evaluate_reference(qmodel, processor, name, sizes),
               "decoder_sqnr": scores["decoder_sqnr"], "kl": scores["kl"]["all"], "calib_seconds": seconds,
               "storage": storage_bytes(qmodel), "calib_samples": report.samples}
        log.info("%s %s %s: %s", name, bits, method, {k: row[k] for k in ("item", "digit", "prose_ppl")})
        rows.append(row)
    return rows


def run_bench(models: tuple[str, ...] = ("ref-vl",), quick: bool = False, progress: bool = True) -> list[dict]:
    return [row for name in models for row in run_settings(name, settings(quick), quick, progress)]


TASKS = ("item", "digit", "word", "match")
MODALITIES = ("text", "vision", "audio")


def markdown(rows: list[dict]) -> str:
    """One table per model: task accuracies, prose perplexity, per-modality SQNR, KL, storage, time."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == name]
        tasks = [t for t in TASKS if t in part[0]]
        mods = [m for m in MODALITIES if any(m in r.get("decoder_sqnr", {}) for r in part)]
        head = (["bits", "method"] + [f"{t} acc" for t in tasks] + ["prose ppl"] + [f"SQNR {m}" for m in mods]
                + ["KL", "weights+patches MB", "calib s"])
        lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in part:
            cells = [r["bits"], r["method"], *(f"{100 * r[t]['accuracy']:.1f}" for t in tasks), f"{r['prose_ppl']:.2f}"]
            if "kl" in r:
                store = r["storage"]
                cells += [f"{r['decoder_sqnr'][m]:.1f}" if m in r["decoder_sqnr"] else "-" for m in mods]
                cells += [f"{r['kl']:.4f}", f"{(store['weight'] + store['patches']) / 2**20:.2f}",
                          f"{r['calib_seconds']:.0f}"]
            else:
                cells += ["-"] * (len(mods) + 3)
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no plot")
        return False
    quant = [r for r in rows if "decoder_sqnr" in r]
    bits = sorted({r["bits"] for r in quant}, key=list(BITS).index)
    methods = [m for m in WA_METHODS if any(r["method"] == m for r in quant)]
    panels = [(name, m) for name in dict.fromkeys(r["model"] for r in quant) for m in MODALITIES
              if any(m in r["decoder_sqnr"] for r in quant if r["model"] == name)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (name, modality) in zip(axes[0], panels, strict=True):
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            ys = [next((r["decoder_sqnr"].get(modality, 0) for r in quant
                        if r["model"] == name and r["bits"] == b and r["method"] == method), 0) for b in bits]
            ax.bar([i + j * width for i in range(len(bits))], ys, width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bits))], bits)
        ax.set_title(f"{name}: {modality} tokens", fontsize=10)
        ax.set_ylabel("dB")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SQNR of the decoder output on held-out prompts (dB, higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(rows: list[dict], out: Path, results: Path | None = None, command: str = "masquant bench") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (out / "bench.md").write_text(table + "\n")
    has_plot = plot(rows, out / "bench.png")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        image = ""
        if has_plot:
            target = results.parent / "results.png"
            target.write_bytes((out / "bench.png").read_bytes())
            image = "\n![decoder-output SQNR per method and bit-width](results.png)\n"
        results.write_text(RESULTS_HEADER.format(command=command) + table + "\n" + image)
    log.info("wrote %s", out)


RESULTS_HEADER = """# Results on the reference models

Generated by `{command}`; do not edit by hand. Accuracy: the answer ranked first by
log-likelihood among the class names (held-out test slices); prose perplexity on held-out
Moby-Dick chapters; SQNR of the last decoder layer's output (input of the final norm) and
KL of the next-token distribution against full precision on held-out prompts. Storage is
the quantized decoder linears at rest (weights at their bit width, patches at their dtype).

"""
