"""``masquant bench``: every method and bit-width on the reference models.

Writes ``bench.json`` and ``bench.md`` (and ``bench.png`` when matplotlib is installed);
``--results docs/results/RESULTS.md`` regenerates the results page from the same run.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from ..calibration.quantize import quantize
from ..config import QuantConfig, options_for
from ..evaluation.evaluate import compare
from ..refmodels import registry
from ..refmodels.evaluate import FULL, QUICK, calibration_inputs, comparison_inputs, evaluate_reference
from ..runtime.qlinear import QuantLinear
from . import seeds

log = logging.getLogger("masquant")

WA_METHODS = ("rtn", "smoothquant", "awq", "mbq", "mas", "masquant")
WEIGHT_ONLY_METHODS = ("rtn", "awq", "mbq")
DOWN_VARIANTS = ("smoothquant+down", "masquant+down")  # also smooth the down_proj input
# the same low-rank budget spent on all tokens, MASQuant's text patch, GPTQ rounding
BUDGET_VARIANTS = ("lrc", "masquant+text", "smoothquant+gptq", "masquant+gptq")
VARIANTS = {"down": {"smooth_down_proj": True}, "text": {"text_patch": True}, "gptq": {"w_rounding": "gptq"}}
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A6": (4, 6), "W4A16": (4, 16)}


def settings(quick: bool) -> list[tuple[str, str]]:
    """``(bits, method)`` pairs; a method ``"x+v"`` is method x with the variant ``v`` of ``VARIANTS``
    (``down``: ``smooth_down_proj=True``, ``text``: ``text_patch=True``, ``gptq``: ``w_rounding="gptq"``)."""
    if quick:
        return [("W4A8", m) for m in ("rtn", "smoothquant", "masquant")]
    rows = [(bits, m) for bits in ("W8A8", "W4A8", "W4A6") for m in WA_METHODS]
    rows += [(bits, m) for bits in ("W4A8", "W4A6") for m in DOWN_VARIANTS]
    rows += [(bits, m) for bits in ("W4A8", "W8A8", "W4A6") for m in BUDGET_VARIANTS]  # (the paper's W4A8 first)
    return rows + [("W4A16", m) for m in WEIGHT_ONLY_METHODS] + seeds.seeded_settings(WA_METHODS)


def config_for(bits: str, method: str, quick: bool) -> QuantConfig:
    w_bits, a_bits = BITS[bits]
    method, seed = seeds.split(method)
    base, *variants = method.split("+")
    if any(v not in VARIANTS for v in variants):
        raise ValueError(f"unknown bench variant {method!r} (METHOD or METHOD+VARIANT, variants: "
                         f"{', '.join(VARIANTS)})")
    extra = {"w_group_size": 128, "w_symmetric": False} if a_bits == 16 else {}
    for v in variants:
        extra.update(VARIANTS[v])
    if extra.get("text_patch") and "text_patch" not in options_for(base, text_patch=True):
        raise ValueError(f"bench variant {method!r}: {base} has no text patch")
    own = options_for(base, rank=32, epochs=1 if quick else 2, text_patch=extra.pop("text_patch", False))
    return QuantConfig(method=base, w_bits=w_bits, a_bits=a_bits, calib_batch=1, seed=seed or 0, **extra,
                       **own)  # (calib_batch 1: the paper's schedule)


def storage_bytes(model: torch.nn.Module) -> dict[str, int]:
    total = {"weight": 0, "patches": 0}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for k, v in module.storage_bytes().items():
                total[k] += v
    return total


def _key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["bits"], row["method"]


def run_settings(name: str, todo: list[tuple[str, str]], quick: bool, progress: bool = True,
                 done: list[dict] = (), on_row=None) -> list[dict]:
    """Full precision plus each ``(bits, method)`` on one reference model.

    Rows already in ``done`` (same model, bits, method and ``quick``) are reused, not recomputed;
    ``on_row(rows)`` is called after every new row (the bench saves its JSON there).
    """
    sizes = QUICK if quick else FULL
    previous = {_key(r): r for r in done if r["model"] == name and r.get("quick", False) == quick}
    fp, processor = registry.load(name)
    rows = []

    def finish(row: dict) -> None:
        rows.append(row)
        if on_row is not None and _key(row) not in previous:
            on_row(rows)

    finish(previous.get((name, "FP32", "fp"))
           or {"model": name, "bits": "FP32", "method": "fp", "quick": quick,
               **evaluate_reference(fp, processor, name, sizes)})
    if any((name, bits, method) not in previous for bits, method in todo):
        calib = calibration_inputs(processor, name)
        if quick:
            calib = calib[::4]
        held_out = comparison_inputs(processor, name, n=8 if quick else 24)
    caches: dict = {}  # per calibration set: decoder inputs and gradient ratios, shared by its settings
    for bits, method in todo:
        if (name, bits, method) in previous:
            log.info("%s %s %s: reusing the saved row", name, bits, method)
            finish(previous[name, bits, method])
            continue
        qmodel = copy.deepcopy(fp)
        start = time.perf_counter()
        seed = seeds.split(method)[1]
        report = quantize(qmodel, seeds.calibration_half(calib, seed), config_for(bits, method, quick),
                          progress=progress, cache=caches.setdefault(seed, {}))
        seconds = time.perf_counter() - start
        scores = compare(fp, qmodel, held_out)
        row = {"model": name, "bits": bits, "method": method, "quick": quick,
               **evaluate_reference(qmodel, processor, name, sizes),
               "decoder_sqnr": scores["decoder_sqnr"], "kl": scores["kl"]["all"], "calib_seconds": seconds,
               "storage": storage_bytes(qmodel), "calib_samples": report.samples}
        log.info("%s %s %s: %s, prose ppl %.2f", name, bits, method,
                 ", ".join([*(f"{t} {100 * row[t]['accuracy']:.1f}%" for t in TASKS if t in row),
                            *(f"{t} {m} {100 * row[t][m]:.1f}%" for t, m in GENERATIVE.items() if t in row)]),
                 row["prose_ppl"])
        finish(row)
    return rows


def saved_rows(models: tuple[str, ...], out: Path, quick: bool = False) -> list[dict]:
    """The rows saved in ``out/bench.json`` for ``models``, in the bench's order, computing nothing (a page from
    runs made before; settings never run are left out)."""
    saved = out / "bench.json"
    if not saved.exists():
        raise FileNotFoundError(f"{saved}: no saved rows; run `masquant bench` (with --out {out}) first")
    found = {_key(r): r for r in json.loads(saved.read_text()) if r.get("quick", False) == quick}
    order = [("FP32", "fp"), *settings(quick)]
    rows = [found[name, bits, method] for name in models for bits, method in order if (name, bits, method) in found]
    if not rows:
        raise ValueError(f"{saved} holds no rows of {', '.join(models)}")
    return rows


def run_bench(models: tuple[str, ...] = ("ref-vl",), quick: bool = False, progress: bool = True,
              out: Path | None = None, resume: bool = False) -> list[dict]:
    """Every setting on every model. With ``out``, ``bench.json`` is rewritten after each row,
    so an interrupted run loses at most the row in progress; ``resume`` reuses those rows."""
    saved = out / "bench.json" if out is not None else None
    done = json.loads(saved.read_text()) if resume and saved is not None and saved.exists() else []
    finished: list[dict] = []

    def save(rows: list[dict]) -> None:
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            merged = {_key(r): r for r in [*done, *finished, *rows]}
            tmp = saved.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(list(merged.values()), indent=1))
            tmp.replace(saved)

    for name in models:
        finished += run_settings(name, settings(quick), quick, progress, done, save)
    return finished


TASKS = ("item", "digit", "word", "match")
GENERATIVE = {"sentence": "wer", "read": "exact", "sign": "exact"}  # greedy-answer tasks and their headline score
MODALITIES = ("text", "vision", "audio")


def _generative_cell(score: dict, metric: str) -> str:
    return f"{100 * score[metric]:.1f} / {100 * score['cer']:.1f}"


def markdown(rows: list[dict]) -> str:
    """One table per model: task accuracies, prose perplexity, per-modality SQNR, KL, storage, time."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == name]
        tasks = [t for t in TASKS if t in part[0]]
        made = [t for t in GENERATIVE if t in part[0]]
        mods = [m for m in MODALITIES if any(m in r.get("decoder_sqnr", {}) for r in part)]
        head = (["bits", "method"] + [f"{t} acc % / NLL" for t in tasks]
                + [f"{t} {'WER' if GENERATIVE[t] == 'wer' else 'EM'} / CER %" for t in made] + ["prose ppl"]
                + [f"SQNR {m}" for m in mods] + ["KL", "weights+patches MB", "calib s"])
        lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in part:
            scores = (f"{100 * r[t]['accuracy']:.1f} / {r[t]['answer_nll']:.3f}" for t in tasks)
            made_cells = (_generative_cell(r[t], GENERATIVE[t]) if t in r else "-" for t in made)
            cells = [r["bits"], r["method"], *scores, *made_cells, f"{r['prose_ppl']:.2f}"]
            if "kl" in r:
                store = r.get("storage")
                cells += [f"{r['decoder_sqnr'][m]:.1f}" if m in r["decoder_sqnr"] else "-" for m in mods]
                cells += [f"{r['kl']:.4f}", f"{(store['weight'] + store['patches']) / 2**20:.2f}" if store else "-",
                          f"{r['calib_seconds']:.0f}" if "calib_seconds" in r else "-"]
            else:
                cells += ["-"] * (len(mods) + 3)
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


