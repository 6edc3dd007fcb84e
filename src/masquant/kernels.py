"""Integer kernels of the runtime: nibble packing, per-token activation quantization and the
int8 x int8 -> int32 GEMM with a dequantizing epilogue.

Weights are kept as signed codes ``c`` with per-row scales ``s`` and zero points ``z``
(``W = s * (c - z)``, ``z = 0`` for symmetric grids); activations as signed per-token codes
``q`` with scales ``t`` (``x = t * q``). Then, per weight group ``g``::

    y = t * sum_g s_g * (q_g @ c_g^T - z_g * sum(q_g)) + b

The products ``q_g @ c_g^T`` run in int32 (``torch._int_mm``) and are exact.

Fusion: the elementwise passes around the GEMM (smoothing each token by its modality's
vector, per-token abs-max, rounding to codes; the dequantizing epilogue) cost more than the
int8 GEMM itself when run as separate eager ops. Where ``torch.compile`` can generate code (a
C++ compiler on CPU, Triton on CUDA) they and the GEMM run as one compiled region
(``fused_linear``); elsewhere, or with ``MASQUANT_FUSE=0``, the same arithmetic runs eagerly.
``MASQUANT_FUSE=1`` asks for fusion even where the probe finds no compiler. Small inputs (fewer
than ``FUSE_MIN_ELEMENTS`` activations, e.g. decoding one token) run eagerly: there the call
overhead of a compiled kernel (~0.07 ms on a 2-core CPU) outweighs the passes it saves.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable

import torch

from .primitives import EPS

log = logging.getLogger("masquant")

NIBBLE_OFFSET = 8  # a signed 4-bit code c in [-8, 7] is stored as c + 8 in [0, 15]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte along the last dim (odd widths are padded with a 0 code)."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4 takes codes in [-8, 7]")
    nibbles = (codes.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=NIBBLE_OFFSET)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 codes ``[..., width]``."""
    low = (packed & 0xF).to(torch.int8) - NIBBLE_OFFSET
    high = (packed >> 4).to(torch.int8) - NIBBLE_OFFSET
    return torch.stack((low, high), -1).flatten(-2)[..., :width].contiguous()


