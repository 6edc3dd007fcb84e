"""``QuantReport``: what quantization did, per layer, linear and modality; JSON round trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..modality import Modality
from .stats import SiteStats


class SqnrMeter:
    """Accumulates signal and noise power per modality; SQNR in dB."""

    def __init__(self) -> None:
        self.signal: dict[Modality, float] = {}
        self.noise: dict[Modality, float] = {}

    def add(self, parts_ref: dict[Modality, torch.Tensor], parts_q: dict[Modality, torch.Tensor]) -> None:
        for m, ref in parts_ref.items():
            ref64, q64 = ref.double(), parts_q[m].double()
            self.signal[m] = self.signal.get(m, 0.0) + float(ref64.pow(2).sum())
            self.noise[m] = self.noise.get(m, 0.0) + float((ref64 - q64).pow(2).sum())

    def result(self) -> dict[str, float]:
        return {m.name.lower(): _db(self.signal[m], self.noise[m]) for m in sorted(self.signal)}


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def activation_summary(site: SiteStats) -> dict[str, dict[str, float]]:
    """Per modality: tokens, abs-max, median channel abs-max and their ratio (outlier-ness)."""
    out = {}
    for m, s in sorted(site.per_modality.items()):
        median = float(s.absmax.median())
        peak = float(s.absmax.max())
        out[m.name.lower()] = {"tokens": s.count, "absmax": peak, "median_channel_absmax": median,
                               "outlier_ratio": peak / median if median > 0 else math.inf}
    return out


@dataclass
class LinearReport:
    sqnr: dict[str, float]
    activations: dict[str, dict[str, float]]
    storage: dict[str, int] = field(default_factory=dict)  # bytes at rest: weight(s), patches
    compensation: dict[str, dict[str, Any]] = field(default_factory=dict)  # CMC, per modality


@dataclass
class LayerReport:
    index: int
    output_sqnr: dict[str, float]
    linears: dict[str, LinearReport]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        return cls(index=data["index"], output_sqnr=_inf(data["output_sqnr"]), groups=data.get("groups", {}),
                   linears={k: _linear_from_dict(v) for k, v in data["linears"].items()})


@dataclass
class QuantReport:
    """Result of ``masquant.quantize``. SQNR values are dB; ``None`` in JSON means exact."""

    config: dict[str, Any]
    adapter: str
    samples: int
    tokens: dict[str, int]
    layers: list[LayerReport]
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)  # what the calibration data held (see _data_record)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantReport:
        return cls(**{**data, "layers": [LayerReport.from_dict(lr) for lr in data["layers"]]})

    def mean_output_sqnr(self) -> dict[str, float]:
        """Mean over layers of the layer-output SQNR, per modality."""
        keys = sorted({k for lr in self.layers for k in lr.output_sqnr})
        return {k: sum(lr.output_sqnr[k] for lr in self.layers if k in lr.output_sqnr)
                / sum(k in lr.output_sqnr for lr in self.layers) for k in keys}

    def data_summary(self) -> str:
        """One line on the calibration data: samples, media, tokens per modality, truncations."""
        d = self.data
        media = ", ".join(f"{n} {k}" for k, n in d.get("with", {}).items() if n)
        line = f"calibration: {self.samples} samples" + (f" from {d['source']}" if d.get("source") else "")
        line += f" ({media})" if media else ""
        line += "; tokens " + ", ".join(f"{k} {n}" for k, n in self.tokens.items())
        if d.get("truncated"):
            line += f"; {d['truncated']} truncated to {d['max_seq_len']} tokens"
        if d.get("thin_modalities"):
            line += (f"; fewer than twice the layer width ({d['layer_width']}) of "
                     + ", ".join(d["thin_modalities"]) + " tokens")
        return line

    def summary(self) -> str:
        """The calibration data in a line, then a markdown table of layer-output SQNR per modality."""
        keys = sorted({k for lr in self.layers for k in lr.output_sqnr})
        lines = [self.data_summary(), "", "| layer | " + " | ".join(f"SQNR {k} (dB)" for k in keys) + " |",
                 "|---|" + "---|" * len(keys)]
        for lr in self.layers:
            lines.append(f"| {lr.index} | " + " | ".join(f"{lr.output_sqnr.get(k, math.nan):.2f}" for k in keys) + " |")
        return "\n".join(lines)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _inf(values: dict[str, float | None]) -> dict[str, float]:
    return {k: math.inf if v is None else v for k, v in values.items()}


def _linear_from_dict(data: dict[str, Any]) -> LinearReport:
    acts = {m: _inf(v) for m, v in data["activations"].items()}
    return LinearReport(sqnr=_inf(data["sqnr"]), activations=acts, storage=data.get("storage", {}),
                        compensation=data.get("compensation", {}))
