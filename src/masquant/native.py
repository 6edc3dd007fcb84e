"""A native CPU kernel for integer linears on a few tokens (decoding), built on first use.

Decoding runs each linear on one token. There the eager integer path is a dozen PyTorch ops
(per-token abs-max, rounding, ``torch._int_mm``, the epilogue) whose fixed costs, not the
arithmetic, set the time: about 60 us for a 256 x 256 linear on a 2-core CPU, where the FP32
``nn.Linear`` takes 8 us and ``torch._int_mm`` alone 12-20 us. ``int_linear`` (and ``Plan``,
which binds a layer's tensors once) does the same arithmetic in one call of a small C++
function: the per-token codes, the int8 dot products (unsigned x signed bytes, which compilers
turn into VNNI instructions where the CPU has them) and the epilogue, single-threaded.

The values are bit-identical to the eager kernels' (``kernels.quantize_tokens`` then
``kernels.int_linear``): the same float32 operations in the same order, compiled without
contracting multiplies and adds into FMAs; the integer sums are exact either way.

The library is compiled once per machine with the C++ compiler that ``torch.compile`` uses
(``CXX``, ``g++`` or ``clang++``), for this CPU (``-march=native``), and cached under
``$XDG_CACHE_HOME/masquant`` (``~/.cache/masquant``) by a hash of the source, the flags, the
compiler and the CPU's feature flags. Without a compiler, or if the build fails, the eager
kernels run and a warning says so once. ``MASQUANT_NATIVE=0`` skips the native kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .primitives import EPS

log = logging.getLogger("masquant")

# rows * in * out up to which the native kernel beats the eager one (2-core CPU). Not one row of any size:
# in isolation (weights in cache) one row of a 2048 x 2048 layer takes 0.19 ms against the eager 0.33 ms, but
# in a model a large layer's decode streams its weight from memory, which one thread does no faster than
# oneDNN's two (3B-wide decode: the same time either way), and a machine with more cores would be slower.
MAX_MACS = 1 << 21


def small(rows: int, in_features: int, out_features: int) -> bool:
    """Whether ``rows`` rows through an ``in -> out`` linear are few enough for the native kernel."""
    return rows * in_features * out_features <= MAX_MACS


SOURCE = r"""
#include <cmath>
#include <cstdint>

// y[r] = ((float)(q[r] . w[o]) * t[r]) * ws[o] (+ bias[o]) with q[r] the per-token codes of x[r] (/ smooth)
// at scale t[r]. The codes are stored shifted by 128 as uint8 so that the dot products are unsigned x signed
// byte products (AVX-512 VNNI / AVX-VNNI dpbusd where the CPU has them), corrected by 128 * sum(w[o]) (wsum):
// exact int32 arithmetic either way.

// A layer's arguments, bound once (Plan): the call passes one pointer to them.
struct Layer {
  int64_t k; const float* smooth; int64_t qmax; const int8_t* w; const int32_t* wsum; int64_t n;
  const float* ws; int64_t ws_stride; const float* bias; double eps;
};

extern "C" void masquant_layer(const Layer* l, const float* x, int64_t m, float* y) {
  const int64_t k = l->k, n = l->n, ws_stride = l->ws_stride;
  const int32_t qmax = (int32_t)l->qmax;
  const float* smooth = l->smooth;
  const int8_t* w = l->w;
  const int32_t* wsum = l->wsum;
  const float* ws = l->ws;
  const float* bias = l->bias;
  const float eps = (float)l->eps;
  uint8_t* codes = new uint8_t[k];
  float* xs = smooth ? new float[k] : nullptr;
  const float lo = (float)(-qmax - 1), hi = (float)qmax;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    if (smooth) {  // each input divided by its smoothing factor, as rows / smooth
      for (int64_t j = 0; j < k; ++j) xs[j] = xr[j] / smooth[j];
      xr = xs;
    }
    float amax = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      float a = std::fabs(xr[j]);
      amax = (a > amax || a != a) ? a : amax;  // NaN propagates, as in amax
    }
    float t = (amax < eps) ? eps : amax;
    t = t / (float)qmax;
    for (int64_t j = 0; j < k; ++j) {
      float v = std::nearbyint(xr[j] / t);  // round half to even, as torch.round
      v = v < lo ? lo : (v > hi ? hi : v);
      codes[j] = (uint8_t)((int32_t)v + 128);
    }
    float* yr = y + r * n;
    for (int64_t o = 0; o < n; ++o) {
      const int8_t* wo = w + o * k;
      int32_t acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += (int32_t)codes[j] * (int32_t)wo[j];
      acc -= 128 * wsum[o];
      float v = ((float)acc * t) * ws[o * ws_stride];
      yr[o] = bias ? v + bias[o] : v;
    }
  }
  delete[] codes;
  delete[] xs;
}
"""
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")


def enabled() -> bool:
    mode = os.environ.get("MASQUANT_NATIVE", "auto")
    if mode not in ("auto", "0"):
        raise ValueError(f"MASQUANT_NATIVE must be auto or 0, got {mode!r}")
    return mode == "auto" and library() is not None


def usable(rows: torch.Tensor, out_features: int) -> bool:
    """Whether ``int_linear`` should run these rows (``[m, k]``) through a linear with
    ``out_features`` outputs: on the CPU, and small enough to beat the eager kernels."""
    return rows.device.type == "cpu" and small(*rows.shape, out_features) and enabled()


def int_linear(rows: torch.Tensor, bits: int, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, row_sums: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.int_linear(*kernels.quantize_tokens(rows, bits), weight, weight_scale, None, 0, bias)``
    in one native call: ``rows [m, k]`` (float32), ``weight [n, k]`` int8 (symmetric codes),
    ``weight_scale`` one per row or one for the tensor; float32 ``[m, n]``. ``row_sums`` (int32
    ``weight.sum(1)``, ``IntWeight.row_sums``) is computed when not given."""
    w = weight.contiguous()
    wsum = w.sum(1, dtype=torch.int32) if row_sums is None else row_sums
    scale, b = weight_scale.float().reshape(-1, 1).contiguous(), None if bias is None else bias.float().contiguous()
    return Plan(w, w, scale, b, None, bits, wsum)(rows.float().contiguous())


