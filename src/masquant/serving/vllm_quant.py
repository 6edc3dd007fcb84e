"""masquant as a vLLM quantization method (``quant_method: "masquant"``, written by
``masquant export --format vllm``).

vLLM loads the checkpoint into its fused linears (``qkv_proj``, ``gate_up_proj``): each shard's codes,
scales, smoothing table and patches are placed at the shard's rows (patch factors block-diagonally,
so every shard keeps its own). After loading, each fused linear becomes one ``QuantLinear`` whose
buffers are the loaded tensors, and vLLM's ``apply`` runs it: the same kernels and the same
arithmetic as masquant's own runtime. Which token is which comes from ``StepRouter``, which the
routed model (``vllm_models``) fills at every step from vLLM's multimodal placeholder mask.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..config import QuantConfig
from ..io.export_vllm import FORMAT_VERSION, QUANT_METHOD
from ..modality import NUM_MODALITIES, Modality, ModalityRouter, Routes, ids_from_tokens, routes_of
from ..runtime.qlinear import QuantLinear
from ..runtime.stored import LowRankPatch, patch_row
from ..switches import switches

log = logging.getLogger("masquant")

_QKV = {"q": 0, "k": 1, "v": 2}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


class StepRouter(ModalityRouter):
    """The modality of every token of the vLLM step in flight (flat, in vLLM's token order): a
    placeholder is media where vLLM merges encoder outputs into it (``is_multimodal``), else text,
    as decoded tokens and cached prompts are. Rows beyond the recorded ones (padding) are text.
    A step's routes are cached by the identity of its ids (vLLM runs in inference mode, whose tensors
    have no version counter for ``Derived``)."""

    def __init__(self, table):
        super().__init__(table)
        self._last: tuple = ()  # (ids, rows, device, routes): one step's routes, made by its first linear
        self.enabled = switches().routing  # (off: every token on the text path, to measure what routing costs)

    def record(self, input_ids: torch.Tensor, is_multimodal: torch.Tensor | None) -> None:
        if is_multimodal is None or not self.enabled or not bool(is_multimodal.any()):
            self.ids = None
            return
        ids = ids_from_tokens(input_ids, self.table)
        ids[~is_multimodal.to(torch.bool)] = int(Modality.TEXT)
        self.ids = ids

    def routes(self, x: torch.Tensor) -> Routes:
        n, ids = x.numel() // x.shape[-1], self.ids
        if self._last and self._last[0] is ids and self._last[1:3] == (n, x.device):
            return self._last[3]
        if ids is None:
            flat = torch.zeros(n, dtype=torch.long, device=x.device)
        elif ids.numel() > n:
            raise RuntimeError(f"masquant: {ids.numel()} modality ids recorded for a step of {n} rows")
        else:
            flat = torch.cat([ids, ids.new_zeros(n - ids.numel())]).to(x.device)
        routes = routes_of(flat)
        self._last = (ids, n, x.device, routes)
        return routes


@register_quantization_config(QUANT_METHOD)
class MasquantConfig(QuantizationConfig):
    """The ``quantization_config`` of a masquant vLLM export."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        version = spec.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"masquant vLLM export format {version!r} is not {FORMAT_VERSION}; re-export the model "
                             "with this masquant (masquant export SOURCE --format vllm --out DIR)")
        self.quant = QuantConfig.from_dict({**spec["quant_config"], "runtime": "int"})
        self.linears: dict[str, dict] = spec["linears"]
        self.router = StepRouter({int(k): Modality[v.upper()] for k, v in spec["router"].items()})

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MasquantConfig:
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        match = _LAYER.search(prefix)
        if match is None or ".visual." in f".{prefix}" or ".audio_tower." in f".{prefix}":
            return UnquantizedLinearMethod()
        index, path = match.groups()
        parent, _, leaf = path.rpartition(".")
        shards = [f"{parent}.{s}" if parent else s for s in self.packed_modules_mapping.get(leaf, [leaf])]
        layouts = [self.linears.get(f"{index}.{s}") for s in shards]
        if all(layout is None for layout in layouts):
            return UnquantizedLinearMethod()
        if any(layout is None for layout in layouts):
            raise ValueError(f"masquant: {prefix} fuses {', '.join(shards)}, of which only some are quantized")
        return MasquantLinearMethod(self, prefix, layouts)


