"""Reading a Hugging Face safetensors checkpoint a piece at a time (``masquant.calibration.streaming``).

``skeleton(directory)`` builds the model without allocating its weights and loads every tensor outside
the decoder layers; ``Skeleton.load_layer(i)`` fills in decoder layer ``i``. ``match_names`` pairs module
names with checkpoint names, which transformers may rename (``model.layers`` ->
``model.language_model.layers``), and refuses anything ambiguous, missing or of another shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..io.serialization import WEIGHTS_INDEX as INDEX

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # no float8: such checkpoints carry scales that are not weights


class CheckpointTensors:
    """Tensors of a safetensors checkpoint directory (one file, or shards with an index), read by name with
    plain reads, not memory-mapped: mapping a whole shard would count against the process's memory limit."""

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
    """Module tensor name -> checkpoint key for every name in ``wanted``: the identical key, else the one with
    the longest common dotted tail whose other segments are a subsequence of the name's (wrappers such as
    ``language_model``); shapes must agree."""
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


def tied_targets(model: nn.Module) -> set[str]:
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ())


def materialise(module: nn.Module, prefix: str, tensors: CheckpointTensors, names: dict[str, str],
                dtype: torch.dtype, device: torch.device, skip: tuple[str, ...] = (),
                keep_fp32: tuple[str, ...] = ()) -> None:
    """Give every meta parameter / buffer of ``module`` (names under ``prefix``, except those
    starting with one of ``skip``) its checkpoint value, floats cast to ``dtype`` (float32 for
    names containing one of ``keep_fp32``)."""
    from accelerate.utils import set_module_tensor_to_device

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


@dataclass
class Skeleton:
    """A model whose decoder layers are still on the meta device, and where their tensors are."""

    model: nn.Module
    layers: nn.ModuleList
    prefixes: list[str]  # module name of each decoder layer
    tensors: CheckpointTensors
    names: dict[str, str]  # module tensor name -> checkpoint key
    dtype: torch.dtype
    device: torch.device
    keep_fp32: tuple[str, ...]  # modules the model keeps in float32 (``_keep_in_fp32_modules``)

    def load_layer(self, index: int) -> None:
        """Give decoder layer ``index`` its checkpoint values, on ``device``."""
        materialise(self.layers[index], self.prefixes[index] + ".", self.tensors, self.names, self.dtype,
                    self.device, keep_fp32=self.keep_fp32)

    def unload_layer(self, index: int) -> None:
        """Put decoder layer ``index``'s checkpoint tensors back on the meta device (freeing them);
        ``load_layer`` reads them again."""
        from accelerate.utils import set_module_tensor_to_device

        layer, prefix = self.layers[index], self.prefixes[index] + "."
        for local, _ in [*layer.named_parameters(), *layer.named_buffers()]:
            if prefix + local in self.names:
                set_module_tensor_to_device(layer, local, "meta")


def skeleton(directory: str | Path, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> Skeleton:
    """The model of ``directory`` with every tensor outside its decoder layers loaded and the
    decoder layers left on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from ..arch import get_adapter
    from ..io.serialization import model_class

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
    tied = tied_targets(model)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    names = match_names(wanted, tensors.shapes)
    layers = adapter.decoder_layers(model)
    module_names = {id(m): n for n, m in model.named_modules()}
    prefixes = [module_names[id(layer)] for layer in layers]
    skip = tuple(p + "." for p in prefixes)
    device = torch.device(device)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    materialise(model, "", tensors, names, dtype, device, skip, keep_fp32)
    if tied:
        model.tie_weights()
    for name, buffer in list(model.named_buffers()):  # computed at construction (rotary tables, positions)
        if buffer.device.type != "meta" and buffer.device != device:
            set_module_tensor_to_device(model, name, device, value=buffer)
    missing = [n for n, v in [*model.named_parameters(), *model.named_buffers()]
               if v.device.type == "meta" and not n.startswith(skip)]
    if missing:
        raise ValueError(f"{directory}: no checkpoint value for {missing[:5]}")
    return Skeleton(model.eval(), layers, prefixes, tensors, names, dtype, device, keep_fp32)


def _checkpoint_dtype(hf_config) -> torch.dtype:
    """What ``from_pretrained`` loads: the dtype the config records, else float32."""
    for config in (hf_config, getattr(hf_config, "text_config", None)):
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value != "auto":
            return getattr(torch, value)
    return torch.float32