TASK_MODALITY = {"item": "vision", "digit": "vision", "word": "audio", "match": "audio"}  # match: image + audio
BASELINES = ("rtn", "smoothquant", "mbq")


def _find(part: list[dict], bits: str, method: str) -> dict | None:
    return next((r for r in part if r["bits"] == bits and r["method"] == method), None)


def goals(rows: list[dict]) -> str:
    """The issue's goals, measured: W8A8 MASQuant vs FP per task; at W4A8 / W4A6, MASQuant vs the
    best of RTN / SmoothQuant / MBQ and vs MAS-only on each non-text modality (accuracy points
    of its tasks, answer NLL and decoder-output SQNR)."""
    lines = ["| model | check | task / modality | MASQuant | reference | difference | goal met |", "|---" * 7 + "|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == name]
        fp, w8 = _find(part, "FP32", "fp"), _find(part, "W8A8", "masquant")
        tasks = [t for t in TASKS if t in part[0]]
        if fp and w8:
            for t in tasks:
                drop = round(100 * (fp[t]["accuracy"] - w8[t]["accuracy"]), 1) + 0.0  # no "-0.0"
                lines.append(f"| {name} | W8A8 within 1 pt of FP | {t} | {100 * w8[t]['accuracy']:.1f} | "
                             f"FP {100 * fp[t]['accuracy']:.1f} | {0.0 - drop:+.1f} pt | "
                             f"{'yes' if drop <= 1 else 'no'} |")
        for bits in ("W4A8", "W4A6"):
            mq, mas = _find(part, bits, "masquant"), _find(part, bits, "mas")
            base = [r for b in BASELINES if (r := _find(part, bits, b))]
            if not (mq and base):
                continue
            for t in tasks:
                best = max(base, key=lambda r, t=t: r[t]["accuracy"])
                gain = round(100 * (mq[t]["accuracy"] - best[t]["accuracy"]), 1) + 0.0
                nll = min(r[t]["answer_nll"] for r in base)
                lines.append(f"| {name} | {bits} beats RTN/SQ/MBQ | {t} ({TASK_MODALITY[t]}) | "
                             f"{100 * mq[t]['accuracy']:.1f}, NLL {mq[t]['answer_nll']:.3f} | "
                             f"{best['method']} {100 * best[t]['accuracy']:.1f}, best NLL {nll:.3f} | "
                             f"{gain:+.1f} pt, NLL {mq[t]['answer_nll'] - nll:+.3f} | "
                             f"{'yes' if gain >= 1 else 'no'} |")
                if mas:
                    gap = round(100 * (mas[t]["accuracy"] - mq[t]["accuracy"]), 1) + 0.0
                    lines.append(f"| {name} | {bits} within 2 pt of MAS-only | {t} | {100 * mq[t]['accuracy']:.1f} | "
                                 f"MAS {100 * mas[t]['accuracy']:.1f} | {0.0 - gap:+.1f} pt | "
                                 f"{'yes' if gap <= 2 else 'no'} |")
            for m in (m for m in MODALITIES[1:] if m in mq["decoder_sqnr"]):
                best = max(base, key=lambda r, m=m: r["decoder_sqnr"][m])
                gain = mq["decoder_sqnr"][m] - best["decoder_sqnr"][m]
                lines.append(f"| {name} | {bits} SQNR vs RTN/SQ/MBQ | {m} tokens | {mq['decoder_sqnr'][m]:.1f} dB | "
                             f"{best['method']} {best['decoder_sqnr'][m]:.1f} dB | {gain:+.1f} dB | "
                             f"{'yes' if gain >= 1 else 'no'} |")
    return "\n".join(lines)


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
    methods = list(dict.fromkeys(r["method"] for r in quant))
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


def write(rows: list[dict], out: Path, results: Path | None = None, command: str = "masquant bench",
          peers: list[dict] = ()) -> None:
    """The bench's files in ``out`` and, with ``results``, the results page; ``peers`` (llm-compressor's scored
    rows) join the tables and the comparison section."""
    from .comparison import NOTE, comparison

    everything = [*rows, *peers]
    spread = seeds.section(everything)
    rows = [r for r in everything if not seeds.is_seeded(r)]  # (the halves' rows: their own section)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(everything, indent=1))
    table = markdown(rows)
    (out / "bench.md").write_text(table + "\n")
    has_plot = plot(rows, out / "bench.png")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        image = ""
        if has_plot:
            (results.parent / "results.json").write_text(json.dumps(everything, indent=1))
            target = results.parent / "results.png"
            target.write_bytes((out / "bench.png").read_bytes())
            image = "\n![decoder-output SQNR per method and bit-width](results.png)\n"
        results.write_text(RESULTS_HEADER.format(command=command) + table + "\n" + image
                           + "\n## Same budget, GPTQ and llm-compressor\n\n" + NOTE + comparison(rows)
                           + "\n## The issue's goals, measured\n\n" + GOALS_NOTE + goals(rows) + "\n"
                           + (f"\n## Calibration seeds\n\n{seeds.NOTE}{spread}\n" if spread else ""))
    log.info("wrote %s", out)


RESULTS_HEADER = """# Results on the reference models

Generated by `{command}`; do not edit by hand. Accuracy: the answer ranked first by
log-likelihood among the class names (held-out test slices); prose perplexity on held-out
Moby-Dick chapters; SQNR of the last decoder layer's output (input of the final norm) and
KL of the next-token distribution against full precision on held-out prompts. Storage is
the quantized decoder linears at rest (weights at their bit width, patches at their dtype).
NLL is the mean negative log-likelihood (nats, summed over the answer's tokens) of the correct
answer: it moves when accuracy is saturated. `METHOD+down` also smooths the `down_proj` input
(`smooth_down_proj=True`), where these models' modalities are most misaligned
(docs/results/REFERENCE_MODELS.md). Every setting calibrates with the paper's schedule
(`calib_batch=1`: one MAS step per sample, 2 epochs). Calibration seconds are wall time on
the machine that ran the bench, which may have been shared; docs/results/PERFORMANCE.md has
calibration timings measured alone. The rows are in `results.json` next to this page; what they
show and do not show: [RESULTS_DISCUSSION.md](../RESULTS_DISCUSSION.md).

"""

GOALS_NOTE = """"Clear margin" is read as at least 1 accuracy point on the task (or 1 dB of SQNR on the
modality's tokens); `match` prompts hold an image and a spoken word.

"""