class MasquantLinearMethod(LinearMethodBase):
    """One fused vLLM linear run by one ``QuantLinear``."""

    def __init__(self, config: MasquantConfig, prefix: str, layouts: list[dict]):
        self.config, self.prefix, self.layouts = config, prefix, layouts
        self.modalities = sorted({m for layout in layouts for m in layout["patches"]},
                                 key=patch_row)

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise NotImplementedError("masquant serving runs with tensor_parallel_size=1 for now")
        sizes = list(output_partition_sizes)
        if len(sizes) != len(self.layouts) or any(n != lay["out"] for n, lay in zip(sizes, self.layouts, strict=True)):
            raise ValueError(f"masquant: {self.prefix} has shards of {sizes} outputs; the export has "
                             f"{[lay['out'] for lay in self.layouts]}")
        groups = {lay["groups"] for lay in self.layouts}
        if len(groups) != 1:
            raise ValueError(f"masquant: the shards of {self.prefix} have different weight groupings {groups}")
        quant, width, out = self.config.quant, input_size, output_size
        packed = quant.w_bits <= 4
        codes = torch.empty(out, (width + 1) // 2 if packed else width, dtype=torch.uint8 if packed else torch.int8)
        rows = _offsets(sizes)
        scale_shape = (out, groups.pop())
        params = {"weight": (codes, _rows(rows)),
                  "weight_scale": (torch.empty(scale_shape), _rows(rows)),
                  "weight_zero": (torch.empty(scale_shape), _rows(rows)),
                  "smooth": (torch.empty(NUM_MODALITIES, width), _shared())}
        patch_dtype = getattr(torch, getattr(quant, "patch_dtype", "float16"))
        for m in self.modalities:
            ranks = _offsets([lay["patches"].get(m, 0) for lay in self.layouts])
            total = ranks[-1][0] + ranks[-1][1]
            params[f"patch_l1_{m}"] = (torch.zeros(width, total, dtype=patch_dtype), _columns(ranks))
            params[f"patch_l2_{m}"] = (torch.zeros(total, out, dtype=patch_dtype), _blocks(ranks, rows))
        for name, (data, loader) in params.items():
            param = Parameter(data, requires_grad=False)
            param.weight_loader = _named(loader, f"{self.prefix}.{name}")
            layer.register_parameter(name, param)
        layer.masquant_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        out, width = layer.weight_scale.shape[0], layer.smooth.shape[1]
        linear = QuantLinear(width, out, False, self.config.quant, self.config.router, dtype=layer.masquant_dtype)
        stored = linear.qweight
        stored.codes = layer.weight.data  # (the loaded tensors themselves: no second copy)
        stored.scale = layer.weight_scale.data.reshape(-1, 1)
        stored.zero = layer.weight_zero.data.reshape(-1, 1)
        linear.set_smoothing(layer.smooth.data.float())
        for m in self.modalities:
            linear.patches[m] = LowRankPatch(getattr(layer, f"patch_l1_{m}").data, getattr(layer, f"patch_l2_{m}").data)
        linear.eval()
        layer.__dict__["masquant_linear"] = linear  # (not a submodule: vLLM's loaders walk those)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = layer.__dict__["masquant_linear"](x)
        return y if bias is None else y + bias


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    """``(start, size)`` of consecutive blocks."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes, strict=True))


def _shard(shard_id: Any) -> int:
    if shard_id is None:
        return 0
    return _QKV[shard_id] if isinstance(shard_id, str) else int(shard_id)


def _named(loader, name: str):
    def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        target = loader(param.data, _shard(shard_id), loaded)
        if target is None:
            return
        if target.shape != loaded.shape:
            raise ValueError(f"masquant: {name} (shard {shard_id}) takes {tuple(target.shape)}, the checkpoint "
                             f"holds {tuple(loaded.shape)}")
        target.copy_(loaded)
    return load


def _rows(rows):
    return lambda data, i, loaded: data[rows[i][0]:rows[i][0] + rows[i][1]]


def _columns(ranks):
    return lambda data, i, loaded: data[:, ranks[i][0]:ranks[i][0] + ranks[i][1]]


def _blocks(ranks, rows):
    return lambda data, i, loaded: data[ranks[i][0]:ranks[i][0] + ranks[i][1], rows[i][0]:rows[i][0] + rows[i][1]]


def _shared():
    """The smoothing table, one for the fused shards (they read the same input): the first shard
    loaded sets it, the others must agree."""
    seen = []

    def place(data, i, loaded):
        if not seen:
            seen.append(i)
            return data
        if not torch.equal(data, loaded.to(data.dtype)):
            raise ValueError("masquant: the fused shards of a linear carry different smoothing tables; vLLM fuses "
                             "linears that read the same input, which masquant smooths with one table")
        return None
    return place
