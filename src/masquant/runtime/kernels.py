"""Integer kernels of the runtime: nibble packing, per-token activation quantization and the
int8 x int8 -> int32 GEMM with a dequantizing epilogue. With weights ``W = s * (c - z)`` (``z = 0``
for symmetric grids) and per-token activations ``x = t * q``, per weight group ``g``::

    y = t * sum_g s_g * (q_g @ c_g^T - z_g * sum(q_g)) + b

where ``q_g @ c_g^T`` is exact in int32. ``fused_linear`` runs the elementwise passes and the GEMM
as one ``torch.compile`` region where code can be generated (C++ on CPU, Triton on CUDA), eagerly
elsewhere; ``MASQUANT_FUSE=0`` forces eager, ``=1`` forces fusion. Inputs under ``FUSE_MIN_ELEMENTS``
run eagerly: a compiled call's overhead outweighs the passes it saves.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
from collections.abc import Callable

import torch

from ..switches import switches
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
    """Dynamic symmetric per-token int8 codes and float32 scales ``[tokens, 1]``, on the grid of
    ``primitives.fake_quantize_per_token`` (``t = max|x| / qmax``)."""
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    # (not linalg.vector_norm(x, inf): one op, but a much slower reduction)
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(EPS).div_(qmax)
    codes = torch.div(x, scale).round_().clamp_(-qmax - 1, qmax).to(torch.int8)
    return codes, scale


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a [m, k]`` and ``b [n, k]``, as int32. Works around ``torch._int_mm``'s
    limits: one input on CPU runs in int32; on CUDA, <= 16 rows are padded and widths not a multiple of 8
    run in float64 (exact for these magnitudes)."""
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
    """float32 ``y [m, n]`` from activation codes/scales and int8 weight codes ``[n, k]``. ``weight_scale`` /
    ``weight_zero`` hold one entry per row (``group_size`` 0), per tensor (-1) or per group of ``group_size``
    inputs (``[n * k/g, 1]``); ``weight_zero`` is None for symmetric grids."""
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


FUSE_MIN_ELEMENTS = 1 << 17  # fewer activations run eagerly (e.g. 64 tokens x 2048 features)
_compiled: dict[Callable, Callable] = {}
_broken: set[str] = set()  # device types on which compiling failed once
_qmax: dict[tuple[int, torch.device], torch.Tensor] = {}


def fusion_available(device: torch.device) -> bool:
    """Whether the fused kernels are used on ``device`` (see the module's docstring)."""
    mode = switches().fuse
    if mode == "0" or device.type in _broken:
        return False
    return mode == "1" or _can_compile(device.type)


@functools.cache
def _can_compile(device_type: str) -> bool:
    """Whether ``torch.compile`` can generate code for this device type (probed once, not on every
    forward): inductor writes C++ for the CPU and builds it with the system's compiler, Triton for CUDA."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in (switches().cxx or "g++", "g++", "clang++"))
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
    """Raise dynamo's per-function recompile limit to ``COMPILED_VARIANTS`` (never lower it): a process running
    several models needs a variant per dtype, bias, scale layout and grad mode, and past the limit dynamo
    runs the kernel eagerly."""
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
    """A symmetric integer linear as one compiled region: rows ``x / smooth[ids]`` (``smooth [vectors, k]``;
    ``ids [m]``, or None for ``smooth[0]``) quantized per token, int8 GEMM with ``weight [n, k]``, epilogue
    and ``bias``, in ``dtype``. Equals ``quantize_tokens`` then ``int_linear`` up to float rounding."""
    qmax = qmax_tensor(bits, x.device)
    if ids is None:
        return compiled(_unrouted_int_linear, x.device, x, smooth[0], qmax, weight, weight_scale, bias, dtype)
    return compiled(_routed_int_linear, x.device, x, smooth, ids, qmax, weight, weight_scale, bias, dtype)
