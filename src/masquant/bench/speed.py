"""``masquant bench --speed``: the integer runtime against floating point, as ratios measured
in one run (machines are noisy; absolute times are printed but only ratios are compared).

* linear level: shapes of Qwen2.5-VL-3B / 7B, a 4096 x 4096 square and ref-vl's 256 x 256, 1 to 2048 tokens:
  FP32 and BF16 ``nn.Linear``, the raw ``torch._int_mm`` kernel, W8A8 / W4A8 ``QuantLinear``,
  MASQuant W8A8 (rank-32 patch, half of the tokens non-text) and torchao's dynamic int8
  when it is installed;
* whole model: prefill and per-token decode of the reference models and of a random
  Qwen2.5-VL with 3B-wide decoder layers;
* checkpoint bytes per parameter.

Patches and per-modality vectors of the speed-only models are random: these measure time and
bytes, not accuracy (accuracy is ``masquant bench`` without ``--speed``).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import zlib
from collections.abc import Callable

import torch
from torch import nn

from ..config import QuantConfig
from ..modality import NUM_MODALITIES, Modality, ModalityRouter
from ..runtime import dispatch
from ..runtime.qlinear import QuantLinear

log = logging.getLogger("masquant")

LINEAR_SHAPES = {  # name: (in_features, out_features)
    "square 4096": (4096, 4096),
    "3B attn 2048>2048": (2048, 2048),
    "3B up 2048>11008": (2048, 11008),
    "3B down 11008>2048": (11008, 2048),
    "7B up 3584>18944": (3584, 18944),
    "7B down 18944>3584": (18944, 3584),
    "ref-vl attn 256>256": (256, 256),  # the reference model's width: where decode spends its time
}
TOKENS = (1, 16, 512, 2048)
RAW_LIMIT = 1 << 28  # multiply-adds of the largest raw torch._int_mm timed where it runs in plain loops
ROUNDS = 3


def timeit(fn: Callable[[], object], min_time: float = 0.3, min_runs: int = 3, max_runs: int = 50,
           device: str = "cpu") -> float:
    """Median seconds per call after one warm-up call (one timed call when a call is slow); on
    CUDA each call is followed by a synchronisation, so that the GPU's work is counted."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call() -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    if call() > 3 * min_time:
        min_runs = 1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < max_runs):
        times.append(call())
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS, **timeit_kw) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds that time every function once
    in turn, so that a slow spell of the machine hits all of them alike."""
    samples: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            samples[label].append(timeit(fn, **timeit_kw))
    return {label: statistics.median(t) for label, t in samples.items()}


def quant_linear(linear: nn.Linear, w_bits: int, a_bits: int = 8, rank: int = 0,
                 router: ModalityRouter | None = None, seed: int = 0) -> QuantLinear:
    """A W{w_bits}A{a_bits} ``QuantLinear`` of ``linear``; with ``rank``, a distinct vision vector (drawn
    from ``seed``: linears reading one input share it, as calibrated models do) and a random
    rank-``rank`` vision patch (MASQuant's runtime cost, not its accuracy)."""
    smooth = torch.ones(NUM_MODALITIES, linear.in_features)
    if rank:
        smooth[Modality.VISION] = torch.rand(linear.in_features, generator=torch.Generator().manual_seed(seed)) + 0.5
    config = QuantConfig(method="masquant" if rank else "rtn", w_bits=w_bits, a_bits=a_bits)
    q = QuantLinear.from_linear(linear, smooth, config, router)
    if rank:
        q.add_patch(Modality.VISION, torch.randn(linear.in_features, rank) * 1e-2,
                    torch.randn(rank, linear.out_features) * 1e-2)
    return q


def _torchao_linear(linear: nn.Linear) -> nn.Module | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception:  # torchao absent, or built for another torch
        return None
    model = nn.Sequential(copy.deepcopy(linear))
    try:
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    except Exception as err:
        log.info("torchao could not quantize a linear here: %s", err)
        return None
    return model


@torch.no_grad()
def linear_rows(shapes: dict[str, tuple[int, int]], tokens: tuple[int, ...], device: str = "cpu") -> list[dict]:
    """Per shape and token count: milliseconds of FP32 and speed-up of every other variant."""
    from ..runtime.kernels import int_matmul

    rows = []
    for name, (k, n) in shapes.items():
        torch.manual_seed(0)
        fp32 = nn.Linear(k, n)
        variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"fp32": fp32.to(device)}
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        variants["bf16"] = lambda x, m=bf16: m(x.to(torch.bfloat16))
        w8 = quant_linear(fp32, 8)
        codes = w8.qweight.int8()
        variants["int_mm kernel"] = lambda x, c=codes: int_matmul(x, c)
        variants["W8A8"] = w8
        variants["W4A8"] = quant_linear(fp32, 4)
        router = ModalityRouter({})
        variants["MASQuant W8A8 r32"] = quant_linear(fp32, 8, rank=32, router=router)
        torchao = _torchao_linear(fp32) if device == "cpu" else None
        if torchao is not None:
            variants["torchao int8 dyn"] = torchao
        for m in tokens:
            fns = dict(variants)
            if not dispatch.int_gemm_fast(torch.device(device)) and m * k * n > RAW_LIMIT:
                del fns["int_mm kernel"]  # (PyTorch's plain loops: minutes per call, and nothing runs them)
            x = torch.randn(m, k, device=device)
            ids = torch.zeros(m, dtype=torch.long, device=device)
            ids[m // 2:] = int(Modality.VISION)  # half of the tokens are vision tokens
            x_int8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
            row = {"shape": name, "in": k, "out": n, "tokens": m, "device": device}
            with router.scope(ids):
                seconds = interleaved({label: (lambda fn=fn, arg=x_int8 if label == "int_mm kernel" else x: fn(arg))
                                       for label, fn in fns.items()}, min_time=0.1, device=device)
            row["ms"] = {label: 1e3 * t for label, t in seconds.items()}
            row["speedup"] = {label: row["ms"]["fp32"] / ms for label, ms in row["ms"].items()}
            log.info("%s x %d tokens: %s", name, m, {k: f"{v:.2f}x" for k, v in row["speedup"].items()})
            rows.append(row)
    return rows


def synthetic_quantize(model: nn.Module, w_bits: int, a_bits: int = 8, rank: int = 0) -> nn.Module:
    """Swap every decoder linear of ``model`` for a ``quant_linear`` (RTN; random vision vector
    and patch with ``rank``), with the model's modality router attached. Speed only."""
    from ..arch import get_adapter
    from ..modality import attach_router

    router = get_adapter(model).router(model.config)
    _swap_decoder_linears(model, lambda linear, group: quant_linear(
        linear, w_bits, a_bits, rank if group.smooth else 0, router, seed=zlib.crc32(group.name.encode())))
    attach_router(model, router)
    return model


def _swap_decoder_linears(model: nn.Module, make: Callable) -> None:
    """Replace every decoder linear that quantization replaces by ``make(linear, group)``."""
    from ..arch import get_adapter
    from ..runtime.qlinear import replace_module

    adapter = get_adapter(model)
    for layer in adapter.decoder_layers(model):
        for group in adapter.groups:
            for path in group.linears:
                replace_module(layer, path, make(layer.get_submodule(path), group))


FREE = "decoder linears free (bound)"  # the whole-model variant whose decoder linears cost nothing


class _FreeLinear(nn.Module):
    """A stand-in for a decoder linear that costs one allocation: its output is zeros."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def free_linears(model: nn.Module) -> nn.Module:
    """``model`` with every decoder linear that quantization replaces made (almost) free: its time
    is what no linear kernel can remove, so ``fp32 / free`` bounds the speed-up of any quantized
    variant (Amdahl). Speed only: the outputs are meaningless."""
    _swap_decoder_linears(model, lambda linear, group: _FreeLinear(linear))
    return model


@torch.no_grad()
def model_rows(name: str, models: dict[str, nn.Module], prompt: dict, short_prompt: dict, device: str = "cpu",
               decode_tokens: int = 32) -> list[dict]:
    """Prefill (one forward over ``prompt``) and decode (per generated token after
    ``short_prompt``, from the difference of two ``generate`` lengths) of every variant in
    milliseconds, all variants timed in interleaved rounds; plus checkpoint bytes."""
    fns: dict[str, Callable[[], object]] = {}
    for label, model in models.items():
        def gen(n: int, model: nn.Module = model) -> None:
            model.generate(**short_prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        fns[f"{label}|prefill"] = lambda model=model: model(**prompt, use_cache=False)
        fns[f"{label}|short"] = lambda gen=gen: gen(1)
        fns[f"{label}|long"] = lambda gen=gen: gen(1 + decode_tokens)
    seconds = interleaved(fns, min_time=1.0, device=device)
    rows = []
    for label, model in models.items():
        row = {"model": name, "variant": label, "prompt_tokens": int(prompt["input_ids"].shape[1]), "device": device,
               "prefill_ms": 1e3 * seconds[f"{label}|prefill"],
               "decode_ms": 1e3 * max(seconds[f"{label}|long"] - seconds[f"{label}|short"], 0.0) / decode_tokens}
        if any(isinstance(m, QuantLinear) for m in model.modules()):
            row.update(checkpoint_bytes(model))
        log.info("%s %s: prefill %.1f ms, decode %.2f ms/token", name, label, row["prefill_ms"], row["decode_ms"])
        rows.append(row)
    return rows


def checkpoint_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of the decoder linears (weights, scales, zero points, patches, vectors) and of the
    whole state dict with unquantized tensors counted in FP16, both per parameter of the
    original model, next to FP16's 2 bytes per parameter."""
    linear_params = linear_bytes = other_params = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            linear_params += module.in_features * module.out_features + (module.out_features if module.bias is not None
                                                                         else 0)
            linear_bytes += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    seen = {t.data_ptr() for m in model.modules() if isinstance(m, QuantLinear) for t in m.state_dict().values()}
    for t in model.state_dict().values():
        if t.data_ptr() not in seen and t.is_floating_point():
            seen.add(t.data_ptr())
            other_params += t.numel()
    total_params = linear_params + other_params
    return {"linear_bytes_per_param": linear_bytes / max(linear_params, 1),
            "linear_vs_fp16": linear_bytes / max(2 * linear_params, 1),
            "model_vs_fp16": (linear_bytes + 2 * other_params) / max(2 * total_params, 1)}


def _strip(sample: dict, device: str = "cpu") -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in sample.items() if k != "labels"}


