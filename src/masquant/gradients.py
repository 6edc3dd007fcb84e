"""MBQ-style modality sensitivities: how much the loss reacts to each modality's tokens.

One backward pass over the calibration set through the full-precision model records the
mean ``|d loss / d output|`` of every layer's ``o_proj`` and ``down_proj`` on each
modality's tokens (text: answer tokens only). The ratio non-text / text, per layer and
floored at its median across layers, weights that modality's reconstruction error (MBQ;
MASQuant's ``lambdas="auto"``). The loss is next-token cross-entropy on the sample's
``labels`` if given, else on every text token. Data-parallel (``masquant.distributed``), each
process runs its own samples and the sums and counts are added over the processes.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from . import distributed
from .arch import Adapter, modality_ids
from .modality import Modality

SITES = ("self_attn.o_proj", "mlp.down_proj")


def modality_gradient_ratios(model: nn.Module, adapter: Adapter, samples: list[dict]) -> list[dict[Modality, float]]:
    """Per decoder layer: ``{modality: mean|grad| on it / mean|grad| on answer text}``."""
    layers = adapter.decoder_layers(model)
    sums = [dict.fromkeys(Modality, 0.0) for _ in layers]
    counts = [dict.fromkeys(Modality, 0) for _ in layers]
    masks: dict[Modality, torch.Tensor] = {}

    def record(i: int):
        def on_grad(grad: torch.Tensor) -> None:
            g = grad.detach().abs().float().mean(-1)  # [batch, seq]
            for m, mask in masks.items():
                sums[i][m] += float(g[mask].sum())
                counts[i][m] += int(mask.sum())
        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(on_grad)
        return hook

    grads_before = {p: p.requires_grad for p in model.parameters()}
    embed = model.get_input_embeddings()
    handles = [embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))]
    handles += [layer.get_submodule(site).register_forward_hook(record(i))
                for i, layer in enumerate(layers) for site in SITES]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for sample in samples:
            ids = modality_ids(model, sample["input_ids"], adapter)
            valid = sample.get("attention_mask", torch.ones_like(ids)).bool()
            labels = sample.get("labels")
            if labels is None:
                labels = sample["input_ids"].masked_fill((ids != int(Modality.TEXT)) | ~valid, -100)
            masks.clear()
            masks[Modality.TEXT] = (labels != -100) & valid & (ids == int(Modality.TEXT))
            masks.update({m: (ids == int(m)) & valid for m in Modality if m != Modality.TEXT})
            inputs = {k: v for k, v in sample.items() if k != "labels"}
            with torch.enable_grad():
                out = model(**inputs, labels=labels, use_cache=False)
                out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in grads_before.items():
            p.requires_grad_(flag)
    flat = distributed.all_reduce_floats([s[m] for s in sums for m in Modality])
    flat_counts = distributed.all_reduce_ints([c[m] for c in counts for m in Modality])
    n = len(Modality)
    sums = [dict(zip(Modality, flat[i * n:(i + 1) * n], strict=True)) for i in range(len(layers))]
    counts = [dict(zip(Modality, flat_counts[i * n:(i + 1) * n], strict=True)) for i in range(len(layers))]
    return _ratios(sums, counts)


def _ratios(sums: list[dict], counts: list[dict]) -> list[dict[Modality, float]]:
    text = Modality.TEXT
    ratios = [{m: (s[m] / c[m]) / (s[text] / c[text]) for m in Modality
               if m != text and c[m] and c[text] and s[text] > 0} for s, c in zip(sums, counts, strict=True)]
    for m in Modality:
        values = [r[m] for r in ratios if m in r]
        for r in ratios:
            if m in r:
                r[m] = max(r[m], statistics.median(values))
    return [{text: 1.0, **r} for r in ratios]
