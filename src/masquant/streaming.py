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

Checkpoint tensor names and module names can differ (transformers renames e.g. ``model.layers``
to ``model.language_model.layers`` at load time): ``match_names`` pairs them by their common
trailing path, checks shapes, and refuses anything ambiguous or missing.
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

log = logging.getLogger("masquant")



_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # no float8: such checkpoints carry scales that are not weights


class CheckpointTensors:
    """Tensors of a safetensors checkpoint directory (one file, or shards with an index), read by name.

    Each tensor is read from its file with plain reads into fresh memory, not memory-mapped:
    a private mapping of a whole shard would count against the process's memory (and its
    limit) as soon as it is made."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.directory} holds no *.safetensors weights to stream from (streaming "
                                    "reads safetensors checkpoints; convert .bin weights with save_pretrained first)")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {INDEX} but missing")
            entries = _read_header(path)
            twice = sorted(set(entries) & set(self.entries))
            if twice:
                other = self.entries[twice[0]][0].name
                raise ValueError(f"{path} holds tensors that {other} also holds ({twice[:3]}); keep one "
                                 f"checkpoint per directory, or add its {INDEX}")
            self.entries.update(entries)
        self.shapes = {k: v[2] for k, v in self.entries.items()}

    def get(self, key: str) -> torch.Tensor:
        path, dtype, shape, begin, end = self.entries[key]
        out = torch.empty(end - begin, dtype=torch.uint8)
        with path.open("rb") as f:
            f.seek(begin)
            if f.readinto(out.numpy()) != end - begin:
                raise ValueError(f"{path} is truncated: tensor {key} ends past the end of the file")
        return out.view(dtype).reshape(shape)


def _read_header(path: Path) -> dict[str, tuple]:
    """Name -> (file, dtype, shape, first byte, end byte) from a safetensors header."""
    with path.open("rb") as f:
        size_bytes = f.read(8)
        size = int.from_bytes(size_bytes, "little") if len(size_bytes) == 8 else -1
        if not 0 < size < (100 << 20):
            raise ValueError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(size))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} has a damaged safetensors header ({err})") from err
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}; streaming reads full-precision "
                             "checkpoints (float32 / bfloat16 / float16 weights)")
        begin, end = info["data_offsets"]
        entries[key] = (path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


def match_names(wanted: Mapping[str, tuple[int, ...]], available: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Module tensor name -> checkpoint key, for every name in ``wanted``.

    A name matches a key that is identical, or else the key sharing the longest trailing
    run of dotted segments with it whose remaining leading segments are a subsequence of the
    name's (transformers' renamings add wrappers such as ``language_model``); shapes must agree.
    """
    by_tail: dict[tuple[str, str], list[str]] = {}
    for key in available:
        by_tail.setdefault(tuple(key.split(".")[-2:]), []).append(key)
    out, problems = {}, []
    for name, shape in wanted.items():
        if name in available:
            key = name
        else:
            parts = name.split(".")
            scored = []
            for key in by_tail.get(tuple(parts[-2:]), []):
                other = key.split(".")
                common = 0
                while common < min(len(parts), len(other)) and parts[-1 - common] == other[-1 - common]:
                    common += 1
                if _subsequence(other[:len(other) - common], parts[:len(parts) - common]):
                    scored.append((common, key))
            scored.sort(reverse=True)
            if not scored:
                problems.append(f"{name}: no tensor")
                continue
            if len(scored) > 1 and scored[0][0] == scored[1][0]:
                problems.append(f"{name}: ambiguous ({', '.join(k for _, k in scored[:3])})")
                continue
            key = scored[0][1]
        if tuple(available[key]) != tuple(shape):
            problems.append(f"{name}: checkpoint {key} has shape {tuple(available[key])}, the model {tuple(shape)}")
            continue
        out[name] = key
    if problems:
        more = f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError("the checkpoint does not match the model built from its config.json:\n  "
                         + "\n  ".join(problems[:10]) + more)
    taken = {}
    for name, key in out.items():
        if key in taken:
            raise ValueError(f"checkpoint tensor {key} matches both {taken[key]} and {name}")
        taken[key] = name
    return out


def _subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(any(s == x for x in it) for s in short)