def wide_model_rows(layers: int, device: str = "cpu") -> list[dict]:
    """A random Qwen2.5-VL with Qwen2.5-VL-3B-wide decoder layers (2048 / 11008, 16 heads):
    FP32, BF16, W8A8, W4A8, MASQuant W8A8 (rank 32) and W8A8 of the BF16 model (integer linears,
    everything else in bf16); a 512-token prompt, half image."""
    from ..refmodels import tiny

    fp = tiny.tiny_qwen2_5_vl(hidden=2048, layers=layers, intermediate=11008, heads=16).to(device)
    prompt = _strip(tiny.tiny_sample(0, "vl", text_len=254, image_grid=32), device)  # 256 image tokens + 2 markers
    short = _strip(tiny.tiny_sample(1, "vl", image=False, text_len=16), device)
    models = {"fp32": fp, "bf16": copy.deepcopy(fp).to(torch.bfloat16),
              "W8A8": synthetic_quantize(copy.deepcopy(fp), 8),
              "W4A8": synthetic_quantize(copy.deepcopy(fp), 4),
              "MASQuant W8A8 r32": synthetic_quantize(copy.deepcopy(fp), 8, rank=32),
              "W8A8 on bf16": synthetic_quantize(copy.deepcopy(fp).to(torch.bfloat16), 8),
              FREE: free_linears(copy.deepcopy(fp))}
    return model_rows(f"random Qwen2.5-VL, {layers} layers 3B-wide", models, prompt, short, device)


def reference_model_rows(name: str = "ref-vl", calib_samples: int = 16) -> list[dict]:
    """A shipped reference model: FP32, W8A8 RTN and W8A8 MASQuant (really calibrated)."""
    from ..calibration.quantize import quantize
    from ..refmodels import registry
    from ..refmodels.evaluate import calibration_inputs, comparison_inputs

    fp, processor = registry.load(name)
    calib = calibration_inputs(processor, name)
    calib = calib[:: max(len(calib) // calib_samples, 1)][:calib_samples]
    prompt = _strip(comparison_inputs(processor, name, n=1)[0])
    models = {"fp32": fp}
    for label, config in (("W8A8", QuantConfig(method="rtn")),
                          ("MASQuant W8A8 r32", QuantConfig(method="masquant", epochs=1))):
        models[label] = copy.deepcopy(fp)
        quantize(models[label], calib, config, progress=False)
    models[FREE] = free_linears(copy.deepcopy(fp))
    return model_rows(name, models, prompt, prompt)