class _Layer(ctypes.Structure):  # the C++ side's ``Layer``
    _fields_ = [("k", ctypes.c_int64), ("smooth", ctypes.c_void_p), ("qmax", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("wsum", ctypes.c_void_p), ("n", ctypes.c_int64), ("ws", ctypes.c_void_p),
                ("ws_stride", ctypes.c_int64), ("bias", ctypes.c_void_p), ("eps", ctypes.c_double)]


class Plan:
    """One float32 linear's native calls with its static arguments bound once: the int8 codes,
    weight scales, bias and (optionally) a smoothing vector, held here so that the pointers stay
    valid. ``current`` says whether the layer still holds these very tensors (a move with
    ``.to()``, a reassigned buffer or repacked codes need a new plan)."""

    __slots__ = ("_fn", "_layer", "_out", "_ref", "tensors", "version")

    def __init__(self, codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, smooth: torch.Tensor | None, bits: int, row_sums: torch.Tensor):
        devices = {t.device.type for t in (codes, weight_scale, bias, smooth, row_sums) if t is not None}
        if devices != {"cpu"}:
            raise ValueError(f"a CPU input reached a layer with tensors on {sorted(devices - {'cpu'})}: move the model "
                             "and its inputs to one device")
        n, k = codes.shape
        wsum = row_sums.contiguous()
        self.tensors = (packed, weight_scale, bias, smooth, codes, wsum)
        self.version = packed._version
        self._fn = library().masquant_layer
        self._out = n
        self._layer = _Layer(k, None if smooth is None else smooth.data_ptr(), 2 ** (bits - 1) - 1, codes.data_ptr(),
                             wsum.data_ptr(), n, weight_scale.data_ptr(), 1 if weight_scale.numel() == n else 0,
                             None if bias is None else bias.data_ptr(), EPS)
        self._ref = ctypes.byref(self._layer)

    def current(self, packed: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                smooth: torch.Tensor | None) -> bool:
        t = self.tensors
        return t[0] is packed and self.version == packed._version and t[1] is weight_scale and t[2] is bias \
            and t[3] is smooth

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [m, k]`` float32, contiguous, on the CPU -> ``[m, n]``."""
        y = torch.empty(rows.shape[0], self._out, dtype=torch.float32)
        self._fn(self._ref, rows.data_ptr(), rows.shape[0], y.data_ptr())
        return y

    def __reduce__(self):  # copies and pickles of a layer drop the plan (raw pointers); it is rebuilt on use
        return _no_plan, ()


def _no_plan() -> None:
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built or found in the cache), or None where it cannot be built."""
    if platform.system() == "Windows":
        return None
    compiler = next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)
    if compiler is None:
        log.warning("no C++ compiler found: the integer runtime decodes with its eager kernels "
                    "(install g++ for the native one, or set MASQUANT_NATIVE=0 to skip this check)")
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("the native decoding kernel could not be built (%s: %s); running the eager kernels "
                    "(MASQUANT_NATIVE=0 skips the attempt)", type(err).__name__, str(err)[:300])
        return None
    layer = lib.masquant_layer
    ptr = ctypes.c_void_p
    layer.argtypes = [ptr, ptr, ctypes.c_int64, ptr]  # (Python ints convert to 64-bit pointers and sizes)
    layer.restype = None
    return lib


def _build(compiler: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "masquant"
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, compiler, _cpu_flags()]).encode()).hexdigest()[:16]
    path = cache / f"native-{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        source, out = Path(tmp) / "kernel.cpp", Path(tmp) / "kernel.so"
        source.write_text(SOURCE)
        done = subprocess.run([compiler, *FLAGS, "-o", str(out), str(source)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise subprocess.SubprocessError(done.stderr.strip() or f"{compiler} exited with {done.returncode}")
        os.replace(out, path)  # atomic: a concurrent process finds the whole file or none
    log.info("built the native decoding kernel (%s)", path.name)
    return path


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code runs only where they hold)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()