class LayerStream:
    """Materialises decoder layers one at a time from the checkpoint and writes each, once
    quantized, to its own output shard (``quantize_layers`` calls ``load`` and ``release``)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, tensors: CheckpointTensors, names: dict[str, str],
                 dtype: torch.dtype, device: torch.device, out: Path | None):
        self.model, self.layers, self.tensors, self.names = model, layers, tensors, names
        self.dtype, self.device, self.out = dtype, device, out
        prefix = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [prefix[id(layer)] for layer in layers]
        self.total = len(layers) + 1  # one shard per decoder layer and one for everything else
        self.weight_map: dict[str, str] = {}
        self.layouts: dict[str, dict] = {}

    def shard(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.total:05d}.safetensors"

    def load(self, i: int, layer: nn.Module) -> None:
        materialise(layer, self.prefixes[i] + ".", self.tensors, self.names, self.dtype, self.device)

    def release(self, i: int, layer: nn.Module) -> None:
        """Write the quantized layer ``i`` and free it."""
        prefix = self.prefixes[i]
        self.layouts.update({f"{prefix}.{n}": m.layout() for n, m in layer.named_modules()
                             if isinstance(m, QuantLinear)})
        self._write(self.shard(i + 1), {f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
        self.layers[i] = _Released(i)  # nothing of the layer stays referenced
        release_memory()

    def write_rest(self) -> None:
        """Everything outside the decoder layers (shard 1)."""
        tied = _tied_targets(self.model)
        rest = {k: v for k, v in self.model.state_dict().items()
                if not any(k.startswith(p + ".") for p in self.prefixes) and k not in tied}
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


def _tied_targets(model: nn.Module) -> set[str]:
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ())


def materialise(module: nn.Module, prefix: str, tensors: CheckpointTensors, names: dict[str, str],
                dtype: torch.dtype, device: torch.device, skip: tuple[str, ...] = ()) -> None:
    """Give every meta parameter / buffer of ``module`` (names under ``prefix``, except those
    starting with one of ``skip``) its checkpoint value, floats cast to ``dtype``."""
    from accelerate.utils import set_module_tensor_to_device

    keep_fp32 = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    for local, value in [*module.named_parameters(), *module.named_buffers()]:
        full = f"{prefix}{local}"
        if value.device.type != "meta" or full.startswith(skip):
            continue
        if full not in names:
            continue  # a tied weight (filled by tie_weights) or a buffer the model computes itself
        tensor = tensors.get(names[full])
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if any(k in full for k in keep_fp32) else dtype)
            if not torch.isfinite(tensor).all():
                raise ValueError(f"NaN/Inf in checkpoint tensor {names[full]} ({full}) as {tensor.dtype}: the "
                                 "checkpoint is damaged, or its values overflow that dtype")
        set_module_tensor_to_device(module, local, device, value=tensor, dtype=tensor.dtype)


def skeleton(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """``(model, tensors, names, dtype)``: the model of ``directory`` with every tensor outside its
    decoder layers loaded and the decoder layers left on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from .arch import get_adapter
    from .serialization import model_class

    directory = Path(directory)
    cls, hf_config = model_class(directory)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"{directory} holds an already quantized checkpoint (config.json has a quantization_config); "
                         "streaming quantizes a full-precision (fp32 / bf16 / fp16) checkpoint")
    tensors = CheckpointTensors(directory)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(hf_config)
    adapter = get_adapter(model)
    adapter.validate(model)
    dtype = dtype or _checkpoint_dtype(hf_config)
    tied = _tied_targets(model)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    names = match_names(wanted, tensors.shapes)
    layers = adapter.decoder_layers(model)
    prefixes = {id(m): n for n, m in model.named_modules()}
    skip = tuple(prefixes[id(layer)] + "." for layer in layers)
    materialise(model, "", tensors, names, dtype, torch.device(device), skip)
    if tied:
        model.tie_weights()
    for name, buffer in list(model.named_buffers()):  # computed at construction (rotary tables, positions)
        if buffer.device.type != "meta" and buffer.device != torch.device(device):
            set_module_tensor_to_device(model, name, device, value=buffer)
    missing = [n for n, v in [*model.named_parameters(), *model.named_buffers()]
               if v.device.type == "meta" and not n.startswith(skip)]
    if missing:
        raise ValueError(f"{directory}: no checkpoint value for {missing[:5]}")
    return model.eval(), tensors, names, dtype


def _checkpoint_dtype(hf_config) -> torch.dtype:
    """What ``from_pretrained`` loads: the dtype the config records, else float32."""
    for config in (hf_config, getattr(hf_config, "text_config", None)):
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value != "auto":
            return getattr(torch, value)
    return torch.float32


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
    does ``offload`` (the calibration activations in host memory or files, not on ``device``). Methods
    that need a gradient pass through the whole model (``mbq``, ``lambdas="auto"``) are refused.
    """

    if config.method == "mbq" or config.lambdas == "auto":
        raise ValueError(f"method {config.method!r} with lambdas={config.lambdas!r} needs a backward pass through "
                         "the whole model (MBQ gradient ratios), which streaming does not do; use fixed lambdas "
                         "(the default) or another method, or quantize in memory")
    if checkpoint is not None and distributed.world_size() > 1:
        raise ValueError("checkpoint / resume is not available with data-parallel calibration "
                         f"({distributed.world_size()} processes); calibrate in one process to make the run resumable")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint directory of the run to continue")
    with large_allocations_mapped():
        return _quantize_streaming(directory, calib, config, Path(out), processor, progress, overwrite, checkpoint,
                                   resume, extra_files, reference, dtype, device, offload)


def _quantize_streaming(directory, calib, config, out, processor, progress, overwrite, checkpoint, resume,
                        extra_files, reference, dtype, device, offload) -> QuantReport:
    from .api import quantize
    from .arch import get_adapter
    from .serialization import staged_directory, write_metadata

    model, tensors, names, dtype = skeleton(directory, dtype, device)
    layers = get_adapter(model).decoder_layers(model)
    if distributed.rank() != 0:  # data-parallel: every rank calibrates, rank 0 alone writes
        stream = LayerStream(model, layers, tensors, names, dtype, torch.device(device), None)
        return quantize(model, calib, config, progress=progress, source=stream, offload=offload)
    with staged_directory(out, overwrite) as tmp:
        stream = LayerStream(model, layers, tensors, names, dtype, torch.device(device), tmp)
        report = quantize(model, calib, config, progress=progress, checkpoint=checkpoint, resume=resume,
                          source=stream, offload=offload)
        stream.write_rest()
        stream.write_index()
        write_metadata(tmp, model, stream.layouts, processor, {"report.json": report.to_json(), **(extra_files or {})},
                       reference)
    log.info("streamed %d decoder layers of %s into %s", len(layers), directory, out)
    return report
