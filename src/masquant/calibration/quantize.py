"""``masquant.quantize``: the public entry point."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, get_adapter, modality_ids
from ..config import QuantConfig
from ..io import omni
from ..methods import get_method
from ..modality import Modality, attach_router
from ..runtime.qlinear import QuantLinear
from . import distributed
from .capture import Captured, capture
from .checkpoint import LayerCheckpoint, fingerprint
from .collate import collate
from .gradients import layerwise_gradient_ratios, modality_gradient_ratios
from .offload import ActivationStore
from .pipeline import LayerSource, quantize_layers
from .report import QuantReport

log = logging.getLogger("masquant")

# inputs that need a companion tensor to mean anything
_COMPANIONS = {
    "pixel_values": "image_grid_thw",
    "pixel_values_videos": "video_grid_thw",
    "input_features": "feature_attention_mask",
}


class CalibrationError(ValueError):
    pass


def quantize(model: nn.Module, calib: Iterable[Mapping], config: QuantConfig | None = None,
             adapter: Adapter | None = None, progress: bool = True, cache: dict | None = None,
             checkpoint: str | Path | None = None, resume: bool = False,
             source: LayerSource | None = None, offload: str | Path | None = None) -> QuantReport:
    """Quantize the decoder linears of ``model`` in place; return the per-modality report. A full
    Qwen2.5-Omni model (thinker, talker, token2wav) has its thinker quantized; the rest stays as it is.

    - ``calib``: dicts of model inputs as the model's HF processor returns them, batch size >= 1.
    - ``cache``: shared by calls on copies of the same full-precision model and calibration set;
      reuses the captured decoder inputs and gradient ratios.
    - ``checkpoint``: directory where each finished layer is written; ``resume=True`` continues a
      killed run bit-identically. An existing state without ``resume``, or from another model,
      calibration set or settings, is refused.
    - ``source``: decoder layers are on the meta device; ``source`` loads and unloads each in turn.
    - ``offload``: where calibration activations wait: ``None`` (compute device), ``"cpu"`` or a
      directory (memory-mapped files); results are bit-identical.

    In a ``torch.distributed`` group of N > 1 processes, each passes the same ``calib``, calibrates
    on its share of the batches and ends with the same model; ``checkpoint`` is then refused.
    """
    config = config or QuantConfig()
    if omni.is_full(getattr(model, "config", None)):
        log.info("a full Qwen2.5-Omni model: its thinker is quantized, the talker and token2wav kept as they are")
        model = omni.thinker_of(model)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint directory of the run to continue")
    if checkpoint is not None and distributed.world_size() > 1:
        raise ValueError(f"checkpoint / resume is not available with data-parallel calibration "
                         f"({distributed.world_size()} processes); calibrate in one process to make the run "
                         "resumable")
    progress = progress and distributed.rank() == 0
    adapter = adapter or get_adapter(model)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized by masquant; start again from the full-precision model")
    adapter.validate(model)
    if source is None:
        _check_weights(model, adapter)  # a streamed layer is checked as it is read
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()
    router = adapter.router(model.config)
    method = get_method(config.method)
    store = ActivationStore(offload)  # a bad directory is refused before the capture
    try:
        inputs = validate_all(model, adapter, calib)
        n_samples = len(inputs)
        state = None
        if checkpoint is not None:
            state = LayerCheckpoint(checkpoint)
            state.start(fingerprint(model, inputs, config), resume)
        inputs = collate(inputs, config.calib_batch, _pad_token_id(model))
        held = _shard(len(inputs), n_samples, config.calib_batch)
        inputs = [inputs[i] for i in held]  # this process's batches (all of them in one process)
        ratios_key = ("ratios", config.calib_batch, n_samples)
        needs_ratios = method.gradient_ratios(config.settings)
        ratios = state.ratios() if state is not None and needs_ratios else None  # measured before a crash
        measure = needs_ratios and ratios is None
        if measure and source is None:  # one backward pass through the whole model
            ratios = _cached(cache, ratios_key, modality_gradient_ratios, model, adapter, inputs)
        captured = _cached(cache, ("capture", config.calib_batch, n_samples), capture_all, model, adapter, inputs,
                           progress, held, store if cache is None else None)  # a cache outlives the store
        if measure and source is not None:  # streamed: one decoder layer at a time, on the device of the rest
            layers = adapter.decoder_layers(model)
            device = next(p.device for p in model.parameters() if not p.is_meta)
            ratios = _cached(cache, ratios_key, layerwise_gradient_ratios, model, adapter, inputs, captured,
                             lambda i: source.load(i, layers[i]), lambda i: source.unload(i, layers[i]), store,
                             progress, device)
        if measure and state is not None:
            state.save_ratios(ratios)
        samples = [dataclasses.replace(s, hidden=s.hidden.clone()) for s in captured] if cache is not None else captured
        del inputs
        tokens = _token_counts(samples)
        data = _data_record(calib, tokens, model, adapter)
        reports = quantize_layers(model, adapter, samples, config, router, method, ratios, progress, state,
                                  source, store)
    finally:
        store.close()
        model.train(was_training)
        _reset_position_cache(model)
    attach_router(model, router)
    model.masquant_config = config
    seconds = time.perf_counter() - start
    log.info("quantized %d layers with %s in %.1fs", len(reports), config.method, seconds)
    return QuantReport(config.to_dict(), adapter.name, n_samples, tokens, reports, seconds, data)


def _data_record(calib, tokens: dict[str, int], model: nn.Module, adapter: Adapter) -> dict:
    """What the calibration data held (the reader's summary, when it came from ``read_calibration``)
    and the modalities with fewer tokens than twice the layer width, warned about once."""
    first = next(m for m in adapter.decoder_layers(model)[0].modules() if isinstance(m, nn.Linear))
    width = first.in_features
    thin = sorted(m for m, n in tokens.items() if m != "text" and n < 2 * width)
    for m in thin:
        log.warning("only %d %s calibration tokens for layers %d wide (fewer than twice the width): its statistics, "
                    "smoothing vectors and MASQuant's whitened patches may fit these samples rather than the "
                    "modality; add samples (or raise `ridge` for MASQuant)", tokens[m], m, width)
    return {**dict(getattr(calib, "summary", None) or {}), "layer_width": width, "thin_modalities": thin}


def _cached(cache: dict | None, key: tuple, compute, *args):
    if cache is None:
        return compute(*args)
    if key not in cache:
        cache[key] = compute(*args)
    return cache[key]


def _pad_token_id(model: nn.Module) -> int:
    for config in (model.config, getattr(model.config, "text_config", None)):
        if getattr(config, "pad_token_id", None) is not None:
            return int(config.pad_token_id)
    return 0  # padded positions are masked; the id only has to exist


def _shard(n_batches: int, n_samples: int, calib_batch: int) -> list[int]:
    """Indices of the calibration batches this process calibrates on (all in one process)."""
    world = distributed.world_size()
    if n_batches < world:
        raise CalibrationError(f"{n_samples} calibration samples in batches of calib_batch={calib_batch} make "
                               f"{n_batches} batches for {world} processes: every process needs at least one; "
                               "add samples, lower calib_batch or start fewer processes")
    return distributed.shard(n_batches)


@torch.no_grad()
def capture_all(model: nn.Module, adapter: Adapter, inputs: list[dict], progress: bool = True,
                indices: list[int] | None = None, store: ActivationStore | None = None) -> list[Captured]:
    """Decoder-layer inputs of every validated sample; ``indices``: their positions in the whole
    calibration set (default: their order here). With ``store``, each input goes there once captured."""
    indices = range(len(inputs)) if indices is None else indices
    captured = []
    for j, (x, i) in enumerate(zip(tqdm(inputs, desc="capture", unit="sample", disable=not progress), indices,
                                   strict=True)):
        c = capture(model, adapter, x, modality_ids(model, x["input_ids"], adapter))
        captured.append(dataclasses.replace(c, index=i, hidden=c.hidden if store is None else
                                            store.put(("hidden", j), c.hidden)))
    return captured


def _check_weights(model: nn.Module, adapter: Adapter) -> None:
    """NaN/Inf in a weight to quantize would spread through every layer after it: name it."""
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.groups:
            for path in group.linears:
                linear = layer.get_submodule(path)
                if not torch.isfinite(linear.weight).all() or (
                        linear.bias is not None and not torch.isfinite(linear.bias).all()):
                    raise ValueError(f"NaN/Inf in the weights of decoder layer {i} {path}: the checkpoint is "
                                     "damaged (or overflowed when cast); reload it, in float32 if it was cast")


def _reset_position_cache(model: nn.Module) -> None:
    """Forget the multimodal RoPE offsets (``rope_deltas``) that Qwen2.5-VL / Omni cache from the
    last forward: after calibration they belong to the calibration batch, and a later call with
    only ``inputs_embeds`` would reuse them with the wrong batch size."""
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


def validate_all(model: nn.Module, adapter: Adapter, calib: Iterable[Mapping]) -> list[dict]:
    """Check every calibration dict (clear errors naming the sample) and move it to the model's device."""
    device = next(model.parameters()).device
    samples = []
    for index, sample in enumerate(calib):
        sample = validate_sample(sample, index, device)
        _check_features(sample, modality_ids(model, sample["input_ids"], adapter), index, adapter)
        samples.append(sample)
    if not samples:
        raise CalibrationError("the calibration set is empty; pass at least one sample "
                               "(a dict with input_ids, as the model's processor returns it)")
    return samples


def validate_sample(sample: object, index: int, device: torch.device) -> dict:
    """Check one calibration dict and move its tensors to ``device``."""
    if not isinstance(sample, Mapping):
        raise CalibrationError(f"calibration sample {index} is a {type(sample).__name__}, expected a dict "
                               "of model inputs (the output of the model's processor)")
    if "input_ids" not in sample:
        raise CalibrationError(f"calibration sample {index} has no 'input_ids' (keys: {sorted(sample)}); "
                               "masquant needs token ids to know the modality of every token")
    for key, companion in _COMPANIONS.items():
        if sample.get(key) is not None and sample.get(companion) is None:
            raise CalibrationError(f"calibration sample {index} has '{key}' but no '{companion}'; pass both, "
                                   "as the processor returns them")
    out = {}
    for key, value in sample.items():
        if isinstance(value, list | tuple) and key in ("input_ids", "attention_mask"):
            value = torch.tensor(value)
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        out[key] = value
    ids = out["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32):
        raise CalibrationError(f"calibration sample {index}: 'input_ids' must be an integer tensor")
    if ids.dim() == 1:
        out["input_ids"] = ids = ids.unsqueeze(0)
        if isinstance(out.get("attention_mask"), torch.Tensor):
            out["attention_mask"] = out["attention_mask"].unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise CalibrationError(f"calibration sample {index}: 'input_ids' must be [batch, seq] and non-empty, "
                               f"got shape {tuple(ids.shape)}")
    mask = out.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise CalibrationError(f"calibration sample {index}: attention_mask {tuple(mask.shape)} does not match "
                               f"input_ids {tuple(ids.shape)}")
    return out


def _check_features(sample: dict, ids: torch.Tensor, index: int, adapter: Adapter) -> None:
    for modality, keys in adapter.feature_keys.items():
        present = bool((ids == int(modality)).any())
        has_features = any(sample.get(k) is not None for k in keys)
        if present and not has_features:
            raise CalibrationError(f"calibration sample {index} has {modality.name.lower()} placeholder tokens "
                                   f"but none of {keys}; pass the features the processor produced")
    if not adapter.feature_keys:  # a generic adapter does not say which inputs its model takes
        return
    from ..arch import ADAPTERS

    accepted = {k for keys in adapter.feature_keys.values() for k in keys}
    for other in ADAPTERS.values():
        for modality, keys in other.feature_keys.items():
            extra = [k for k in keys if k not in accepted and sample.get(k) is not None]
            if extra:
                raise CalibrationError(
                    f"calibration sample {index} has {modality.name.lower()} features {extra}, which this model "
                    f"({adapter.name}) does not take: it has no {modality.name.lower()} input; calibrate with samples "
                    "made by this model's own processor")


def _token_counts(samples: list[Captured]) -> dict[str, int]:
    counts = distributed.all_reduce_ints([sum(int(((s.ids == int(m)) & s.valid).sum()) for s in samples)
                                          for m in Modality])
    return {m.name.lower(): n for m, n in zip(Modality, counts, strict=True) if n}
