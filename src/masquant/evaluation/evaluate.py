"""Compare a quantized model with its full-precision original, per modality.

The decoder's contribution is measured at the input of the final norm (the output of the
last decoder layer): ``hidden_states[-1]`` in transformers 5 is taken after the norm and
``hidden_states[0]`` is the raw embedding, so neither isolates the quantized decoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import Adapter, get_adapter, modality_ids
from ..calibration.report import SqnrMeter
from ..calibration.stats import TokenContext


@torch.no_grad()
def decoder_output(model: nn.Module, adapter: Adapter, sample: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Last decoder layer output (final-norm input) and logits for one sample."""
    seen = []
    handle = adapter.norm(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        logits = model(**sample, use_cache=False).logits
    finally:
        handle.remove()
    return seen[-1], logits


@torch.no_grad()
def compare(reference: nn.Module, quantized: nn.Module, samples: Iterable[Mapping],
            adapter: Adapter | None = None) -> dict[str, dict[str, float]]:
    """Per-modality SQNR of the decoder output and logit cosine / KL to the reference."""
    adapter = adapter or get_adapter(reference)
    hidden_meter, logit_meter, tokens = SqnrMeter(), SqnrMeter(), TokenContext()
    cos_sum, kl_sum, n = 0.0, 0.0, 0
    for sample in samples:
        h_ref, l_ref = decoder_output(reference, adapter, sample)
        h_q, l_q = decoder_output(quantized, adapter, sample)
        mask = sample.get("attention_mask")
        ids = modality_ids(reference, sample["input_ids"], adapter)
        tokens.set(ids, mask if mask is not None else torch.ones_like(ids))
        for meter, a, b in ((hidden_meter, h_ref, h_q), (logit_meter, l_ref, l_q)):
            meter.add(tokens.split(a.reshape(-1, a.shape[-1])), tokens.split(b.reshape(-1, b.shape[-1])))
        cos_sum += float(F.cosine_similarity(l_ref.flatten().double(), l_q.flatten().double(), 0))
        log_p, log_q = (F.log_softmax(x.double(), -1) for x in (l_ref, l_q))
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        n += 1
    return {"decoder_sqnr": hidden_meter.result(), "logit_sqnr": logit_meter.result(),
            "logit_cosine": {"all": cos_sum / max(n, 1)}, "kl": {"all": kl_sum / max(n, 1)}}
