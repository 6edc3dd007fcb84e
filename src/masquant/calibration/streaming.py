"""Quantize models larger than memory: one decoder layer resident at a time.

``quantize_streaming`` builds the skeleton without weights, loads the non-decoder tensors from the
checkpoint's shards, captures the decoder inputs, then per layer materialises, quantizes, writes
and frees it. Peak memory: non-decoder weights, one layer (full-precision and quantized) and the
calibration activations. Output: the ``masquant.save`` layout in Hugging Face-style shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import QuantConfig
from ..io.serialization import WEIGHTS_INDEX as INDEX
from ..runtime.qlinear import QuantLinear
from . import distributed
from .report import QuantReport
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
    """Within the block, glibc maps every allocation of 1 MiB or more on its own, so freed layers go back to
    the system instead of staying in glibc's heap (whose threshold otherwise grows to 32 MiB). Afterwards the
    threshold stays at 32 MiB. Linux / glibc only; elsewhere nothing changes."""
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
    """Quantize the checkpoint in ``directory`` layer by layer and write it to ``out`` (sharded
    ``masquant.save`` layout). ``dtype``: compute dtype (default: ``config.json``'s); ``device``: where each
    layer is calibrated. ``calib``, ``checkpoint`` / ``resume`` and ``offload`` work as in ``masquant.quantize``.
    """
    with large_allocations_mapped():
        return _quantize_streaming(directory, calib, config, Path(out), processor, progress, overwrite, checkpoint,
                                   resume, extra_files, reference, dtype, device, offload)


def _quantize_streaming(directory, calib, config, out, processor, progress, overwrite, checkpoint, resume,
                        extra_files, reference, dtype, device, offload) -> QuantReport:
    from ..io.serialization import staged_directory, write_metadata
    from .quantize import quantize

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
