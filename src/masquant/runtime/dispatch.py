"""Which kernels run a quantized linear, decided in one place (``forward``).

* ``native``: few contiguous float32 rows on the CPU through a small symmetric layer, or
  decoding's rows through a large one (``native.small``): the whole linear, the smoothing vectors
  and the patches in one C++ call (``native.Plan``, bound once);
* ``fused``: many rows where ``torch.compile`` works: smoothing, per-token quantization, the
  int8 GEMM and its epilogue as one compiled region (``kernels.fused_linear``);
* ``eager``: the same integer arithmetic op by op (``kernels.int_linear``; asymmetric or
  grouped weights always take it);
* ``gemm``: where ``torch._int_mm`` is slower than an FP32 matmul (CPUs without AVX-512 VNNI
  or AMX, where PyTorch runs it in plain loops; ``int_gemm_fast``, measured once per process),
  the same codes through masquant's blocked, threaded AVX2 GEMM (``native.gemm``);
* ``dequant``: there, where the native GEMM cannot run (no compiler, no AVX2, grouped or
  asymmetric weights), the same activation codes times the weight dequantized once to float32
  (the model still stores integers);
* ``float``: dequantized weight and fake-quantized activations in floating point
  (``runtime="fake"``, the simulation research code uses, and weight-only ``a_bits=16``).

All give the same values up to float rounding; without patches the integer ones are
bit-identical. Patches are added to their modality's rows after the product (except ``native``).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..modality import Modality, Routes
from ..switches import switches
from . import kernels, native
from .primitives import fake_quantize_per_token
from .stored import IntWeight, patch_rows

log = logging.getLogger("masquant")

QuantLinear = nn.Module  # (``qlinear.QuantLinear``, which imports this module)


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"{type(layer).__name__} takes {layer.in_features} input features, got input of shape "
                         f"{tuple(x.shape)}")
    layer.sync_flags()
    kind = kernel(layer, x)
    y = _native_layer(layer, x) if kind == "native" else None
    if y is not None:
        return y
    rows = x.reshape(-1, layer.in_features)
    routes = layer.router.routes(x) if layer.needs_ids else None
    if layer.modality_qweights:  # MAS-only: each modality's rows with its own weight
        y = rows.new_empty(rows.shape[0], layer.out_features, dtype=layer.compute_dtype)
        for modality, idx in routes.rows.items():
            one = layer.smooth[modality:modality + 1]
            y[idx] = _matmul(layer, rows[idx], one, None, layer.weight_of(Modality(modality)))
    else:
        y = _matmul(layer, rows, layer.smooth, routes, layer.qweight, kind)
    if layer._modules["patches"]:
        _add_patches(layer, y, rows, routes)
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


def kernel(layer: QuantLinear, rows: torch.Tensor) -> str:
    """Which kernels run ``rows`` (``[..., in]``) through ``layer``: ``"fused"``, ``"native"``,
    ``"gemm"``, ``"eager"``, ``"dequant"`` or ``"float"`` (see the module docstring)."""
    if layer.runtime != "int" or layer.a_bits >= 16:
        return "float"
    if layer.grid.symmetric and layer.w_group_size in (0, -1):  # (asymmetric and grouped codes: eager / dequant)
        if native.usable(rows, layer.out_features):
            return "native"
        if kernels.use_fusion(rows) and int_gemm_fast(rows.device):
            return "fused"
        if rows.is_cpu and not int_gemm_fast(rows.device) and not torch.compiler.is_compiling() \
                and native.gemm_ready():
            return "gemm"
    return "eager" if int_gemm_fast(rows.device) else "dequant"


_probed: dict[bool, bool] = {}  # oneDNN enabled -> whether torch._int_mm beat FP32 on this CPU


def int_gemm_fast(device: torch.device) -> bool:
    """Whether integer GEMMs (``torch._int_mm``) beat FP32 on ``device``: always on a GPU; on the
    CPU measured once per process (``MASQUANT_INT_GEMM`` forces it) and logged."""
    mode = switches().int_gemm
    if mode != "auto":
        return mode == "int"
    if device.type != "cpu":
        return True
    onednn = torch.backends.mkldnn.enabled
    if onednn not in _probed:
        if torch.compiler.is_compiling():  # (no measurement inside a trace: the eager integer kernels)
            return True
        _probed[onednn] = probe_int_gemm()
    return _probed[onednn]


def probe_int_gemm() -> bool:
    """``torch._int_mm`` against an FP32 matmul of the same 128 x 512 x 512 product (best of three);
    PyTorch runs it through oneDNN only where the CPU has AVX-512 VNNI or AMX, else in plain loops."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (128, 512), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=gen)
    af, bf = a.float(), b.float()
    int_ms, float_ms = _best_ms(lambda: torch._int_mm(a, b.T)), _best_ms(lambda: af @ bf.T)
    fast = int_ms <= float_ms
    if fast:
        log.info("integer GEMMs: torch._int_mm (%.2f ms against FP32's %.2f ms on a 128x512x512 probe)", int_ms,
                 float_ms)
    else:
        instead = ("masquant's native AVX2 GEMM" if native.gemm_ready() else
                   "their weights dequantized once to float32 (the model still stores integers)")
        log.warning("torch._int_mm is %.0fx slower than FP32 on this CPU (no AVX-512 VNNI / AMX path): quantized "
                    "linears with many rows run %s instead (MASQUANT_INT_GEMM=int forces torch._int_mm)",
                    int_ms / float_ms, instead)
    return fast


