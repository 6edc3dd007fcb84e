"""Smoothing misalignment, measured: how differently each modality loads the input channels.

For every decoder layer and linear group, a full-precision pass records the per-channel
abs-max of each modality's tokens. Compared with text, a modality is summarised by the
largest channel ratio both ways (``max_i a_m[i] / a_t[i]`` and its reverse), the overlap of
the top-k outlier channels, the magnitude ratio of the two abs-maxima and which modality
dominates the site. A unified smoothing vector follows the dominant modality.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..arch import Adapter, get_adapter
from ..calibration.pipeline import LayerContext
from ..calibration.quantize import capture_all, validate_all
from ..calibration.stats import SiteStats, TokenContext
from ..config import QuantConfig
from ..modality import Modality

EPS = 1e-6


@torch.no_grad()
def collect_fp_stats(model: nn.Module, calib: Iterable[Mapping], adapter: Adapter | None = None,
                     progress: bool = False) -> list[dict[str, SiteStats]]:
    """Per layer, per linear group: input statistics of the full-precision model."""
    adapter = adapter or get_adapter(model)
    adapter.validate(model)
    model.eval()
    samples = capture_all(model, adapter, validate_all(model, adapter, calib), progress)
    router, tokens, out = adapter.router(model.config), TokenContext(), []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        ctx = LayerContext(i, layer, adapter, QuantConfig(method="rtn"), router, samples, tokens)
        ctx.collect()
        out.append({g.name: ctx.site(g) for g in ctx.groups()})
        for j, sample in enumerate(samples):
            sample.hidden = ctx.target(j)
    return out


def site_misalignment(site: SiteStats, k: int = 8) -> dict[str, dict[str, float]]:
    """Each non-text modality against text at one site."""
    if Modality.TEXT not in site.per_modality:
        return {}
    text = site.absmax(Modality.TEXT)
    rows = {}
    for m in sorted(site.per_modality):
        if m == Modality.TEXT:
            continue
        other = site.absmax(m)
        top_t = set(text.topk(min(k, len(text))).indices.tolist())
        top_m = set(other.topk(min(k, len(other))).indices.tolist())
        rows[m.name.lower()] = {
            "ratio_max": float((other / text.clamp_min(EPS)).max()),
            "ratio_min": float((other / text.clamp_min(EPS)).min()),
            "inverse_ratio_max": float((text / other.clamp_min(EPS)).max()),
            "magnitude_ratio": float(other.max() / text.max().clamp_min(EPS)),
            "topk_overlap": len(top_t & top_m) / k,
            "dominant": m.name.lower() if float(other.max()) > float(text.max()) else "text",
        }
    return rows


def misalignment_table(stats: list[dict[str, SiteStats]], k: int = 8) -> list[dict]:
    return [{"layer": i, "site": name, "modality": m, **values}
            for i, layer in enumerate(stats) for name, site in layer.items()
            for m, values in site_misalignment(site, k).items()]


def format_misalignment(rows: list[dict]) -> str:
    lines = ["| layer | site | modality | max ratio m/text | max ratio text/m | abs-max ratio m/text | "
             "top-8 overlap | dominant |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['site']} | {r['modality']} | {r['ratio_max']:.1f} | "
                     f"{r['inverse_ratio_max']:.1f} | {r['magnitude_ratio']:.2f} | {r['topk_overlap']:.2f} | "
                     f"{r['dominant']} |")
    return "\n".join(lines)
