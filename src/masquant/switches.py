"""masquant's environment switches, read once per process (``reload()`` reads them again)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Switches:
    fuse: str  # MASQUANT_FUSE: auto (compiled kernels where a compiler is found), 0 (never), 1 (always try)
    native: str  # MASQUANT_NATIVE: auto (the native CPU kernel built for this CPU), 0 (never), avx2 or portable
    # (built for an AVX2-only CPU, or as plain C++ loops: the code other CPU classes run)
    int_gemm: str  # MASQUANT_INT_GEMM: auto (measured once), int (torch._int_mm), float (dequantized weights)
    cxx: str | None  # CXX: the C++ compiler to try first (then g++, clang++)
    cache: Path  # where the built native kernel is kept: $XDG_CACHE_HOME/masquant (~/.cache/masquant)
    node_modules: Path  # MASQUANT_NODE_MODULES: the npm packages the reference data are built from
    routing: bool = True  # MASQUANT_ROUTING: 0 serves every token on the text path in vLLM (what routing costs)


_read: Switches | None = None


def switches() -> Switches:
    """The switches, read from the environment on the first call."""
    global _read
    if _read is None:
        _read = _from_environment()
    return _read


def _from_environment() -> Switches:
    env = os.environ
    fuse, native = env.get("MASQUANT_FUSE", "auto"), env.get("MASQUANT_NATIVE", "auto")
    if fuse not in ("auto", "0", "1"):
        raise ValueError(f"MASQUANT_FUSE must be auto, 0 or 1, got {fuse!r}")
    if native not in ("auto", "0", "avx2", "portable"):
        raise ValueError(f"MASQUANT_NATIVE must be auto, 0, avx2 or portable, got {native!r}")
    int_gemm = env.get("MASQUANT_INT_GEMM", "auto")
    if int_gemm not in ("auto", "int", "float"):
        raise ValueError(f"MASQUANT_INT_GEMM must be auto, int or float, got {int_gemm!r}")
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "masquant"
    routing = env.get("MASQUANT_ROUTING", "1")
    if routing not in ("0", "1"):
        raise ValueError(f"MASQUANT_ROUTING must be 0 or 1, got {routing!r}")
    return Switches(fuse, native, int_gemm, env.get("CXX") or None, cache,
                    Path(env.get("MASQUANT_NODE_MODULES", "data/node_modules")), routing == "1")


def reload() -> None:
    """Have the next ``switches()`` read the environment again (after changing it in the same process)."""
    global _read
    _read = None
