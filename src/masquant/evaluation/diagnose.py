"""``masquant analyze``: does this model suffer from smoothing misalignment, and what to use.

Per decoder layer and linear, on the calibration set: (1) each modality's per-channel activation range
and their misalignment; (2) each modality's SQNR under one unified vs per-modality SmoothQuant vectors
(alpha = 0.5, nothing learned); (3) the singular value decay of the CMC residual ``W * s_m - Q(W * s_text)``,
whitened vs plain. Writes ``analysis.json``, ``report.md`` and PNG plots, and recommends a method and rank.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from ..calibration.quantize import quantize
from ..config import QuantConfig
from .analysis import collect_fp_stats, format_misalignment, misalignment_table
from .evaluate import compare

log = logging.getLogger("masquant")

RANKS = (8, 16, 32, 64)
GAIN_DB = 1.0  # a non-text modality must gain this much from its own vector to recommend MASQuant
ENERGY = 0.9  # the recommended rank keeps this share of the whitened residual energy (median linear)


def analyze(model: nn.Module, calib: Iterable[Mapping], out: str | Path, w_bits: int = 4, a_bits: int = 8,
            rank: int = 32, progress: bool = True) -> dict:
    """Run the three measurements on copies of ``model``; write the report to ``out``."""
    out = Path(out)
    calib = list(calib)
    stats = collect_fp_stats(model, calib, progress=progress)
    configs = {"unified": QuantConfig(method="smoothquant", w_bits=w_bits, a_bits=a_bits),
               "per_modality": QuantConfig(method="mas", w_bits=w_bits, a_bits=a_bits, epochs=0),
               "masquant": QuantConfig(method="masquant", w_bits=w_bits, a_bits=a_bits, epochs=0, rank=rank,
                                       cmc_guard=False)}
    fit, held_out = (calib[0::2], calib[1::2]) if len(calib) >= 4 else (calib, calib)
    reports, decoder = {}, {}
    for name, config in configs.items():
        qmodel = copy.deepcopy(model)
        reports[name] = quantize(qmodel, fit, config, progress=progress)
        decoder[name] = compare(model, qmodel, held_out)["decoder_sqnr"]
        del qmodel
    result = {"bits": f"W{w_bits}A{a_bits}", "rank": rank, "decoder_sqnr": decoder, "fit_samples": len(fit),
              "held_out_samples": len(held_out), "misalignment": misalignment_table(stats),
              "sqnr": _sqnr_rows(reports["unified"], reports["per_modality"], reports["masquant"]),
              "spectra": _spectra(reports["masquant"])}
    width = max(site.absmax(m).numel() for layer in stats for site in layer.values() for m in site.per_modality)
    result["tokens"], result["max_in_features"] = reports["masquant"].tokens, width
    result["recommendation"] = recommend(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    plots = _plots(stats, result, out)
    (out / "report.md").write_text(markdown(result, plots))
    log.info("analysis written to %s: %s", out, result["recommendation"]["text"])
    return result


def _sqnr_rows(unified, per_modality, masquant) -> list[dict]:
    rows = []
    for lu, lp, lm in zip(unified.layers, per_modality.layers, masquant.layers, strict=True):
        for path, linear in lu.linears.items():
            for m, value in linear.sqnr.items():
                rows.append({"layer": lu.index, "linear": path, "modality": m, "unified": value,
                             "per_modality": lp.linears[path].sqnr.get(m), "masquant": lm.linears[path].sqnr.get(m)})
    return rows


def _spectra(report) -> list[dict]:
    """Cumulative energy at each rank of ``RANKS`` for every compensated linear and modality."""
    rows = []
    for layer in report.layers:
        for path, linear in layer.linears.items():
            for m, comp in linear.compensation.items():
                if "skipped" in comp:  # rank 0 or nothing to compensate: no spectrum
                    continue
                row = {"layer": layer.index, "linear": path, "modality": m}
                for kind in ("whitened", "plain"):
                    row[kind] = _cumulative(comp[f"{kind}_spectrum"], comp[f"{kind}_energy_kept"], comp["rank"])
                rows.append(row)
    return rows


def _cumulative(spectrum: list[float], kept: float, rank: int) -> dict[int, float]:
    """Energy kept at every rank of ``RANKS``, from the leading singular values and the share
    kept at the rank that was used (which gives the total energy)."""
    energy = [s * s for s in spectrum]
    if rank <= 0 or kept <= 0 or rank > len(energy):
        return {}
    total = sum(energy[:rank]) / kept
    return {r: min(sum(energy[:r]) / total, 1.0) for r in RANKS if r <= len(energy)}


def recommend(result: dict) -> dict:
    """MASQuant when some modality (text included) gains >= GAIN_DB held-out decoder-output SQNR from per-modality
    vectors or the patched single weight, else SmoothQuant; the rank is the smallest keeping ENERGY of the
    whitened residual on the median linear."""
    dec = result["decoder_sqnr"]
    vector_gain = {m: v - dec["unified"][m] for m, v in dec["per_modality"].items()}
    patched_gain = {m: v - dec["unified"][m] for m, v in dec["masquant"].items()}
    mean_gain = {m: max(vector_gain.get(m, -math.inf), patched_gain.get(m, -math.inf))
                 for m in {*vector_gain, *patched_gain}}
    worst = max(result["misalignment"], key=lambda r: max(r["ratio_max"], r["inverse_ratio_max"]), default=None)
    spread = max(worst["ratio_max"], worst["inverse_ratio_max"]) if worst else 1.0
    base = {"vector_gain_db": vector_gain, "patched_gain_db": patched_gain, "max_channel_ratio": spread}
    if not mean_gain or max(mean_gain.values()) < GAIN_DB:
        text = (f"smoothquant: per-modality vectors (with or without CMC patches) gain at most "
                f"{max(mean_gain.values(), default=0.0):.2f} dB of held-out decoder-output SQNR on any modality "
                f"(threshold {GAIN_DB} dB); one unified vector is enough")
        return {"method": "smoothquant", "rank": 0, **base, "text": text}
    chosen = RANKS[-1]
    for r in RANKS:
        kept = sorted(row["whitened"][r] for row in result["spectra"] if r in row["whitened"])
        if kept and kept[len(kept) // 2] >= ENERGY:
            chosen = r
            break
    best = max(mean_gain, key=mean_gain.get)
    text = (f"masquant, rank {chosen}: on held-out samples, {best} tokens gain {vector_gain.get(best, 0.0):.2f} dB "
            f"(decoder output) from their own smoothing vector and {patched_gain.get(best, 0.0):.2f} dB with one "
            "weight plus CMC patches "
            f"(channel ranges differ up to {spread:.0f}x between modalities); rank {chosen} keeps >= {ENERGY:.0%} "
            "of the whitened residual energy on the median linear")
    scarce = [m for m, n in result.get("tokens", {}).items() if m != "text" and n < 2 * result["max_in_features"]]
    if scarce:
        counts = ", ".join(f"{result['tokens'][m]} {m}" for m in scarce)
        text += (f" (only {counts} calibration tokens for up to "
                 f"{result['max_in_features']} channels: the whitened spectra decay faster on so few tokens; add "
                 "samples before trusting a small rank)")
    return {"method": "masquant", "rank": chosen, **base, "text": text}


def markdown(result: dict, plots: list[str]) -> str:
    rec = result["recommendation"]
    dec = result["decoder_sqnr"]
    mods = list(dec["unified"])
    lines = ["# Smoothing misalignment analysis", "", f"**Recommendation ({result['bits']}):** {rec['text']}.", "",
             f"## Decoder-output SQNR on held-out samples (dB; fit on {result['fit_samples']}, measured on "
             f"{result['held_out_samples']})", "", "| smoothing | " + " | ".join(mods) + " |",
             "|---" * (len(mods) + 1) + "|",
             *(f"| {k.replace('_', '-')} | " + " | ".join(f"{dec[k][m]:.2f}" for m in mods) + " |" for k in dec), "",
             "## Misalignment per layer and site", "", format_misalignment(result["misalignment"]), "",
             f"## Linear-output SQNR on the fitting samples (dB), {result['bits']}: unified vs per-modality "
             f"smoothing vs MASQuant (one weight + rank-{result['rank']} patches; vectors not learned; patches "
             "fitted on these tokens, so their numbers are optimistic)", "",
             "| layer | linear | modality | unified | per-modality | MASQuant |", "|---|---|---|---|---|---|"]
    for r in result["sqnr"]:
        cells = [math.inf if r.get(k) is None else r[k] for k in ("unified", "per_modality", "masquant")]
        lines.append(f"| {r['layer']} | {r['linear']} | {r['modality']} | " + " | ".join(f"{v:.2f}" for v in cells)
                     + " |")
    lines += ["", "## CMC residual energy kept by rank (whitened / plain)", "",
              "| layer | linear | modality | " + " | ".join(f"r={r}" for r in RANKS) + " |", "|---" * (3 + len(RANKS))
              + "|"]
    for r in result["spectra"]:
        cells = [f"{r['whitened'][k]:.2f} / {r['plain'][k]:.2f}" if k in r["whitened"] else "-" for k in RANKS]
        lines.append(f"| {r['layer']} | {r['linear']} | {r['modality']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"![{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def _plots(stats, result: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no plots")
        return []
    from .plots import channel_ranges, misalignment_map, spectra, sqnr_gains

    written = []
    for name, draw in (("misalignment.png", misalignment_map), ("channels.png", channel_ranges),
                       ("sqnr.png", sqnr_gains), ("spectra.png", spectra)):
        fig = draw(plt, stats, result)
        if fig is not None:
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
    return written
