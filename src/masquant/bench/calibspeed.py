"""``masquant bench --speed``, calibration rows: wall time of every method on a reference model,
the MASQuant / SmoothQuant ratio by model width and number of samples, the peak RSS of
calibration, and the cost of CMC's float64 linear algebra per linear (``masquant.bench.speed`` has
the runtime rows)."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable

import torch

from ..config import QuantConfig

log = logging.getLogger("masquant")


def calibration_rows(name: str = "ref-vl", calib_samples: int = 32, repeats: int = 2) -> list[dict]:
    """Calibration wall time of every method on the same samples of a reference model (W4A8,
    default ``calib_batch``), plus SmoothQuant and MASQuant at ``calib_batch=1`` (the paper's
    schedule), each with the held-out decoder-output SQNR per modality and KL. SmoothQuant and
    MASQuant, whose ratio is a goal, are timed ``repeats`` times (the fastest counts)."""
    from ..calibration.quantize import quantize
    from ..evaluation.evaluate import compare
    from ..refmodels import registry
    from ..refmodels.evaluate import calibration_inputs, comparison_inputs

    fp, processor = registry.load(name)
    calib = calibration_inputs(processor, name)
    calib = calib[:: max(len(calib) // calib_samples, 1)][:calib_samples]
    held_out = comparison_inputs(processor, name, n=12)
    todo = [(m, QuantConfig().calib_batch) for m in ("rtn", "smoothquant", "awq", "mbq", "mas", "masquant")]
    rows = []
    for method, batch in [*todo, ("smoothquant", 1), ("masquant", 1)]:
        seconds = math.inf
        for _ in range(repeats if method in ("smoothquant", "masquant") else 1):  # the ratio's two: fastest run
            model = copy.deepcopy(fp)
            start = time.perf_counter()
            quantize(model, calib, QuantConfig(method=method, w_bits=4, a_bits=8, calib_batch=batch), progress=False)
            seconds = min(seconds, time.perf_counter() - start)
        scores = compare(fp, model, held_out)
        rows.append({"model": name, "method": method, "calib_batch": batch, "samples": len(calib),
                     "seconds": seconds, "decoder_sqnr": scores["decoder_sqnr"], "kl": scores["kl"]["all"]})
        log.info("calibration %s (batch %d) on %d samples: %.1f s", method, batch, len(calib), seconds)
    return rows


def calibration_scaling_rows(sizes: tuple[tuple[int, int], ...] = ((256, 16), (1024, 16), (1024, 64), (1024, 128)),
                             layers: int = 2, repeats: int = 2) -> list[dict]:
    """SmoothQuant and MASQuant calibration time (W4A8) on random Qwen2.5-VL models, per
    ``(width, samples)``: how the MASQuant / SmoothQuant ratio moves once arithmetic, not
    per-call overhead, dominates (the reference models are 256 wide), and once the per-layer
    costs that do not grow with the samples (CMC's eigendecompositions) are spread over more of
    them, up to the reference's 128 samples. Each time is the fastest of ``repeats`` interleaved
    runs (this machine is noisy)."""
    from ..calibration.quantize import quantize
    from ..refmodels import tiny

    rows = []
    for width, samples in sizes:
        fp = tiny.tiny_qwen2_5_vl(hidden=width, layers=layers, intermediate=4 * width, heads=max(width // 64, 2))
        calib = [tiny.tiny_sample(i, "vl", text_len=96, image_grid=16) for i in range(samples)]
        quantize(copy.deepcopy(fp), calib[:2], QuantConfig(method="rtn"), progress=False)  # warm-up
        seconds: dict[str, float] = {}
        for _ in range(repeats):
            for method in ("smoothquant", "masquant"):
                start = time.perf_counter()
                quantize(copy.deepcopy(fp), calib, QuantConfig(method=method, w_bits=4, a_bits=8), progress=False)
                seconds[method] = min(seconds.get(method, math.inf), time.perf_counter() - start)
        rows.append({"width": width, "layers": layers, "samples": samples, "seconds": seconds,
                     "ratio": seconds["masquant"] / seconds["smoothquant"]})
        log.info("calibration, random VL %d wide, %d samples: %s", width, samples, rows[-1])
    return rows


CMC_SHAPES = {"3B attn 2048>2048": (2048, 2048), "3B up 2048>11008": (2048, 11008), "7B attn 3584>3584": (3584, 3584)}


def cmc_rows(shapes: dict[str, tuple[int, int]] = CMC_SHAPES, rank: int = 32, repeats: int = 2) -> list[dict]:
    """Seconds of CMC's float64 linear algebra for one linear of each shape, each as computed and
    by the path layers under ``compensation.FAST_MIN`` input channels take: a whitened
    rank-``rank`` patch (leading eigenpairs and the Gram shortcut, against ``A`` formed and a full
    eigendecomposition), the factorisation of the unsmoothed covariance (``whitening_basis``,
    once per group input and modality: Cholesky, against the eigendecomposition) with one
    smoothing vector's ``T`` and ``T^-1`` (``scaled_whitening``, once per vector), and the
    report's spectrum of the plain variant. Random residual and activations (the cost does not
    depend on the values); fastest of ``repeats`` interleaved runs."""
    rows = []
    for name, (k, n) in shapes.items():
        seconds = _cmc_seconds(k, n, rank, repeats)
        rows.append({"shape": name, "in": k, "out": n, "rank": rank, "seconds": seconds})
        log.info("CMC linear algebra, %s: %s", name, {key: f"{v:.2f}s" for key, v in seconds.items()})
    return rows


def _cmc_seconds(k: int, n: int, rank: int, repeats: int) -> dict[str, float]:
    from ..methods import cmc as compensation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * k, k, generator=g, dtype=torch.float64)
    cov, delta = x.T @ x, torch.randn(n, k, generator=g) * 1e-2
    smooth = torch.rand(k, generator=g) + 0.5
    whitener = compensation.whitening(cov, smooth=smooth)

    def small_path(job: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            saved, compensation.FAST_MIN = compensation.FAST_MIN, math.inf
            try:
                job()
            finally:
                compensation.FAST_MIN = saved
        return run

    def patch() -> None:
        compensation.low_rank_patch(delta, rank, whitener=whitener)

    def basis() -> None:  # the factorisation and one smoothing vector's factors
        compensation.whitening(cov, smooth=smooth)

    jobs = {"patch": patch, "patch, small-matrix path": small_path(patch),
            "whitening basis": basis, "whitening basis, small-matrix path": small_path(basis),
            "plain spectrum": lambda: compensation.spectrum(delta, rank)}
    seconds = {label: math.inf for label in jobs}
    for _ in range(repeats):
        for label, job in jobs.items():
            start = time.perf_counter()
            job()
            seconds[label] = min(seconds[label], time.perf_counter() - start)
    return seconds


RSS_PROBE = """
import json, sys, torch
from masquant import QuantConfig, quantize
from masquant.config import options_for
from masquant.refmodels import tiny
torch.set_num_threads(1)
layers, method = int(sys.argv[1]), sys.argv[2]
model = tiny.tiny_qwen2_5_vl(hidden=512, layers=layers, intermediate=1536, heads=8)
samples = [tiny.tiny_sample(i, "vl", text_len=96, image_grid=16) for i in range(8)]
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) * 1024
before = status("VmRSS")
quantize(model, samples, QuantConfig(method=method, **options_for(method, epochs=1)), progress=False)
print(json.dumps({"loaded": before, "peak": status("VmHWM")}))
"""


def calibration_memory(method: str = "masquant", layers: tuple[int, int] = (4, 8)) -> list[dict]:
    """Peak RSS of calibrating a random Qwen2.5-VL (512 wide) with L and 2L layers, each in a
    fresh process (Linux ``/proc``): the model itself and the calibration on top of it."""
    import json
    import subprocess
    import sys

    rows = []
    for n in layers:
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(n), method], capture_output=True, text=True,
                             check=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"method": method, "layers": n, "loaded_mb": probe["loaded"] / 2**20,
                     "peak_mb": probe["peak"] / 2**20, "calibration_mb": (probe["peak"] - probe["loaded"]) / 2**20})
        log.info("peak RSS, %s, %d layers: %s", method, n, rows[-1])
    return rows
