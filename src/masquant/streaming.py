"""Quantize models larger than memory: one decoder layer resident at a time.

``quantize_streaming(directory, calib, config, out)`` builds the model's skeleton without
allocating its weights (``accelerate.init_empty_weights``), loads every tensor that is not in
a decoder layer (embeddings, vision / audio towers, final norm, head) from the checkpoint's
safetensors shards, captures the decoder inputs of the calibration set, and then, per decoder
layer: materialises it from the shards, calibrates and quantizes it, writes it to its own
output shard and frees it. Peak memory is the non-decoder weights, one full-precision layer
with its quantized copy, and the calibration activations (see docs/SCALE.md for the formula).

The output is the ``masquant.save`` layout with the weights split into shards
(``model-00001-of-000NN.safetensors`` + ``model.safetensors.index.json``, as Hugging Face
shards them); ``masquant.load`` reads both layouts.

Reading the checkpoint (the skeleton, tensors by name, name matching) is ``masquant.shards``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .config import QuantConfig
from .qlinear import QuantLinear
from .report import QuantReport
from .serialization import WEIGHTS_INDEX as INDEX
from .shards import Skeleton, skeleton, tied_targets

log = logging.getLogger("masquant")


class LayerStream:
    """Materialises decoder layers one at a time from the checkpoint and writes each, once
    quantized, to its own output shard (``quantize_layers`` calls ``load`` and ``release``);
    ``out=None`` (a data-parallel rank other than 0) writes nothing."""

    def __init__(self, skeleton: Skeleton, out: Path | None):
        self.skeleton, self.out = skeleton, out
        self.total = len(skeleton.layers) + 1  # one shard per decoder layer and one for everything else
        self.weight_map: dict[str, str] = {}
        self.layouts: dict[str, dict] = {}

    def shard(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.total:05d}.safetensors"

    def load(self, i: int, layer: nn.Module) -> None:
        self.skeleton.load_layer(i)

    def unload(self, i: int, layer: nn.Module) -> None:
        """Free layer ``i`` without writing it (a pass before quantization, e.g. gradient ratios)."""
        self.skeleton.unload_layer(i)
        release_memory()

    def release(self, i: int, layer: nn.Module) -> None:
        """Write the quantized layer ``i`` and free it."""
        prefix = self.skeleton.prefixes[i]
        self.layouts.update({f"{prefix}.{n}": m.layout() for n, m in layer.named_modules()
                             if isinstance(m, QuantLinear)})
        self._write(self.shard(i + 1), {f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
        self.skeleton.layers[i] = _Released(i)  # nothing of the layer stays referenced
        release_memory()

    def write_rest(self) -> None:
        """Everything outside the decoder layers (shard 1)."""
        model, layers = self.skeleton.model, tuple(p + "." for p in self.skeleton.prefixes)
        tied = tied_targets(model)
        rest = {k: v for k, v in model.state_dict().items() if not k.startswith(layers) and k not in tied}
        self._write(self.shard(0), rest)

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if self.out is None:  # a data-parallel rank other than 0
            return
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.out / name),
                  metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))

    def write_index(self) -> None:
        total = sum((self.out / f).stat().st_size for f in set(self.weight_map.values()))
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(self.weight_map.items()))}, indent=1))


class _Released(nn.Module):
    """Stands in for a decoder layer that has been written and freed."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} was written to disk and freed by the streaming quantizer; "
                           "load the saved model with masquant.load to run it")


def release_memory() -> None:
    """Hand freed heap memory back to the system."""
    import gc

    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


@contextlib.contextmanager
def large_allocations_mapped() -> Iterator[None]:
    """Within the block, glibc serves every allocation of 1 MiB or more with its own mapping,
    returned to the system when freed. By default glibc raises that threshold to the size of
    the largest block freed so far (up to 32 MiB), after which freed weight matrices stay in its
    heap: a streamed model then holds several layers' worth of dead memory. Afterwards the
    threshold is left at 32 MiB, where glibc's own adjustment ends up (setting it once turns that
    adjustment off for the process). Linux / glibc only; elsewhere nothing changes."""
    if _libc is None or not hasattr(_libc, "mallopt"):
        yield
        return
    _libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        _libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _load_libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_libc = _load_libc()
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def quantize_streaming(directory: str | Path, calib: Iterable[Mapping], config: QuantConfig, out: str | Path,
                       processor=None, progress: bool = True, overwrite: bool = False,
                       checkpoint: str | Path | None = None, resume: bool = False,
                       extra_files: dict[str, str] | None = None, reference: str | None = None,
                       dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                       offload: str | Path | None = None) -> QuantReport:
    """Quantize the checkpoint in ``directory`` layer by layer without loading it whole, and
    write the quantized model to ``out`` (the ``masquant.save`` layout, sharded; ``load`` reads it).
    ``dtype``: what the weights are computed in (default: the dtype ``config.json`` records, as
    ``from_pretrained`` loads it); ``device``: where each layer is materialised and calibrated.

    The calibration inputs are those ``masquant.quantize`` takes; ``checkpoint`` / ``resume``
    work as there (finished layers are re-read from the checkpoint and written again), and so
    does ``offload`` (the calibration activations in host memory or files, not on ``device``). The
    gradient ratios of ``mbq`` and ``lambdas="auto"`` are measured layer by layer first
    (``masquant.gradients.layerwise_gradient_ratios``: every layer read twice more, and every
    layer's input kept until the backward pass reaches it; offload them with ``offload``).
    """
    with large_allocations_mapped():
        return _quantize_streaming(directory, calib, config, Path(out), processor, progress, overwrite, checkpoint,
                                   resume, extra_files, reference, dtype, device, offload)


def _quantize_streaming(directory, calib, config, out, processor, progress, overwrite, checkpoint, resume,
                        extra_files, reference, dtype, device, offload) -> QuantReport:
    from .api import quantize
    from .serialization import staged_directory, write_metadata

    skel = skeleton(directory, dtype, device)
    writes = distributed.rank() == 0  # data-parallel: every rank calibrates, rank 0 alone writes
    with staged_directory(out, overwrite) if writes else contextlib.nullcontext() as tmp:
        stream = LayerStream(skel, tmp)
        report = quantize(skel.model, calib, config, progress=progress, checkpoint=checkpoint, resume=resume,
                          source=stream, offload=offload)
        if writes:
            stream.write_rest()
            stream.write_index()
            write_metadata(tmp, skel.model, stream.layouts, processor,
                           {"report.json": report.to_json(), **(extra_files or {})}, reference)
            log.info("streamed %d decoder layers of %s into %s", len(skel.layers), directory, out)
    return report
