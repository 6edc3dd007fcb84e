"""MBQ-style modality sensitivities: how much the loss reacts to each modality's tokens.

One backward pass of the full-precision model records the mean ``|d loss / d output|`` at each layer's
``adapter.gradient_sites`` per modality (text: answer tokens only). The non-text / text ratio per layer,
floored at its median over layers, weights that modality's error (MBQ; ``lambdas="auto"``). Loss:
next-token cross-entropy on ``labels`` if given, else every text token. Sums are added over data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, layer_output, modality_ids
from ..modality import Modality
from . import distributed
from .offload import ActivationStore


class _Meter:
    """Sums of mean ``|grad|`` per token and token counts, per layer and modality."""

    def __init__(self, layers: int, sites: tuple[str, ...]):
        self.sites = sites
        self.sums = [dict.fromkeys(Modality, 0.0) for _ in range(layers)]
        self.counts = [dict.fromkeys(Modality, 0) for _ in range(layers)]
        self.masks: dict[Modality, torch.Tensor] = {}  # the current batch's tokens of each modality

    def hooks(self, layer: nn.Module, i: int) -> list:
        """Record the gradient reaching the outputs of ``layer``'s sites (decoder layer ``i``)."""
        def on_grad(grad: torch.Tensor) -> None:
            g = grad.detach().abs().float().mean(-1)  # [batch, seq]
            for m, mask in self.masks.items():
                self.sums[i][m] += float(g[mask].sum())
                self.counts[i][m] += int(mask.sum())

        def hook(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(on_grad)
        return [layer.get_submodule(site).register_forward_hook(hook) for site in self.sites]

    def ratios(self) -> list[dict[Modality, float]]:
        n, layers = len(Modality), len(self.sums)
        flat = distributed.all_reduce_floats([s[m] for s in self.sums for m in Modality])
        flat_counts = distributed.all_reduce_ints([c[m] for c in self.counts for m in Modality])
        sums = [dict(zip(Modality, flat[i * n:(i + 1) * n], strict=True)) for i in range(layers)]
        counts = [dict(zip(Modality, flat_counts[i * n:(i + 1) * n], strict=True)) for i in range(layers)]
        return _ratios(sums, counts)


def _targets(model: nn.Module, adapter: Adapter, sample: dict) -> tuple[torch.Tensor, dict[Modality, torch.Tensor]]:
    """The loss's labels (the sample's ``labels``, else every valid text token) and each
    modality's tokens (text: those with a label)."""
    ids = modality_ids(model, sample["input_ids"], adapter)
    valid = sample.get("attention_mask", torch.ones_like(ids)).bool()
    labels = sample.get("labels")
    if labels is None:
        labels = sample["input_ids"].masked_fill((ids != int(Modality.TEXT)) | ~valid, -100)
    masks = {Modality.TEXT: (labels != -100) & valid & (ids == int(Modality.TEXT))}
    masks.update({m: (ids == int(m)) & valid for m in Modality if m != Modality.TEXT})
    return labels, masks


@contextlib.contextmanager
def _activation_gradients_only(model: nn.Module) -> Iterator[None]:
    """No parameter gets a gradient inside (the flags are restored after)."""
    before = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in before:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)


def modality_gradient_ratios(model: nn.Module, adapter: Adapter, samples: list[dict]) -> list[dict[Modality, float]]:
    """Per decoder layer: ``{modality: mean|grad| on it / mean|grad| on answer text}``."""
    layers = adapter.decoder_layers(model)
    meter = _Meter(len(layers), adapter.gradient_sites)
    embed = model.get_input_embeddings()
    handles = [embed.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))]
    handles += [h for i, layer in enumerate(layers) for h in meter.hooks(layer, i)]
    try:
        with _activation_gradients_only(model):
            for sample in samples:
                labels, meter.masks = _targets(model, adapter, sample)
                inputs = {k: v for k, v in sample.items() if k != "labels"}
                with torch.enable_grad():
                    out = model(**inputs, labels=labels, use_cache=False)
                    out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return meter.ratios()


def _load(load: Callable[[int], None], i: int, layer: nn.Module) -> None:
    load(i)
    for p in layer.parameters():  # materialised now, so not frozen with the rest of the model
        p.requires_grad_(False)


def layerwise_gradient_ratios(model: nn.Module, adapter: Adapter, samples: list[dict], captured: list,
                              load: Callable[[int], None], unload: Callable[[int], None],
                              store: ActivationStore | None = None, progress: bool = False,
                              device: torch.device | None = None) -> list[dict[Modality, float]]:
    """``modality_gradient_ratios`` for streamed decoder layers (``load(i)`` / ``unload(i)``): a forward pass
    keeps each layer's input in ``store``, the loss is on ``head(norm(h))``, then a backward pass recomputes each
    layer from last to first. Same sums up to float order; each layer loads twice. ``device``: where layers run."""
    layers = adapter.decoder_layers(model)
    store = store or ActivationStore()
    meter = _Meter(len(layers), adapter.gradient_sites)
    targets = [_targets(model, adapter, sample) for sample in samples]
    norm, head = adapter.norm(model), model.get_output_embeddings()
    device = [device or c.hidden.device for c in captured]  # where each batch is computed
    bar = tqdm(total=2 * len(layers), desc="gradient ratios (layer by layer)", unit="layer", disable=not progress)
    # kept[i][j]: the input of layer i for batch j (kept[len(layers)]: the last layer's output)
    kept = [[c.hidden for c in captured]]  # (already where the store keeps activations)
    with _activation_gradients_only(model):
        with torch.no_grad():
            for i, layer in enumerate(layers):
                _load(load, i, layer)
                kept.append([store.put(("ratio-input", i + 1, j),
                                       layer_output(layer(x.to(device[j]), **c.layer_kwargs[i])))
                             for j, (x, c) in enumerate(zip(kept[i], captured, strict=True))])
                unload(i)
                bar.update()
        grads = []
        with torch.enable_grad():
            for j, (labels, _) in enumerate(targets):
                h = kept[-1][j].to(device[j]).detach().requires_grad_(True)
                logits = head(norm(h))
                loss = model.loss_function(logits=logits, labels=labels.to(logits.device), vocab_size=logits.shape[-1])
                loss.backward()
                grads.append(store.put(("ratio-grad", j), h.grad))
                del logits, loss, h
                store.forget(("ratio-input", len(layers), j))
            kept.pop()
            for i in reversed(range(len(layers))):
                _load(load, i, layers[i])
                handles = meter.hooks(layers[i], i)
                try:
                    for j, c in enumerate(captured):
                        meter.masks = targets[j][1]
                        h = kept[i][j].to(device[j]).detach().requires_grad_(True)
                        out = layer_output(layers[i](h, **c.layer_kwargs[i]))
                        out.backward(grads[j].to(out.device))
                        grads[j] = store.put(("ratio-grad", j), h.grad)
                        del out, h
                        store.forget(("ratio-input", i, j))
                finally:
                    for handle in handles:
                        handle.remove()
                kept.pop()
                unload(i)
                bar.update()
    bar.close()
    for j in range(len(captured)):
        store.forget(("ratio-grad", j))
    return meter.ratios()


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
