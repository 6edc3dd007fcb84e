"""A native CPU kernel for integer linears on few tokens of small layers, built on first use.

Decoding runs each linear on one token, and a short prompt through a small model (ref-vl: 37
tokens, 256 wide) is not much more. There the eager integer path is a dozen PyTorch ops
(per-token abs-max, rounding, ``torch._int_mm``, the epilogue) whose fixed costs, not the
arithmetic, set the time: about 35 us for one token through a 256 x 256 linear on a 2-core
CPU, where the FP32 ``nn.Linear`` takes 8 us. ``int_linear`` (and ``Plan``, which binds a
layer's tensors once) does the same arithmetic in one call of a small C++ function: each row's
codes (after dividing it by its modality's smoothing vector), the int8 dot products (AVX-512
VNNI on a weight packed for it, ``pack``; plain loops elsewhere) and the epilogue,
single-threaded.

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

# Where the native kernel beats the eager one (2-core CPU), per instruction set of its dot products (``ISAS``):
# weights of at most MAX_WEIGHT entries, which stay in a core's cache, and at most MAX_MACS products per call
# (AVX-512 VNNI: ~40 us single-threaded, 37 tokens through 256 x 768 or 128 through 256 x 256; beyond that oneDNN's
# multi-threaded int8 GEMM is faster). Not one row of any size: in isolation one row of a 2048 x 2048 layer is
# faster natively (0.15 against 0.21 ms), but in a model a large layer's decode streams its weight from memory,
# which one thread does no faster than oneDNN's two (3B-wide decode: the same time either way), and a machine with
# more cores would be slower. The AVX2 and plain limits were measured here with those builds (MASQUANT_NO_VNNI,
# MASQUANT_PORTABLE) against the eager kernels.
ISAS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C++"}
LIMITS = {2: (1 << 21, 1 << 23), 1: (1 << 21, 1 << 21), 0: (1 << 17, 1 << 17)}  # (MAX_WEIGHT, MAX_MACS)
MAX_WEIGHT, MAX_MACS = LIMITS[2]
LANES = 16  # outputs per block of the packed weight (one 512-bit register of int32 sums)


def small(rows: int, in_features: int, out_features: int) -> bool:
    """Whether ``rows`` rows through an ``in -> out`` linear are few enough for the native kernel."""
    lib = library()
    if lib is None:
        return False
    max_weight, max_macs = LIMITS[lib.isa]
    weight = in_features * out_features
    return weight <= max_weight and rows * weight <= max_macs


SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
// The instruction set the dot products use: 2 = AVX-512 VNNI (dpbusd), 1 = AVX2 (16-bit products, vpmaddwd), 0 = plain
// C++ loops. MASQUANT_NO_VNNI and MASQUANT_PORTABLE force the lower ones (tests build all three where the CPU can).
#if !defined(MASQUANT_PORTABLE) && !defined(MASQUANT_NO_VNNI) && defined(__AVX512VNNI__) && defined(__AVX512BW__) \
    && defined(__AVX512VL__)
#define MASQUANT_ISA 2
#elif !defined(MASQUANT_PORTABLE) && defined(__AVX2__)
#define MASQUANT_ISA 1
#else
#define MASQUANT_ISA 0
#endif
#if MASQUANT_ISA
#include <immintrin.h>
#endif

// y[r] = ((float)(q[r] . w[o]) * t[r]) * ws[o] (+ bias[o]), with q[r] the per-token codes of x[r] / smooth[ids[r]]
// at scale t[r]. The codes are stored shifted by 128 as uint8 so that the dot products are unsigned x signed byte
// products (dpbusd), corrected by 128 * sum(w[o]) (wsum): exact int32 arithmetic on every path (sums that wrap
// around wrap back, as in two's complement).
//
// The weight is packed (pack in Python): blocks of 16 outputs, and in each block, for every 4 inputs, the 4 bytes
// of each of the 16 outputs: wp[block][k4][16][4], inputs padded to k4 * 4 and outputs to a multiple of 16 with
// zero weights. One dpbusd adds 4 products to each of 16 outputs of one row; a tile of up to ROWS rows x BLOCKS
// blocks keeps its sums in registers while its weights are read once.

// A layer's arguments, bound once (Plan): the call passes one pointer to them.
struct Layer {
  int64_t k; int64_t k4; const float* smooth; int64_t vectors; int64_t qmax; const int8_t* wp; const int32_t* wsum;
  int64_t n; const float* ws; int64_t ws_stride; const float* bias; double eps;
};

#if MASQUANT_ISA == 2
constexpr int ROWS = 4, BLOCKS = 4;  // 16 zmm sums
#elif MASQUANT_ISA == 1
constexpr int ROWS = 2, BLOCKS = 1;  // 8 ymm sums (4 per block and row)
#else
constexpr int ROWS = 1, BLOCKS = 1;
#endif
constexpr int LANES = 16;

extern "C" int masquant_isa() { return MASQUANT_ISA; }

// Codes of one row (x / s when s is given) into codes[0:kp] (the padding is the code of 0), its scale into *t.
// The same float32 operations as the eager kernels, element by element: a division by the smoothing factor, the
// abs-max (exact in any order; NaN propagates), a division by the scale, rounding half to even and clamping.
static void quantize_row(const Layer* l, const float* x, const float* s, float* xs, uint8_t* codes, float* t) {
  const int64_t k = l->k;
  const float qmax = (float)l->qmax, lo = -qmax - 1.0f;
#if MASQUANT_ISA == 2
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 in = k - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(in, x + j);
    if (s) {
      v = _mm512_mask_div_ps(v, in, v, _mm512_maskz_loadu_ps(in, s + j));
      _mm512_mask_storeu_ps(xs + j, in, v);
    }
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  if (s) x = xs;
  float amax = nan ? NAN : _mm512_reduce_max_ps(vmax);
#else
  if (s) {  // each input divided by its smoothing factor, as rows / smooth
    for (int64_t j = 0; j < k; ++j) xs[j] = x[j] / s[j];
    x = xs;
  }
  float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // (8 running maxima: vectorisable)
  int nan = 0;
  int64_t j = 0;
  for (; j + 8 <= k; j += 8)
    for (int i = 0; i < 8; ++i) {
      const float a = std::fabs(x[j + i]);
      nan |= a != a;
      part[i] = a > part[i] ? a : part[i];
    }
  for (; j < k; ++j) {
    const float a = std::fabs(x[j]);
    nan |= a != a;
    part[0] = a > part[0] ? a : part[0];
  }
  float amax = part[0];
  for (int i = 1; i < 8; ++i) amax = part[i] > amax ? part[i] : amax;
  if (nan) amax = NAN;  // NaN propagates, as in amax
#endif
  float scale = (amax < (float)l->eps) ? (float)l->eps : amax;
  scale = scale / qmax;
#if MASQUANT_ISA == 2
  const __m512 vscale = _mm512_set1_ps(scale), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(qmax);
  const __m512i shift = _mm512_set1_epi32(128);
  for (int64_t j = 0; j < k; j += 16) {
    const __mmask16 in = k - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - j)) - 1);
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(in, x + j), vscale),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v));  // (operands in this order: a NaN passes, as in torch.clamp)
    _mm_mask_storeu_epi8(codes + j, in, _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), shift)));
  }
#else
  for (int64_t j = 0; j < k; ++j) {
    float v = std::nearbyint(x[j] / scale);  // round half to even, as torch.round
    v = v < lo ? lo : (v > qmax ? qmax : v);
    if (v != v) v = 0.0f;  // NaN (an infinite row: inf / inf): code 0, as torch's conversion to int8 gives
    codes[j] = (uint8_t)((int32_t)v + 128);
  }
#endif
  for (int64_t j = k; j < 4 * l->k4; ++j) codes[j] = 128;
  *t = scale;
}

// acc[r][b * 16 + i]: the byte dot products of R rows of codes (stride kp) with B blocks of packed weights.
template <int R, int B>
static void tile(const uint8_t* codes, int64_t kp, const int8_t* wp, int64_t k4, int32_t (*acc)[BLOCKS * LANES]) {
#if MASQUANT_ISA == 2
  __m512i sum[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) sum[r][b] = _mm512_setzero_si512();
  for (int64_t j = 0; j < k4; ++j) {
    __m512i w[B];
    for (int b = 0; b < B; ++b) w[b] = _mm512_loadu_si512((const void*)(wp + (b * k4 + j) * 4 * LANES));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, codes + r * kp + 4 * j, 4);
      const __m512i a = _mm512_set1_epi32(four);
      for (int b = 0; b < B; ++b) sum[r][b] = _mm512_dpbusd_epi32(sum[r][b], a, w[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) _mm512_storeu_si512((void*)(acc[r] + b * LANES), sum[r][b]);
#elif MASQUANT_ISA == 1
  // Codes and weights widened to 16 bits; vpmaddwd adds pairs of products exactly (|q * w| <= 255 * 128), so each
  // int32 lane holds half of an output's sum: quarter c of a block (outputs 4c .. 4c + 3) as pairs of lanes.
  __m256i sum[R][B][4];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) sum[r][b][c] = _mm256_setzero_si256();
  for (int64_t j = 0; j < k4; ++j) {
    __m256i w[B][4];
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c)
        w[b][c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wp + (b * k4 + j) * 4 * LANES + 16 * c)));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, codes + r * kp + 4 * j, 4);
      const __m256i a = _mm256_cvtepu8_epi16(_mm_set1_epi32(four));  // q0 q1 q2 q3, four times, as int16
      for (int b = 0; b < B; ++b)
        for (int c = 0; c < 4; ++c) sum[r][b][c] = _mm256_add_epi32(sum[r][b][c], _mm256_madd_epi16(w[b][c], a));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) {
        uint32_t pairs[8];
        _mm256_storeu_si256((__m256i*)pairs, sum[r][b][c]);
        for (int i = 0; i < 4; ++i) acc[r][b * LANES + 4 * c + i] = (int32_t)(pairs[2 * i] + pairs[2 * i + 1]);
      }
#else
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < B * LANES; ++i) acc[r][i] = 0;
  for (int b = 0; b < B; ++b)
    for (int64_t j = 0; j < k4; ++j) {
      const int8_t* w = wp + (b * k4 + j) * 4 * LANES;
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = codes + r * kp + 4 * j;
        uint32_t* out = (uint32_t*)acc[r] + b * LANES;
        for (int i = 0; i < LANES; ++i)
          for (int c = 0; c < 4; ++c) out[i] += (uint32_t)((int32_t)q[c] * (int32_t)w[4 * i + c]);
      }
    }
#endif
}

// tile<R, nb> for nb <= B (only the block counts this instruction set uses are instantiated).
template <int R, int B = BLOCKS>
static void tile_blocks(int64_t nb, const uint8_t* codes, int64_t kp, const int8_t* wp, int64_t k4,
                        int32_t (*acc)[BLOCKS * LANES]) {
  if constexpr (B > 1) {
    if (nb < B) return tile_blocks<R, B - 1>(nb, codes, kp, wp, k4, acc);
  }
  tile<R, B>(codes, kp, wp, k4, acc);
}

// Rows r0 .. r0 + R of y for the outputs of blocks b0 .. b0 + nb.
template <int R>
static void rows_tile(const Layer* l, const uint8_t* codes, int64_t kp, const float* t, int64_t b0, int64_t nb,
                      float* y) {
  const int64_t n = l->n;
  const int8_t* wp = l->wp + b0 * l->k4 * 4 * LANES;
  int32_t acc[ROWS][BLOCKS * LANES];
  tile_blocks<R>(nb, codes, kp, wp, l->k4, acc);
  const int64_t o0 = b0 * LANES, o1 = (o0 + nb * LANES < n) ? o0 + nb * LANES : n;
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * n;
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t dot = (int32_t)((uint32_t)acc[r][o - o0] - 128u * (uint32_t)l->wsum[o]);
      const float v = ((float)dot * t[r]) * l->ws[o * l->ws_stride];
      yr[o] = l->bias ? v + l->bias[o] : v;
    }
  }
}

// rows_tile<left> for the last left < ROWS rows.
template <int R = ROWS - 1>
static void rows_left(int64_t left, const Layer* l, const uint8_t* codes, int64_t kp, const float* t, int64_t b0,
                      int64_t nb, float* y) {
  if constexpr (R > 1) {
    if (left < R) return rows_left<R - 1>(left, l, codes, kp, t, b0, nb, y);
  }
  if constexpr (R >= 1) rows_tile<R>(l, codes, kp, t, b0, nb, y);
}

// Returns 0, or 1 when an id is not a row of the smoothing table (nothing is written then).
extern "C" int masquant_layer(const Layer* l, const float* x, const int64_t* ids, int64_t m, float* y) {
  const int64_t k = l->k, kp = 4 * l->k4, n = l->n;
  if (ids)
    for (int64_t r = 0; r < m; ++r)
      if (ids[r] < 0 || ids[r] >= l->vectors) return 1;
  uint8_t* codes = new uint8_t[m * kp];
  float* t = new float[m];
  float* xs = l->smooth ? new float[k] : nullptr;
  for (int64_t r = 0; r < m; ++r)
    quantize_row(l, x + r * k, l->smooth ? l->smooth + (ids ? ids[r] : 0) * k : nullptr, xs, codes + r * kp, t + r);
  // Output tiles outside, rows inside: each tile's weights are read from memory once and reused from cache.
  const int64_t blocks = (n + LANES - 1) / LANES;
  for (int64_t b0 = 0; b0 < blocks; b0 += BLOCKS) {
    const int64_t nb = blocks - b0 < BLOCKS ? blocks - b0 : BLOCKS;
    int64_t r = 0;
    for (; r + ROWS <= m; r += ROWS) rows_tile<ROWS>(l, codes + r * kp, kp, t + r, b0, nb, y + r * n);
    if (r < m) rows_left(m - r, l, codes + r * kp, kp, t + r, b0, nb, y + r * n);
  }
  delete[] codes;
  delete[] t;
  delete[] xs;
  return 0;
}
"""
FLAGS = ("-std=c++17", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")


def describe() -> str:
    """What runs the native calls here, in words (for logs and benchmark pages)."""
    if os.environ.get("MASQUANT_NATIVE", "auto") == "0":
        return "off (MASQUANT_NATIVE=0)"
    lib = library()
    return "unavailable (eager kernels)" if lib is None else ISAS[lib.isa]


def enabled() -> bool:
    mode = os.environ.get("MASQUANT_NATIVE", "auto")
    if mode not in ("auto", "0"):
        raise ValueError(f"MASQUANT_NATIVE must be auto or 0, got {mode!r}")
    return mode == "auto" and library() is not None


def usable(rows: torch.Tensor, out_features: int) -> bool:
    """Whether ``int_linear`` should run these rows (``[m, k]``) through a linear with
    ``out_features`` outputs: on the CPU, small enough to beat the eager kernels, and not inside
    ``torch.compile`` (which traces the eager kernels; it cannot trace a ctypes call)."""
    return (rows.device.type == "cpu" and not torch.compiler.is_compiling() and small(*rows.shape, out_features)
            and enabled())


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Signed int8 codes ``[n, k]`` in the kernel's layout (see ``SOURCE``): blocks of 16 outputs,
    and in each block the 4 bytes of every output for each 4 inputs, zero-padded."""
    n, k = codes.shape
    n16, k4 = -(-n // LANES) * LANES, -(-k // 4)
    padded = torch.nn.functional.pad(codes, (0, 4 * k4 - k, 0, n16 - n))
    return padded.reshape(n16 // LANES, LANES, k4, 4).permute(0, 2, 1, 3).contiguous()


def int_linear(rows: torch.Tensor, bits: int, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, row_sums: torch.Tensor | None = None,
               packed: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.int_linear(*kernels.quantize_tokens(rows, bits), weight, weight_scale, None, 0, bias)``
    in one native call: ``rows [m, k]`` (float32), ``weight [n, k]`` int8 (symmetric codes),
    ``weight_scale`` one per row or one for the tensor; float32 ``[m, n]``. ``row_sums`` (int32
    ``weight.sum(1)``) and ``packed`` (``pack(weight)``) are computed when not given
    (``IntWeight.row_sums`` and ``IntWeight.native_codes`` cache them)."""
    w = weight.contiguous()
    wsum = w.sum(1, dtype=torch.int32) if row_sums is None else row_sums
    scale, b = weight_scale.float().reshape(-1, 1).contiguous(), None if bias is None else bias.float().contiguous()
    return Plan(w, w, scale, b, None, bits, wsum, packed)(rows.float().contiguous())


class _Layer(ctypes.Structure):  # the C++ side's ``Layer``
    _fields_ = [("k", ctypes.c_int64), ("k4", ctypes.c_int64), ("smooth", ctypes.c_void_p),
                ("vectors", ctypes.c_int64), ("qmax", ctypes.c_int64), ("wp", ctypes.c_void_p),
                ("wsum", ctypes.c_void_p), ("n", ctypes.c_int64), ("ws", ctypes.c_void_p),
                ("ws_stride", ctypes.c_int64), ("bias", ctypes.c_void_p), ("eps", ctypes.c_double)]


class Plan:
    """One float32 linear's native calls with its static arguments bound once: the packed int8
    codes, weight scales, bias and (optionally) a table of smoothing vectors ``[vectors, k]``
    (rows divided by row 0, or by the row each call's ``ids`` names), held here so that the
    pointers stay valid. ``current`` says whether the layer still holds these very tensors (a
    move with ``.to()``, a reassigned buffer or repacked codes need a new plan)."""

    __slots__ = ("_fn", "_layer", "_out", "_ptrs", "_ref", "tensors", "version")

    def __init__(self, codes: torch.Tensor, stored: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, smooth: torch.Tensor | None, bits: int, row_sums: torch.Tensor,
                 packed: torch.Tensor | None = None, lib: ctypes.CDLL | None = None):
        devices = {t.device.type for t in (codes, weight_scale, bias, smooth, row_sums) if t is not None}
        if devices != {"cpu"}:
            raise ValueError(f"a CPU input reached a layer with tensors on {sorted(devices - {'cpu'})}: move the model "
                             "and its inputs to one device")
        n, k = codes.shape
        for name, t in (("weight_scale", weight_scale), ("bias", bias), ("smooth", smooth)):
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
                raise ValueError(f"the native kernel reads {name} as contiguous float32, got {t.dtype}")
        wsum, packed = row_sums.contiguous(), pack(codes) if packed is None else packed
        table = None if smooth is None else smooth.reshape(-1, k)
        self.tensors = (stored, weight_scale, bias, smooth, packed, wsum, table)
        self.version = stored._version
        self._ptrs = _pointers(stored, weight_scale, bias, smooth)
        self._fn = (lib or library()).masquant_layer
        self._out = n
        self._layer = _Layer(k, -(-k // 4), None if table is None else table.data_ptr(),
                             0 if table is None else table.shape[0], 2 ** (bits - 1) - 1, packed.data_ptr(),
                             wsum.data_ptr(), n, weight_scale.data_ptr(), 1 if weight_scale.numel() == n else 0,
                             None if bias is None else bias.data_ptr(), EPS)
        self._ref = ctypes.byref(self._layer)

    def current(self, stored: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                smooth: torch.Tensor | None) -> bool:
        t = self.tensors  # (the same tensors, unchanged, at the same addresses: share_memory_() moves storage)
        return t[0] is stored and self.version == stored._version and t[1] is weight_scale and t[2] is bias \
            and t[3] is smooth and self._ptrs == _pointers(stored, weight_scale, bias, smooth)

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``rows [..., k]`` float32, contiguous, on the CPU -> ``[..., n]``; ``ids`` (int64, one per
        row, contiguous) picks each row's smoothing vector (row 0 of the table for all when None)."""
        shape = rows.shape
        if shape[-1] != self._layer.k or not rows.is_contiguous() or rows.dtype != torch.float32:
            raise ValueError(f"the native kernel takes contiguous float32 rows of {self._layer.k} features, got "
                             f"{rows.dtype} {tuple(shape)}{'' if rows.is_contiguous() else ' (not contiguous)'}")
        y = torch.empty(*shape[:-1], self._out, dtype=torch.float32)
        m = rows.numel() // shape[-1] if shape[-1] else 0
        if ids is not None:
            if ids.numel() != m:
                raise ValueError(f"{ids.numel()} modality ids for {m} rows")
            ids = ids.to(torch.int64).contiguous()  # (no copy when it already is)
        if self._fn(self._ref, rows.data_ptr(), None if ids is None else ids.data_ptr(), m, y.data_ptr()):
            raise ValueError(f"modality ids must index the layer's {self._layer.vectors} smoothing vectors, got "
                             f"{sorted(set(ids.tolist()))}")
        return y

    def __reduce__(self):  # copies and pickles of a layer drop the plan (raw pointers); it is rebuilt on use
        return _no_plan, ()


def _pointers(*tensors: torch.Tensor | None) -> tuple[int, ...]:
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


def _no_plan() -> None:
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built or found in the cache), or None where it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        log.warning("no C++ compiler found: the integer runtime decodes with its eager kernels "
                    "(install g++ for the native one, or set MASQUANT_NATIVE=0 to skip this check)")
        return None
    try:
        return load(compiler)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("the native integer kernel could not be built (%s: %s); running the eager kernels "
                    "(MASQUANT_NATIVE=0 skips the attempt)", type(err).__name__, str(err)[:300])
        return None


def find_compiler() -> str | None:
    """The C++ compiler that ``torch.compile`` would use (``CXX``, ``g++`` or ``clang++``), or None."""
    if platform.system() == "Windows":
        return None
    return next((c for c in (os.environ.get("CXX"), "g++", "clang++") if c and shutil.which(c)), None)


def load(compiler: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernel; ``defines`` are extra ``-D`` flags
    (``MASQUANT_NO_VNNI``: the AVX2 code even where the CPU has AVX-512 VNNI; ``MASQUANT_PORTABLE``:
    the plain C++ loops; for tests)."""
    lib = ctypes.CDLL(str(_build(compiler, tuple(f"-D{d}" for d in defines))))
    ptr = ctypes.c_void_p
    lib.masquant_layer.argtypes = [ptr, ptr, ptr, ctypes.c_int64, ptr]  # (Python ints: 64-bit pointers and sizes)
    lib.masquant_layer.restype = ctypes.c_int
    lib.masquant_isa.restype = ctypes.c_int
    lib.isa = lib.masquant_isa()
    return lib


def _build(compiler: str, extra: tuple[str, ...] = ()) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "masquant"
    flags = (*FLAGS, *extra)
    key = hashlib.sha256("\n".join([SOURCE, *flags, compiler, _cpu_flags()]).encode()).hexdigest()[:16]
    path = cache / f"native-{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        source, out = Path(tmp) / "kernel.cpp", Path(tmp) / "kernel.so"
        source.write_text(SOURCE)
        done = subprocess.run([compiler, *flags, "-o", str(out), str(source)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise subprocess.SubprocessError(done.stderr.strip() or f"{compiler} exited with {done.returncode}")
        os.replace(out, path)  # atomic: a concurrent process finds the whole file or none
    log.info("built the native integer kernel (%s)", path.name)
    return path


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` code runs only where they hold)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()
