"""``masquant bench --memory``: peak memory of calibration, whole model in memory vs streamed.

Every row runs in its own process (``python -m masquant.bench.memory``) so that its peak
resident size (``ru_maxrss``) belongs to that run alone. Rows: the reference model ``ref-vl``
and a random Qwen2.5-VL with Qwen2.5-VL-3B-wide decoder layers, SmoothQuant and MASQuant
W4A8, in memory and with ``--stream``. Reported next to the peak: the runtime (the process
after importing torch / transformers and the model class, before any weight), the checkpoint
size and one decoder layer's size, so the peak can be read as ``runtime + k x layer``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .pages import write_page

METHODS = ("smoothquant", "masquant")
WIDE = {"hidden": 2048, "intermediate": 11008, "heads": 16, "layers": 4}  # Qwen2.5-VL-3B decoder layers
QUICK_WIDE = {"hidden": 512, "intermediate": 2048, "heads": 8, "layers": 4}
SAMPLES = 8


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process, from /proc (Linux). Not ``ru_maxrss``: Linux
    carries that over ``exec`` from the forking parent, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the peak (VmHWM) over from the current resident size (Linux >= 4.0)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, model: str, method: str, out: str) -> dict:
    """One measured run (inside its own process)."""
    import torch

    from ..calibration.quantize import quantize
    from ..calibration.streaming import quantize_streaming
    from ..config import QuantConfig
    from ..io.hf import processor_of
    from ..io.loading import full_precision_dir
    from ..io.serialization import model_class, save

    path, reference = full_precision_dir(model)
    cls, _ = model_class(path)  # imports the architecture's modules: part of the runtime
    if reference is not None:
        from ..refmodels.evaluate import calibration_inputs

        calib = calibration_inputs(processor_of(path), reference)
    else:
        from ..refmodels import tiny

        calib = [tiny.tiny_sample(s, family="vl") for s in range(SAMPLES)]
    config = QuantConfig(method=method, w_bits=4, a_bits=8)
    gc.collect()
    _reset_peak()  # the peak of building the calibration inputs is not calibration's
    runtime = _status_mib("VmRSS")
    start = time.perf_counter()
    if mode == "stream":
        quantize_streaming(path, calib, config, out, progress=False, dtype=torch.float32)
    else:
        fp = cls.from_pretrained(path, dtype=torch.float32).eval()
        quantize(fp, calib, config, progress=False)
        save(fp, out)
    peak = max(_status_mib("VmHWM"), runtime)  # the reset peak can sit a page below the RSS read after it
    return {"runtime_mib": runtime, "peak_mib": peak, "seconds": time.perf_counter() - start}


def _sizes(path: Path) -> tuple[float, float]:
    """(checkpoint MiB, one decoder layer's float32 MiB)."""
    from ..calibration.shards import CheckpointTensors

    tensors = CheckpointTensors(path)
    total = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 2**20
    numel = sum(math.prod(shape) for key, shape in tensors.shapes.items() if ".layers.0." in key
                and "visual" not in key and "audio" not in key)
    return total, numel * 4 / 2**20


def run_memory_bench(quick: bool = False) -> list[dict]:
    from ..refmodels import registry, tiny

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wide_cfg = QUICK_WIDE if quick else WIDE
        wide = Path(tmp) / "wide-vl"
        tiny.tiny_qwen2_5_vl(**wide_cfg).save_pretrained(wide)
        gc.collect()
        models = {"ref-vl": registry.model_dir("ref-vl"), "random VL " + "x".join(
            str(wide_cfg[k]) for k in ("hidden", "intermediate")) + f", {wide_cfg['layers']} layers": wide}
        for label, path in models.items():
            spec = "ref-vl" if label == "ref-vl" else str(path)
            checkpoint, layer = _sizes(path)
            for method in METHODS:
                for mode in ("memory", "stream"):
                    out = Path(tmp) / f"out-{len(rows)}"
                    run = subprocess.run([sys.executable, "-m", "masquant.bench.memory", mode, spec, method, str(out)],
                                         capture_output=True, text=True, timeout=3600)
                    if run.returncode != 0:
                        raise RuntimeError(f"memory bench row {label} {method} {mode} failed:\n{run.stderr[-3000:]}")
                    result = json.loads(run.stdout.strip().splitlines()[-1])
                    rows.append({"model": label, "method": method, "mode": mode, "checkpoint_mib": checkpoint,
                                 "layer_mib": layer, **result})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | checkpoint MiB | decoder layer MiB (fp32) | method | mode | peak RSS MiB | runtime MiB | "
             "(peak - runtime) / layer | seconds |", "|---" * 9 + "|"]
    for r in rows:
        k = (r["peak_mib"] - r["runtime_mib"]) / r["layer_mib"]
        lines.append(f"| {r['model']} | {r['checkpoint_mib']:.0f} | {r['layer_mib']:.1f} | {r['method']} | "
                     f"{'streamed' if r['mode'] == 'stream' else 'in memory'} | {r['peak_mib']:.0f} | "
                     f"{r['runtime_mib']:.0f} | {k:.1f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


HEADER = """# Peak memory of calibration: in memory vs streamed

Generated by `{command}`; do not edit by hand. Each row is its own process; *runtime* is its
resident size after importing torch, transformers and the model class and building the
calibration inputs (before any weight), *peak RSS* the most it held from there on (`VmHWM`,
reset at that point). W4A8, {samples} calibration samples for the random
model and the shipped calibration set for ref-vl, float32. *(peak - runtime) / layer* is the
`k` of the memory formula in [SCALE.md](../SCALE.md). *seconds* is wall time on a shared machine,
not a speed measurement.

"""


def write(rows: list[dict], out: Path, results: Path | None, command: str) -> str:
    text = HEADER.format(command=command, samples=SAMPLES) + markdown(rows) + "\n"
    write_page(out, "memory_bench", rows, text, results)
    return text


if __name__ == "__main__":
    print(json.dumps(child(*sys.argv[1:5])))
