"""Capture what the decoder layers receive: layer-0 hidden states and per-layer kwargs.

The model runs once per sample with each decoder layer replaced by a pass-through recorder, stopping at
the final norm, so towers and embeddings run as in a normal forward; each layer's kwargs (masks, rotary
embeddings, mrope positions) are kept by reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import Adapter


@dataclass
class Captured:
    """One calibration sample as seen by the decoder."""

    hidden: torch.Tensor  # input of the current layer, [1, seq, hidden]
    layer_kwargs: list[dict]  # keyword arguments of each decoder layer
    ids: torch.Tensor  # modality ids, [1, seq]
    valid: torch.Tensor  # attention mask as bool, [1, seq]
    answer: torch.Tensor  # text tokens that count as answers (labels != -100, or all text), [1, seq]
    index: int = 0  # position of this batch in the whole calibration set (data-parallel runs hold a part)


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, sink: list):
        super().__init__()
        self.inner, self.sink = inner, sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise RuntimeError("masquant expects decoder layers to be called with keyword arguments "
                               "after hidden_states; use a generic adapter for this model")
        self.sink.append((hidden_states, kwargs))
        return hidden_states


def _raise_stop(*_: object) -> None:
    raise _Stop


@torch.no_grad()
def capture(model: nn.Module, adapter: Adapter, sample: dict, ids: torch.Tensor) -> Captured:
    """Run ``model`` on ``sample`` up to the decoder and record the layer inputs."""
    layers = adapter.decoder_layers(model)
    sinks: list[list] = [[] for _ in layers]
    originals = list(layers)
    handle = adapter.norm(model).register_forward_pre_hook(_raise_stop)
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Recorder(layer, sinks[i])
        with contextlib.suppress(_Stop):
            model(**{k: v for k, v in sample.items() if k != "labels"}, use_cache=False)
    finally:
        handle.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer
    if any(len(s) != 1 for s in sinks):
        raise RuntimeError("every decoder layer must run exactly once per forward; got call counts "
                           f"{[len(s) for s in sinks]}")
    hidden = sinks[0][0][0]
    mask = sample.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    labels = sample.get("labels")
    answer = (labels != -100) if labels is not None else torch.ones_like(valid)
    answer = answer & valid & (ids == 0)
    return Captured(hidden, [kw for _, kw in (s[0] for s in sinks)], ids, valid, answer)