def _best_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def _native_layer(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
    """The whole linear, smoothing and patches included, as one native call (or None): for a
    float32 layer with one weight for all modalities, on contiguous float32 rows on the CPU
    (``kernel`` chose ``"native"`` for them)."""
    if not (layer.compute_dtype == torch.float32 and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    modules, buffers = layer._modules, layer._buffers  # (direct: nn.Module's __getattr__ costs a few us here)
    if modules["modality_qweights"]:
        return None
    patches, ids = modules["patches"], None
    if layer.needs_ids:
        routes = layer.router.routes(x)
        if not ((layer.uniform and not patches) or (routes.text_only and not layer.patches_text)):
            ids = routes.ids  # else one vector (the text one) for every row, and no patch
    elif patches:  # one patch for every row and one vector: any ids pick it
        ids = torch.zeros(x.numel() // layer.in_features, dtype=torch.int64)
    weight = modules["qweight"]
    codes, scale, bias = weight._buffers["codes"], weight._buffers["scale"], buffers["bias"]
    if codes.device.type != "cpu":  # (a layer on another device than its input: the general path says so)
        return None
    smooth = None if layer.unsmoothed and not patches else buffers["smooth"]  # (patches are picked by table row)
    folded = layer.folded_patches(smooth) if ids is not None else None  # (only calls with ids read patches)

    def bind() -> native.Plan:
        return native.Plan(weight.int8(), codes, scale, bias, smooth, layer.a_bits, weight.row_sums(),
                           weight.native_codes(), patches=layer.folded_patches(smooth) if folded is None else folded)

    plan = layer._native.get((codes, scale, bias, smooth), bind)
    if folded is not None and not plan.holds(folded):  # a patch changed since the plan was bound
        layer._native.clear()
        plan = layer._native.get((codes, scale, bias, smooth), bind)
    return plan(x, ids)  # (any leading shape: the rows are contiguous)


def _matmul(layer: QuantLinear, rows: torch.Tensor, smooth: torch.Tensor, routes: Routes | None,
            weight: IntWeight, kind: str | None = None) -> torch.Tensor:
    """``Q_a(x / smooth[ids]) @ W^T + b`` by the kernels ``kernel`` picks; ``smooth`` is the table,
    or one row of it for one modality's rows (MAS-only; ``kind`` then chosen for those rows)."""
    kind = kind or kernel(layer, rows)
    if kind == "fused":
        ids = None if routes is None else routes.ids
        return kernels.fused_linear(rows, layer.a_bits, smooth, ids, weight.int8(), weight.scale, layer.bias,
                                    layer.compute_dtype)
    if kind == "float":
        xq = fake_quantize_per_token(_smoothed(layer, rows, smooth, routes), layer.a_bits).to(layer.compute_dtype)
        return F.linear(xq, weight.dequantize(layer.compute_dtype), layer.bias)
    # smoothed in float32, as the fused kernel does (bf16 / fp16 models give the same codes either way)
    xs = _smoothed(layer, rows.float(), smooth, routes)
    if kind == "native":  # a few tokens (decoding): one native call per product
        return native.int_linear(xs, layer.a_bits, weight.int8(), weight.scale, layer.bias,
                                 weight.row_sums(), weight.native_codes()).to(layer.compute_dtype)
    if kind == "gemm":  # (quantized per token in the same native call)
        return native.gemm(xs, layer.a_bits, weight.gemm_codes(), layer.out_features, weight.scale,
                           layer.bias).to(layer.compute_dtype)
    codes, scale = kernels.quantize_tokens(xs, layer.a_bits)
    if kind == "dequant":  # the same codes, times the float32 weight
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(codes.float().mul_(scale), weight.float32(), bias).to(layer.compute_dtype)
    zero = None if layer.grid.symmetric else weight.zero
    return kernels.int_linear(codes, scale, weight.int8(), weight.scale, zero, layer.w_group_size,
                              layer.bias).to(layer.compute_dtype)


def _smoothed(layer: QuantLinear, rows: torch.Tensor, smooth: torch.Tensor, routes: Routes | None) -> torch.Tensor:
    if smooth.shape[0] == 1:  # one modality's rows (MAS-only)
        return rows / smooth[0].to(rows.dtype)
    return layer.smoothed_input(rows, routes)


def _add_patches(layer: QuantLinear, y: torch.Tensor, rows: torch.Tensor, routes: Routes | None) -> None:
    """Each patch's product added to the rows of its modality (no work for the others); a patch for every row
    on one vector in one product (``routes`` None: the layer needs no ids)."""
    for name, patch in layer.patches.items():
        targets = patch_rows(name)
        if routes is None or (layer.uniform and len(targets) > 1):
            patch.add_to(y, rows, layer.smooth, 0)
            continue
        for modality in targets:
            idx = routes.rows.get(modality)
            if isinstance(idx, slice):  # one run of rows: views, the product added in place
                patch.add_to(y[idx], rows[idx], layer.smooth, modality)
            elif idx is not None:
                y.index_add_(0, idx, patch(rows.index_select(0, idx), layer.smooth, modality).to(y.dtype))
