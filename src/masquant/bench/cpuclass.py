"""CPU classes for ``masquant bench --speed --cpu-class``: run the kernels a lesser x86 CPU runs, on
this one, so that one machine measures every class its instruction sets cover.

The instruction sets are fixed when a library starts, so a class other than the machine's runs
in a child process whose environment limits them: ATen's kernels (``ATEN_CPU_CAPABILITY``), MKL's
FP32 GEMM (``MKL_ENABLE_INSTRUCTIONS``), oneDNN's BF16 / int8 kernels (``ONEDNN_MAX_CPU_ISA``) and
masquant's native kernel (``MASQUANT_NATIVE``). PyTorch picks its int8 GEMM by CPUID, not by
oneDNN's limit: on CPUs without AVX-512 VNNI or AMX it runs ``torch._int_mm`` in plain loops,
which the child reproduces by turning oneDNN off.
"""

from __future__ import annotations

import os
import subprocess
import sys

ORDER = ("amx", "avx512-vnni", "avx2", "plain")  # most capable first
CLASSES = {  # class -> (environment of the child, oneDNN on)
    "avx512-vnni": ({"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                     "MKL_ENABLE_INSTRUCTIONS": "AVX512"}, True),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
              "MASQUANT_NATIVE": "avx2"}, False),
}
MARK = "MASQUANT_CPU_CLASS"  # set in the child: the class it runs as


def machine_class(flags: set[str] | None = None) -> str:
    """This CPU's class: ``amx`` (AMX int8 tiles), ``avx512-vnni``, ``avx2`` or ``plain``."""
    if flags is None:  # (the line the native kernel's build is keyed by)
        from ..runtime.native import _cpu_flags

        flags = set(_cpu_flags().partition(":")[2].split())
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    return "avx2" if "avx2" in flags else "plain"


def check(name: str) -> None:
    """An error unless ``name`` is this CPU's class or one it can run."""
    here = machine_class()
    if name not in ORDER:
        raise ValueError(f"unknown CPU class {name!r}: choose one of {', '.join(ORDER)}")
    if name != here and (name not in CLASSES or ORDER.index(name) < ORDER.index(here)):
        runnable = [c for c in ORDER if c == here or (c in CLASSES and ORDER.index(c) > ORDER.index(here))]
        raise ValueError(f"this CPU ({here}) cannot run the {name} class: it runs {', '.join(runnable)}")


def current() -> tuple[str, bool]:
    """(the class this process runs as, whether it is emulated on a more capable CPU)."""
    name = os.environ.get(MARK)
    return (name, True) if name else (machine_class(), False)


def enter() -> None:
    """In the child: the class's in-process settings (oneDNN off for the classes without a fast
    int8 GEMM in PyTorch)."""
    name = os.environ.get(MARK)
    if name in CLASSES and not CLASSES[name][1]:
        import torch

        torch.backends.mkldnn.enabled = False


def run_as(name: str, argv: list[str]) -> int:
    """Run ``masquant argv`` in a child process limited to class ``name``; its exit status."""
    return subprocess.run([sys.executable, "-m", "masquant", *argv], env=environment(name)).returncode


def environment(name: str) -> dict[str, str]:
    """The child's environment: the class's limits, the mark, and an inductor cache of its own.
    (torch 2.13's inductor picks its vector width from ``ATEN_CPU_CAPABILITY`` but does not key its
    on-disk cache by it: kernels compiled for one width and run with the other gave wrong values
    and heap corruption, hence NaN smoothing factors in MAS calibration.)"""
    from ..switches import switches

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache = f"{base}-{name}" if base else str(switches().cache / f"inductor-{name}")
    return {**os.environ, **CLASSES[name][0], MARK: name, "TORCHINDUCTOR_CACHE_DIR": cache}