def quantize_tokens(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token codes (int8) and float32 scales ``[tokens, 1]``.

    The same grid as ``primitives.fake_quantize_per_token``: ``t = max|x| / qmax``.
    """
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    # (not linalg.vector_norm(x, inf): one op, but its reduction is 7-10x slower from 37 tokens up)
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(EPS).div_(qmax)
    codes = torch.div(x, scale).round_().clamp_(-qmax - 1, qmax).to(torch.int8)
    return codes, scale


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a [m, k]`` and ``b [n, k]``, as int32.

    ``torch._int_mm`` on CPU takes any shape (but is wrong for a single input, done in int32
    instead); on CUDA it needs more than 16 rows and widths
    that are multiples of 8, so small batches are padded and odd widths fall back to float64
    (exact for these magnitudes).
    """
    if a.device.type == "cuda":
        m, k = a.shape
        if k % 8 or b.shape[0] % 8:
            return (a.double() @ b.double().T).to(torch.int32)
        if m <= 16:
            return torch._int_mm(torch.nn.functional.pad(a, (0, 0, 0, 32 - m)), b.T)[:m]
    if a.shape[1] == 1:  # (torch 2.13's CPU _int_mm returns uninitialised memory for one input and n > 1)
        return a.to(torch.int32) @ b.to(torch.int32).T
    return torch._int_mm(a, b.T)


def int_linear(codes: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               weight_zero: torch.Tensor | None, group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``y [m, n]`` (float32) from activation codes/scales and a weight in signed codes.

    ``weight [n, k]`` int8; ``weight_scale`` / ``weight_zero`` have one entry per weight row
    (``group_size`` 0), per tensor (-1) or per group of ``group_size`` inputs (``[n * k/g, 1]``);
    ``weight_zero`` is None for symmetric grids.
    """
    n, k = weight.shape
    if group_size in (0, -1) or group_size >= k:
        acc = int_matmul(codes, weight)
        if weight_zero is None:  # int32 * float32 converts each sum to float32 on the fly: one pass less
            y = torch.mul(acc, scale)
        else:
            y = acc.float()
            y -= codes.sum(-1, keepdim=True, dtype=torch.int32).float() * weight_zero.reshape(1, -1)
            y.mul_(scale)
        y.mul_(weight_scale.reshape(1, -1))
    else:
        groups = k // group_size
        w_scale = weight_scale.reshape(n, groups)
        w_zero = None if weight_zero is None else weight_zero.reshape(n, groups)
        y = codes.new_zeros(codes.shape[0], n, dtype=torch.float32)
        for g in range(groups):
            part = slice(g * group_size, (g + 1) * group_size)
            acc = int_matmul(codes[:, part].contiguous(), weight[:, part].contiguous()).float()
            if w_zero is not None:
                acc -= codes[:, part].sum(-1, keepdim=True, dtype=torch.int32).float() * w_zero[:, g]
            y += acc * w_scale[:, g]
        y *= scale
    if bias is not None:
        y.add_(bias.float())
    return y


def _int_linear_of_smoothed(xs: torch.Tensor, qmax: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Per-token codes of the smoothed rows ``xs`` (``qmax`` a 0-d tensor, so that one compiled
    kernel serves every bit-width), the int8 GEMM and the dequantizing epilogue with ``bias``."""
    scale = xs.abs().amax(-1, keepdim=True).clamp_min(EPS) / qmax
    codes = torch.round(xs / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    y = int_matmul(codes, weight).float() * scale * weight_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# The fused kernels' bodies: two functions, so that each keeps its own compiled variants (torch.compile
# caches a bounded number per function and runs it uncompiled beyond that).
def _routed_int_linear(x, smooth, ids, qmax, weight, weight_scale, bias, dtype):
    return _int_linear_of_smoothed(x.float() / smooth[ids], qmax, weight, weight_scale, bias, dtype)


def _unrouted_int_linear(x, smooth, qmax, weight, weight_scale, bias, dtype):
    return _int_linear_of_smoothed(x.float() / smooth, qmax, weight, weight_scale, bias, dtype)


FUSE_MIN_ELEMENTS = 1 << 17  # crossover measured on CPU: 64 tokens x 2048 or 32 x 4096 features
_compiled: dict[Callable, Callable] = {}
_broken: set[str] = set()  # device types on which compiling failed once
_qmax: dict[tuple[int, torch.device], torch.Tensor] = {}


def fusion_available(device: torch.device) -> bool:
    """Whether the fused kernels are used on ``device`` (see the module's docstring)."""
    mode = os.environ.get("MASQUANT_FUSE", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MASQUANT_FUSE must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or device.type in _broken:
        return False
    return mode == "1" or _can_compile(device.type)


@functools.cache
def _can_compile(device_type: str) -> bool:
    """Whether ``torch.compile`` can generate code for this device type (probed once, not on every
    forward): inductor writes C++ for the CPU and builds it with the system's compiler, Triton for CUDA."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


def use_fusion(x: torch.Tensor) -> bool:
    """Whether a linear should run the fused kernels on activations ``x``."""
    return x.numel() >= FUSE_MIN_ELEMENTS and fusion_available(x.device)


def qmax_tensor(bits: int, device: torch.device) -> torch.Tensor:
    """The largest symmetric code at ``bits`` as a 0-d float tensor on ``device`` (one per pair):
    a tensor argument, so that one compiled variant of a kernel serves every bit-width."""
    key = (bits, device)
    if key not in _qmax:
        _qmax[key] = torch.tensor(float(2 ** (bits - 1) - 1), device=device)
    return _qmax[key]


COMPILED_VARIANTS = 64  # compiled variants allowed per function (dynamo's default: 8)


def _allow_variants() -> None:
    """Raise dynamo's per-function recompile limit to ``COMPILED_VARIANTS`` (never lower it).

    One kernel gets a variant per combination of what dynamo specialises on: output dtype, bias
    or none, per-row or per-tensor weight scale, square or not, inputs that need a gradient or
    not. One model needs a handful, but a process that quantizes and runs several (the speed
    benchmark: FP32 and bf16 models, W8 and W4, the MAS training forms) passed dynamo's default
    of 8, after which dynamo ran the kernel eagerly for every new variant (one warning)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < COMPILED_VARIANTS:
        setattr(config, name, COMPILED_VARIANTS)


def compiled(fn: Callable, device: torch.device, *args):
    """``fn(*args)``, through ``torch.compile`` (dynamic shapes, compiled once per process) where
    ``fusion_available(device)``; eagerly otherwise, or after the compiler failed once on this
    device type (logged). Differentiable ``fn`` get a compiled backward too."""
    if fusion_available(device):
        if fn not in _compiled:
            log.info("compiling the %s kernel for %s (once per process; cached on disk)", fn.__name__,
                     device.type)
            _allow_variants()
            _compiled[fn] = torch.compile(fn, dynamic=True)
        try:
            return _compiled[fn](*args)
        except torch.OutOfMemoryError:
            raise  # not the compiler's fault: the eager kernels would need the memory too
        except Exception as err:  # no working compiler after all: fall back, say so once
            _broken.add(device.type)
            log.warning("fused kernels unavailable on %s (%s: %s); running the eager kernels "
                        "(MASQUANT_FUSE=0 skips the attempt)", device.type, type(err).__name__, str(err)[:200])
    return fn(*args)


def fused_linear(x: torch.Tensor, bits: int, smooth: torch.Tensor, ids: torch.Tensor | None, weight: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A symmetric integer linear as one compiled region: each row ``x / smooth[ids]``
    (``smooth [vectors, k]``, ``ids [m]`` or None for ``smooth[0]`` everywhere) quantized per
    token to ``bits``, the int8 GEMM with ``weight [n, k]`` and the dequantizing epilogue
    (``weight_scale`` per row or per tensor) with ``bias``, in ``dtype``. Equal to
    ``quantize_tokens`` then ``int_linear`` up to float rounding."""
    qmax = qmax_tensor(bits, x.device)
    if ids is None:
        return compiled(_unrouted_int_linear, x.device, x, smooth[0], qmax, weight, weight_scale, bias, dtype)
    return compiled(_routed_int_linear, x.device, x, smooth, ids, qmax, weight, weight_scale, bias, dtype)
