"""The figures of ``masquant analyze`` (each takes pyplot, the FP statistics and the analysis)."""

from __future__ import annotations

import math

from ..modality import Modality

COLORS = {"text": "tab:blue", "vision": "tab:orange", "audio": "tab:green"}


def misalignment_map(plt, stats, result: dict):
    """Heatmap: largest per-channel range ratio between a modality and text (either way), log10."""
    rows = result["misalignment"]
    if not rows:
        return None
    mods = sorted({r["modality"] for r in rows})
    sites = list(dict.fromkeys(r["site"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    fig, axes = plt.subplots(1, len(mods), figsize=(1.2 + 1.4 * len(sites) * len(mods), 0.9 + 0.35 * len(layers)),
                             squeeze=False)
    for ax, m in zip(axes[0], mods, strict=True):
        grid = [[math.nan] * len(sites) for _ in layers]
        for r in rows:
            if r["modality"] == m:
                grid[layers.index(r["layer"])][sites.index(r["site"])] = math.log10(
                    max(r["ratio_max"], r["inverse_ratio_max"]))
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0)
        ax.set_xticks(range(len(sites)), sites, rotation=30, fontsize=8)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=8)
        ax.set_ylabel("layer")
        ax.set_title(f"{m} vs text: log10 max channel ratio", fontsize=9)
        for i, line in enumerate(grid):
            for j, v in enumerate(line):
                if not math.isnan(v):
                    ax.text(j, i, f"{10 ** v:.0f}x", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 * (image.get_clim()[1] or 1) else "white")
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def channel_ranges(plt, stats, result: dict):
    """Per-channel abs-max of every modality at the most misaligned site (channels sorted by text)."""
    rows = result["misalignment"]
    if not rows:
        return None
    worst = max(rows, key=lambda r: max(r["ratio_max"], r["inverse_ratio_max"]))
    site = stats[worst["layer"]][worst["site"]]
    text = site.absmax(Modality.TEXT)
    order = text.argsort(descending=True)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for m in sorted(site.per_modality):
        name = m.name.lower()
        ax.plot(site.absmax(m)[order].tolist(), label=name, color=COLORS.get(name), lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("input channel (sorted by the text range)")
    ax.set_ylabel("max |x|")
    ax.set_title(f"layer {worst['layer']} {worst['site']}: per-channel activation range by modality", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sqnr_gains(plt, stats, result: dict):
    """Per layer: mean linear-output SQNR of each modality: unified vs per-modality smoothing vs MASQuant."""
    kinds = (("unified", "//", 0.45), ("per_modality", "", 0.75), ("masquant", "..", 1.0))
    rows = [r for r in result["sqnr"] if all(r.get(k) is not None for k, _, _ in kinds)]
    if not rows:
        return None
    mods = sorted({r["modality"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(layers) * len(mods)), 4.4))
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        for n, (kind, hatch, alpha) in enumerate(kinds):
            ys = []
            for layer in layers:
                vals = [r[kind] for r in rows if r["layer"] == layer and r["modality"] == m]
                ys.append(sum(vals) / len(vals) if vals else 0.0)
            offset = j * width + n * width / 3
            ax.bar([i + offset for i in range(len(layers))], ys, width / 3, color=COLORS.get(m), hatch=hatch,
                   alpha=alpha, label=f"{m} {kind.replace('_', '-')}")
    ax.set_xticks([i + 0.4 - width / 3 for i in range(len(layers))], [str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("mean linear-output SQNR (dB)")
    ax.set_title(f"{result['bits']}: unified (//) vs per-modality vs MASQuant (..)", fontsize=10)
    ax.legend(fontsize=7, ncol=len(mods), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    return fig


def spectra(plt, stats, result: dict):
    """Energy of the CMC residual kept by rank, whitened vs plain (median over linears, per modality)."""
    rows = result["spectra"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in sorted({r["modality"] for r in rows}):
        for kind, style in (("whitened", "-"), ("plain", "--")):
            ranks = sorted({k for r in rows if r["modality"] == m for k in r[kind]})
            ys = []
            for k in ranks:
                vals = sorted(r[kind][k] for r in rows if r["modality"] == m and k in r[kind])
                ys.append(vals[len(vals) // 2])
            ax.plot(ranks, ys, style, marker="o", color=COLORS.get(m), label=f"{m} {kind}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank")
    ax.set_ylabel("residual energy kept (median linear)")
    ax.set_title("CMC residual: whitened vs plain SVD", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
