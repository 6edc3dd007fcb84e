"""Native CPU kernel for integer linears on few tokens of small layers, compiled on first use.

One C++ call replaces the eager path's dozen PyTorch ops, whose fixed costs dominate at decode sizes.
Bit-identical to ``kernels.quantize_tokens`` + ``kernels.int_linear`` (same float32 order, no FMA
contraction), except low-rank patches, which differ in the last bits (fixed order, not MKL).
Built for ``-march=native`` with ``CXX``, ``g++`` or ``clang++`` and cached under ``$XDG_CACHE_HOME/masquant``;
without a compiler the eager kernels run (one warning). ``MASQUANT_NATIVE=0`` skips it; ``avx2`` builds it
for an AVX2-only CPU (``-march=x86-64-v3``) and ``portable`` as plain C++ loops: the code other CPU classes
run, on this one.
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

from ..switches import switches
from .primitives import EPS

log = logging.getLogger("masquant")

# Per dot-product ISA (``ISAS``), the sizes where the native kernel beats the eager one: a weight that stays in a
# core's cache and few products per call (beyond that oneDNN's multi-threaded int8 GEMM wins); and, for weights of
# ``THREADED_WEIGHT`` elements and more, whose output blocks the kernel shares among the threads (native.cpp's
# PARALLEL_WEIGHT), up to ``DECODE_ROWS`` rows: decoding and short prefills of 3B/7B-wide layers, where it
# streams the weight once for all rows (2-4x faster than torch._int_mm at 1-16 rows with AVX-512 VNNI; on AVX2
# the blocked GEMM wins from about 16 rows).
ISAS = {2: "AVX-512 VNNI", 1: "AVX2", 0: "plain C++"}
LIMITS = {2: (1 << 21, 1 << 23), 1: (1 << 21, 1 << 21), 0: (1 << 17, 1 << 17)}  # (MAX_WEIGHT, MAX_MACS)
MAX_WEIGHT, MAX_MACS = LIMITS[2]
THREADED_WEIGHT = 1 << 20
DECODE_ROWS = {2: 64, 1: 8, 0: 0}
LANES = 16  # outputs per block of the packed weight (one 512-bit register of int32 sums)


def small(rows: int, in_features: int, out_features: int) -> bool:
    """Whether ``rows`` rows through an ``in -> out`` linear are few enough for the native kernel."""
    lib = library()
    if lib is None:
        return False
    max_weight, max_macs = LIMITS[lib.isa]
    weight = in_features * out_features
    if weight >= THREADED_WEIGHT and rows <= DECODE_ROWS[lib.isa]:
        return True
    return weight <= max_weight and rows * weight <= max_macs


SOURCE = Path(__file__).with_name("native.cpp")  # the kernel (shipped as package data)
FLAGS = ("-std=c++17", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
BUILDS = {"auto": ((), "native"), "avx2": (("MASQUANT_NO_VNNI",), "x86-64-v3"),
          "portable": (("MASQUANT_PORTABLE",), "native")}  # MASQUANT_NATIVE -> (defines, -march)


def describe() -> str:
    """What runs the native calls here, in words (for logs and benchmark pages)."""
    mode = switches().native
    if mode == "0":
        return "off (MASQUANT_NATIVE=0)"
    lib = library()
    if lib is None:
        return "unavailable (eager kernels)"
    return ISAS[lib.isa] + ("" if mode == "auto" else f" (MASQUANT_NATIVE={mode})")


def enabled() -> bool:
    return switches().native != "0" and library() is not None


def usable(x: torch.Tensor, out_features: int) -> bool:
    """Whether the native kernel should run the rows of ``x`` (``[..., k]``) through a linear with
    ``out_features`` outputs: on the CPU, small enough to beat the eager kernels, and not inside
    ``torch.compile`` (which traces the eager kernels; it cannot trace a ctypes call)."""
    k = x.shape[-1]
    return (x.is_cpu and not torch.compiler.is_compiling() and small(x.numel() // k if k else 0, k, out_features)
            and enabled())


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Signed int8 codes ``[n, k]`` in the kernel's layout (see ``native.cpp``): blocks of 16 outputs,
    and in each block the 4 bytes of every output for each 4 inputs, zero-padded."""
    n, k = codes.shape
    n16, k4 = -(-n // LANES) * LANES, -(-k // 4)
    padded = torch.nn.functional.pad(codes, (0, 4 * k4 - k, 0, n16 - n))
    return padded.reshape(n16 // LANES, LANES, k4, 4).permute(0, 2, 1, 3).contiguous()


def int_linear(rows: torch.Tensor, bits: int, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, row_sums: torch.Tensor | None = None,
               packed: torch.Tensor | None = None) -> torch.Tensor:
    """``kernels.int_linear(*kernels.quantize_tokens(rows, bits), weight, weight_scale, None, 0, bias)`` in one
    native call: float32 ``rows [m, k]``, symmetric int8 ``weight [n, k]``, scale per row or per tensor -> float32
    ``[m, n]``. ``row_sums`` (int32 ``weight.sum(1)``) and ``packed`` (``pack(weight)``) are computed if not given."""
    w = weight.contiguous()
    wsum = w.sum(1, dtype=torch.int32) if row_sums is None else row_sums
    scale, b = weight_scale.float().reshape(-1, 1).contiguous(), None if bias is None else bias.float().contiguous()
    return Plan(w, w, scale, b, None, bits, wsum, packed)(rows.float().contiguous())


def pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Signed int8 codes ``[n, k]`` in the blocked GEMM's layout (see ``native.cpp``): panels of 16
    outputs, and in each panel the two codes of every output for each pair of inputs, zero-padded."""
    n, k = codes.shape
    n16, k2 = -(-n // LANES) * LANES, -(-k // 2)
    padded = torch.nn.functional.pad(codes, (0, 2 * k2 - k, 0, n16 - n))
    return padded.reshape(n16 // LANES, LANES, k2, 2).permute(0, 2, 1, 3).contiguous()


def gemm_ready() -> bool:
    """Whether the blocked GEMM for many rows runs here (a built kernel with its AVX2 code)."""
    lib = library() if switches().native != "0" else None
    return lib is not None and lib.gemm


def gemm(rows: torch.Tensor, bits: int, packed: torch.Tensor, out_features: int, weight_scale: torch.Tensor,
         bias: torch.Tensor | None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``kernels.int_linear(*kernels.quantize_tokens(rows, bits), weight, weight_scale, None, 0, bias)`` by
    the blocked native GEMM on ``torch.get_num_threads()`` threads, bit-identical: float32 ``rows [m, k]``
    quantized per token in the same call, ``packed = pack_pairs(weight)``, one weight scale per
    output or per tensor -> float32 ``[m, n]``."""
    m, k = rows.shape
    n = out_features
    if packed.shape != (-(-n // LANES), -(-k // 2), LANES, 2) or packed.dtype != torch.int8:
        raise ValueError(f"packed weight of shape {tuple(packed.shape)} does not pack a [{n}, {k}] int8 weight "
                         "(native.pack_pairs)")
    x = rows.float().contiguous()
    ws = weight_scale.float().reshape(-1).contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    (lib or library()).masquant_gemm(x.data_ptr(), m, k, 2 ** (bits - 1) - 1, EPS, packed.data_ptr(), n,
                                     ws.data_ptr(), 1 if ws.numel() == n else 0, None if b is None else b.data_ptr(),
                                     y.data_ptr(), torch.get_num_threads())
    return y


class _Patch(ctypes.Structure):  # the C++ side's ``Patch``
    _fields_ = [("down", ctypes.c_void_p), ("up", ctypes.c_void_p), ("rank", ctypes.c_int64)]


class _Layer(ctypes.Structure):  # the C++ side's ``Layer``
    _fields_ = [("k", ctypes.c_int64), ("k4", ctypes.c_int64), ("smooth", ctypes.c_void_p),
                ("vectors", ctypes.c_int64), ("qmax", ctypes.c_int64), ("wp", ctypes.c_void_p),
                ("wsum", ctypes.c_void_p), ("n", ctypes.c_int64), ("ws", ctypes.c_void_p),
                ("ws_stride", ctypes.c_int64), ("bias", ctypes.c_void_p), ("eps", ctypes.c_double),
                ("patches", ctypes.c_void_p)]


class Plan:
    """One float32 linear's native call with its static tensors bound (and held, so pointers stay valid) once:
    packed int8 codes, weight scales, bias, an optional smoothing table ``[vectors, k]`` picked per row by ``ids``
    (row 0 without), and low-rank patches ``{row: (down [k, r], up [r, n])}`` with the smoothing folded into
    ``down``. Bit-identical to the eager kernels except patched rows (fixed-order float32 sums, not MKL's)."""

    __slots__ = ("_fn", "_layer", "_out", "_ptrs", "_ref", "patches", "tensors", "version")

    def __init__(self, codes: torch.Tensor, stored: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, smooth: torch.Tensor | None, bits: int, row_sums: torch.Tensor,
                 packed: torch.Tensor | None = None, lib: ctypes.CDLL | None = None,
                 patches: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
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
        patch_table = _patch_table(patches or {}, 0 if table is None else table.shape[0], k, n)
        self.tensors = (stored, weight_scale, bias, smooth, packed, wsum, table, patch_table)
        self.patches = dict(patches or {})  # (the pairs given, held: compared by identity in ``holds``)
        self._fn = (lib or library()).masquant_layer
        self._out = n
        self._layer = _Layer(k, -(-k // 4), None if table is None else table.data_ptr(),
                             0 if table is None else table.shape[0], 2 ** (bits - 1) - 1, packed.data_ptr(),
                             wsum.data_ptr(), n, weight_scale.data_ptr(), 1 if weight_scale.numel() == n else 0,
                             None if bias is None else bias.data_ptr(), EPS,
                             None if patch_table is None else ctypes.addressof(patch_table[0]))
        self._ref = ctypes.byref(self._layer)

    def holds(self, patches: dict[int, tuple]) -> bool:
        """Whether the plan was bound with these folded patch pairs (the same objects)."""
        return self.patches.keys() == patches.keys() and all(self.patches[row] is pair for row, pair in patches.items())

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``rows [..., k]`` float32, contiguous, on the CPU -> ``[..., n]``; ``ids`` (one per row)
        picks each row's smoothing vector and patch (row 0 of the table for all, and no patch, when
        None)."""
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
        if self._fn(self._ref, rows.data_ptr(), None if ids is None else ids.data_ptr(), m, y.data_ptr(),
                    torch.get_num_threads()):
            raise ValueError(f"modality ids must index the layer's {self._layer.vectors} smoothing vectors, got "
                             f"{sorted(set(ids.tolist()))}")
        return y

    def __reduce__(self):  # copies and pickles of a layer drop the plan (raw pointers); it is rebuilt on use
        return _no_plan, ()


def _patch_table(patches: dict[int, tuple[torch.Tensor, torch.Tensor]], vectors: int, k: int, n: int):
    """The C++ ``Patch`` entries, one per row of the smoothing table (rank 0 where no patch), and
    the contiguous float32 factors they point to (kept alive with them); None without patches."""
    if not patches:
        return None
    entries, held = (_Patch * vectors)(), []
    for row, (down, up) in patches.items():
        if not 0 <= row < vectors:
            raise ValueError(f"a patch for table row {row}, but the smoothing table has {vectors} rows (a patched "
                             "layer needs its table: patches are picked by the same ids)")
        rank = down.shape[-1]
        if down.shape != (k, rank) or up.shape != (rank, n) or {down.dtype, up.dtype} != {torch.float32} \
                or not (down.is_cpu and up.is_cpu):
            raise ValueError(f"patch factors must be float32 CPU tensors [{k}, r] and [r, {n}], got {down.dtype} "
                             f"{tuple(down.shape)} and {up.dtype} {tuple(up.shape)}")
        # (copies: float32 factors can be the layer's own buffers, whose storage may move or change)
        down, up = (t.clone(memory_format=torch.contiguous_format) for t in (down, up))
        held += [down, up]
        entries[row] = _Patch(down.data_ptr(), up.data_ptr(), rank)
    return entries, held


def _no_plan() -> None:
    return None


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built or found in the cache) for ``MASQUANT_NATIVE``, or None where it
    cannot be built."""
    return _library(switches().native)


@functools.cache
def _library(mode: str) -> ctypes.CDLL | None:
    compiler = find_compiler()
    if compiler is None:
        log.warning("no C++ compiler found: the integer runtime decodes with its eager kernels "
                    "(install g++ for the native one, or set MASQUANT_NATIVE=0 to skip this check)")
        return None
    if mode == "avx2" and "avx2" not in _cpu_flags().split():
        raise RuntimeError("MASQUANT_NATIVE=avx2 builds the kernel for AVX2, which this CPU does not have: unset it "
                           "or use MASQUANT_NATIVE=portable")
    defines, march = BUILDS.get(mode, BUILDS["auto"])
    try:
        return load(compiler, defines, march)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("the native integer kernel could not be built (%s: %s); running the eager kernels "
                    "(MASQUANT_NATIVE=0 skips the attempt)", type(err).__name__, str(err)[:300])
        return None


def find_compiler() -> str | None:
    """The C++ compiler that ``torch.compile`` would use (``CXX``, ``g++`` or ``clang++``), or None."""
    if platform.system() == "Windows":
        return None
    return next((c for c in (switches().cxx, "g++", "clang++") if c and shutil.which(c)), None)


def load(compiler: str, defines: tuple[str, ...] = (), march: str = "native") -> ctypes.CDLL:
    """Build (or find in the cache) and load the kernel for ``-march`` (``native``: this CPU);
    ``defines`` are extra ``-D`` flags (``MASQUANT_NO_VNNI``: the AVX2 code even where the CPU has
    AVX-512 VNNI; ``MASQUANT_PORTABLE``: the plain C++ loops)."""
    lib = ctypes.CDLL(str(_build(compiler, (f"-march={march}", *(f"-D{d}" for d in defines)))))
    ptr = ctypes.c_void_p
    # (Python ints: 64-bit pointers and sizes; the last argument is the thread count)
    lib.masquant_layer.argtypes = [ptr, ptr, ptr, ctypes.c_int64, ptr, ctypes.c_int]
    lib.masquant_layer.restype = ctypes.c_int
    lib.masquant_isa.restype = ctypes.c_int
    lib.isa = lib.masquant_isa()
    i64 = ctypes.c_int64
    lib.masquant_gemm.argtypes = [ptr, i64, i64, i64, ctypes.c_double, ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    lib.masquant_gemm.restype = None
    lib.masquant_gemm_isa.restype = ctypes.c_int
    lib.gemm = bool(lib.masquant_gemm_isa())
    return lib


def _build(compiler: str, extra: tuple[str, ...] = ()) -> Path:
    cache = switches().cache
    flags = (*FLAGS, *extra)
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *flags, compiler, _cpu_flags()]).encode()).hexdigest()[:16]
    path = cache / f"native-{key}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / "kernel.so"
        done = subprocess.run([compiler, *flags, "-o", str(out), str(SOURCE)], capture_output=True, text=True,
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
