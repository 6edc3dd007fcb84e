"""``masquant bench --speed``: run the measurements of ``bench.speed`` and ``bench.calibspeed`` and
write ``speed.json`` / ``speed.md`` (and, with ``--results``, docs/results/PERFORMANCE.md)."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch

from ..runtime import dispatch, native
from . import calibspeed, cpuclass, speed
from .pages import write_page

log = logging.getLogger("masquant")

QUICK_SHAPES = {"square 4096": (4096, 4096)}


def run_speed(quick: bool = False, device: str = "cpu") -> dict:
    """Everything in one process, so that every ratio compares numbers from the same run.

    On CUDA: the linear rows and the wide random model (calibration cost and RSS are CPU rows)."""
    cpu_class, emulated = cpuclass.current() if device == "cpu" else (device, False)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "quick": quick, "device": device,
              "native": native.describe(), "cpu": cpu_name(), "onednn": torch.backends.mkldnn.enabled,
              "int_gemm": large_products(device), "cpu_class": cpu_class, "emulated": emulated}
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(device)
    result["linear"] = speed.linear_rows(QUICK_SHAPES if quick else speed.LINEAR_SHAPES,
                                         (16, 512) if quick else speed.TOKENS, device=device)
    result["models"] = speed.wide_model_rows(layers=1 if quick else 2, device=device)
    result["calibration"], result["memory"] = [], []
    if device == "cpu":
        result["models"] += speed.reference_model_rows("ref-vl", calib_samples=4 if quick else 16)
        result["calibration"] = calibspeed.calibration_rows("ref-vl", calib_samples=8 if quick else 32)
        result["calibration_scaling"] = calibspeed.calibration_scaling_rows(((128, 8), (256, 8)) if quick else
                                                                       ((256, 16), (1024, 16), (1024, 64), (1024, 128)))
        result["memory"] = calibspeed.calibration_memory("masquant", (2, 4) if quick else (4, 8))
        result["cmc"] = calibspeed.cmc_rows({"1024>2560": (1024, 2560)} if quick else calibspeed.CMC_SHAPES)
    return result


def large_products(device: str) -> str:
    """What runs the integer products of many rows here, in words."""
    if dispatch.int_gemm_fast(torch.device(device)):
        return "torch._int_mm"
    if native.gemm_ready():
        return "masquant's native AVX2 GEMM (torch._int_mm slower than FP32 here)"
    return "dequantized float32 weights (torch._int_mm slower than FP32 here, no native GEMM)"


def cpu_name() -> str:
    """The CPU's model name and class (``cpuclass.machine_class``: AMX, AVX-512 VNNI, AVX2)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:  # not Linux
        pass
    return f"{name} ({cpuclass.machine_class()})"


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def goals(result: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for each goal of the issue that this run measured."""
    out: list[tuple[str, str, bool | None]] = []
    sq = _find(result["linear"], shape="square 4096", tokens=512)
    if sq:
        w8, kernel = sq["speedup"]["W8A8"], sq["speedup"].get("int_mm kernel")
        raw = "" if kernel is None else f" (raw torch._int_mm {kernel:.2f}x)"
        out.append(("linear W8A8 >= 3x FP32 (4096x4096, 512 tokens)", f"{w8:.2f}x{raw}", w8 >= 3))
    out += class_goals(result)
    overheads = [r["ms"]["MASQuant W8A8 r32"] / r["ms"]["W8A8"] - 1 for r in result["linear"]
                 if r["tokens"] >= 512 and min(r.get("in", 4096), r.get("out", 4096)) >= 2048]
    if overheads:
        worst = max(overheads)
        out.append(("MASQuant patch overhead <= 10% (rank 32, half non-text), 3B / 7B / 4096 linears, >= 512 tokens",
                    f"worst {100 * worst:+.1f}%", worst <= 0.10))
    models = result["models"]
    for name in dict.fromkeys(r["model"] for r in models):
        fp, w8 = _find(models, model=name, variant="fp32"), _find(models, model=name, variant="W8A8")
        mq, free = _find(models, model=name, variant="MASQuant W8A8 r32"), _find(models, model=name, variant=speed.FREE)
        if fp and w8:
            for phase, goal, limit in (("prefill", "prefill W8A8 >= 2x FP32", 2), ("decode",
                                       "decode W8A8 not slower than FP32", 1)):
                ratio = fp[f"{phase}_ms"] / w8[f"{phase}_ms"]
                out.append((f"{name}: {goal}", f"{ratio:.2f}x" + _bound(fp, free, phase), ratio >= limit))
        if w8 and mq:
            over = mq["prefill_ms"] / w8["prefill_ms"] - 1
            out.append((f"{name}: MASQuant prefill overhead <= 10%", f"{100 * over:+.1f}%", over <= 0.10))
        for variant, limit in (("W8A8", 0.55), ("W4A8", 0.30), ("MASQuant W8A8 r32", 0.55)):
            row = _find(models, model=name, variant=variant)
            if row and "linear_vs_fp16" in row:
                out.append((f"{name}: {variant} decoder linears <= {limit}x FP16 bytes",
                            f"{row['linear_vs_fp16']:.3f}x (whole model {row['model_vs_fp16']:.3f}x)",
                            row["linear_vs_fp16"] <= limit))
    for batch in sorted({r.get("calib_batch", 1) for r in result["calibration"]}, reverse=True):
        calib = {r["method"]: r["seconds"] for r in result["calibration"] if r.get("calib_batch", 1) == batch}
        if "smoothquant" in calib and "masquant" in calib:
            ratio = calib["masquant"] / calib["smoothquant"]
            out.append((f"MAS+CMC calibration <= 5x SmoothQuant (same samples, calib_batch {batch})",
                        f"{ratio:.1f}x", ratio <= 5))
    for row in result.get("calibration_scaling", []):
        out.append((f"MAS+CMC calibration <= 5x SmoothQuant (random VL {row['width']} wide, {row['samples']} samples)",
                    f"{row['ratio']:.1f}x", row["ratio"] <= 5))
    mem = result["memory"]
    if len(mem) == 2:
        grow = mem[1]["calibration_mb"] / max(mem[0]["calibration_mb"], 1e-9) - 1
        out.append((f"peak RSS of calibration grows < 20% from {mem[0]['layers']} to {mem[1]['layers']} layers",
                    f"{100 * grow:+.1f}% (model itself {mem[0]['loaded_mb']:.0f} -> {mem[1]['loaded_mb']:.0f} MB)",
                    grow < 0.20))
    return out


INTEGER = ("W8A8", "W4A8", "MASQuant W8A8 r32")


def class_goals(result: dict) -> list[tuple[str, str, bool | None]]:
    """The goals every CPU class shares (never slower than FP32; W8A8 >= 1.5x FP32 at 3B / 7B
    shapes from 512 tokens) and the AMX one (W8A8 >= 1.0x BF16); the reference models' 256-wide
    rows are reported, not goals (bounded by the rest of the model)."""
    rows = [r for r in result["linear"] if not r["shape"].startswith("ref-") and all(k in r["ms"] for k in INTEGER)]
    if not rows:
        return []
    where = lambda r: f"{r['shape']}, {r['tokens']} tokens"  # noqa: E731
    worst, variant = min(((r, k) for r in rows for k in INTEGER), key=lambda rk: rk[0]["speedup"][rk[1]])
    ratio = worst["speedup"][variant]
    out = [("integer runtime >= 1.0x FP32 at every linear shape and token count",
            f"worst {ratio:.2f}x ({variant}, {where(worst)})", ratio >= 1.0)]
    big = [r for r in rows if r["tokens"] >= 512 and r["shape"].startswith(("3B", "7B"))]
    if big:
        low = min(big, key=lambda r: r["speedup"]["W8A8"])
        out.append(("W8A8 >= 1.5x FP32 at 3B / 7B shapes, >= 512 tokens",
                    f"worst {low['speedup']['W8A8']:.2f}x ({where(low)})", low["speedup"]["W8A8"] >= 1.5))
    if all("bf16" in r["ms"] for r in rows):
        low = min(rows, key=lambda r: r["ms"]["bf16"] / r["ms"]["W8A8"])
        vs = low["ms"]["bf16"] / low["ms"]["W8A8"]
        amx = result.get("cpu_class") == "amx"
        out.append(("on AMX CPUs: W8A8 >= 1.0x BF16 at every linear shape",
                    f"worst {vs:.2f}x BF16 ({where(low)})" + ("" if amx else "; not an AMX CPU, not a goal here"),
                    vs >= 1.0 if amx else None))
    return out


def _bound(fp: dict, free: dict | None, phase: str) -> str:
    """The Amdahl bound of a whole-model speed-up: FP32's time over the time of the same model
    with its decoder linears free (what no linear kernel can remove)."""
    if not free or free[f"{phase}_ms"] <= 0:
        return ""
    return f" (no linear kernel can exceed {fp[f'{phase}_ms'] / free[f'{phase}_ms']:.2f}x here)"


OFF = " (oneDNN off: PyTorch runs torch._int_mm in plain loops, as on CPUs without AVX-512 VNNI / AMX)"
TITLES = {"amx": "AMX", "avx512-vnni": "AVX-512 VNNI", "avx2": "AVX2 without VNNI", "plain": "no AVX2"}


def title(result: dict) -> str:
    """The section title of a run: its CPU class (or device), and whether it was emulated."""
    name = result.get("cpu_class") or result.get("device", "cpu")
    text = TITLES.get(name, name.upper())
    return f"{text} (emulated on {result['cpu']})" if result.get("emulated") else text


def markdown(result: dict, level: int = 2) -> str:
    """A run's tables, headings at ``level``."""
    h = "#" * level
    where = f" on {result['gpu']}" if result.get("gpu") else ""
    cpu = f"{result['cpu']}, {result['machine']}" if result.get("cpu") else result["machine"]
    lines = [f"Machine: {cpu}, {result['threads']} threads, torch {result['torch']} "
             f"(ATen {result['cpu_capability']}){where}; native kernel: {result.get('native', 'not recorded')}; "
             f"large products: {result.get('int_gemm', 'torch._int_mm')}"
             f"{'' if result.get('onednn', True) else OFF}.",
             "",
             f"{h} Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |" for g, m, ok in goals(result)]
    labels = list(result["linear"][0]["ms"]) if result["linear"] else []
    lines += ["", f"{h} Linear layers", "", "Speed-up over FP32 `nn.Linear` (FP32 in milliseconds).", "",
              "| shape | tokens | FP32 ms | " + " | ".join(labels[1:]) + " |", "|---" * (len(labels) + 2) + "|"]
    for r in result["linear"]:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['ms']['fp32']:.2f} | "
                     + " | ".join(f"{r['speedup'][k]:.2f}x" if k in r["speedup"] else "-" for k in labels[1:]) + " |")
    lines += ["", f"{h} Whole models", "",
              "| model | variant | prompt tokens | prefill ms | decode ms/token | linear bytes/param | "
              "linears vs FP16 | model vs FP16 |", "|---" * 8 + "|"]
    for r in result["models"]:
        size = (f"{r['linear_bytes_per_param']:.3f} | {r['linear_vs_fp16']:.3f} | {r['model_vs_fp16']:.3f}"
                if "linear_vs_fp16" in r else "- | - | -")
        lines.append(f"| {r['model']} | {r['variant']} | {r['prompt_tokens']} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms']:.2f} | {size} |")
    if any(result.get(k) for k in ("calibration", "memory", "calibration_scaling", "cmc")):  # CPU rows, not cuda
        lines += _calibration_markdown(result, h)
    return "\n".join(lines)


def _calibration_markdown(result: dict, h: str) -> list[str]:
    mods = list(dict.fromkeys(m for r in result["calibration"] for m in r.get("decoder_sqnr", {})))
    lines = ["", f"{h} Calibration (W4A8)", "",
              "| model | method | calib_batch | samples | seconds | " + " | ".join(f"SQNR {m}" for m in mods)
              + " | KL |", "|---" * (6 + len(mods)) + "|"]
    lines += [f"| {r['model']} | {r['method']} | {r.get('calib_batch', 1)} | {r['samples']} | {r['seconds']:.1f} | "
              + " | ".join(f"{r['decoder_sqnr'][m]:.2f}" for m in mods) + f" | {r['kl']:.4f} |"
              for r in result["calibration"]]
    if result.get("calibration_scaling"):
        lines += ["", "Calibration time by model width and number of samples (random Qwen2.5-VL, W4A8, default "
                  "`calib_batch`, fastest of two interleaved runs):", "",
                  "| width | layers | samples | SmoothQuant s | MASQuant s | ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['width']} | {r['layers']} | {r['samples']} | {r['seconds']['smoothquant']:.1f} | "
                  f"{r['seconds']['masquant']:.1f} | {r['ratio']:.1f}x |" for r in result["calibration_scaling"]]
    if result.get("cmc"):
        lines += ["", "CMC's float64 linear algebra for one linear (seconds, fastest of two; random residual, "
                  "rank 32), as computed and by the path layers under 1024 input channels take: the whitened patch "
                  "(leading eigenpairs only and Gram shortcut, against the whitened residual formed and a full "
                  "eigendecomposition), the covariance's factorisation (Cholesky, against the eigendecomposition; "
                  "once per group input and modality) with one smoothing vector's whitening factors, and the "
                  "report's plain-SVD spectrum:", "",
                  "| shape | patch s | small-matrix path s | speed-up | whitening basis s | small-matrix path s | "
                  "speed-up | plain spectrum s |", "|---" * 8 + "|"]
        for r in result["cmc"]:
            sec = r["seconds"]
            pairs = [(sec[job], sec[f"{job}, small-matrix path"]) for job in ("patch", "whitening basis")]
            lines.append(f"| {r['shape']} | " + " | ".join(f"{a:.2f} | {b:.2f} | {b / a:.2f}x" for a, b in pairs)
                         + f" | {sec['plain spectrum']:.2f} |")
    lines += ["", "| method | layers | RSS after loading MB | peak RSS MB | calibration on top MB |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['layers']} | {r['loaded_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['calibration_mb']:.0f} |" for r in result["memory"]]
    return lines


HEADER = """# Performance

Generated by `masquant bench --speed`, one section per CPU class (`--cpu-class`; each names the
command that wrote it); do not edit by hand. Each section comes from one run on one
machine; compare ratios within a section, not absolute times. A class below the machine's is
emulated: ATen, MKL, oneDNN and masquant's native kernel limited to its instruction sets, and
oneDNN off so that PyTorch's `torch._int_mm` runs in plain loops, as on such a CPU.

Linear-level MASQuant rows have a random rank-32 vision patch and half of the tokens are vision
tokens; the random 3B-wide model gets random vectors and patches (speed and bytes only). The
reference model's W8A8 and MASQuant rows are really calibrated (RTN / MASQuant, W8A8). Decode is
timed per generated token after a short text prompt. Bytes count codes, scales, zero points, vectors
and patches at rest; "model vs FP16" counts every other tensor at 2 bytes. The W8A8 and W4A8 goals
compare with FP32, as the issue set them; "W8A8 on bf16" is the W8A8 model kept in bfloat16
(activations, attention and norms in bf16, integer linears), the row to compare with "bf16" when
serving in half precision. "decoder linears free (bound)" is the FP32 model with every decoder
linear that quantization replaces swapped for a stand-in that only allocates its (zero) output: the
time no linear kernel can remove, so FP32 over it bounds any quantized variant's speed-up (Amdahl);
the goals quote that bound. Float32 integer linears on few rows of small layers (decoding, and the
reference model's prefill) run the native kernel (`masquant.runtime.native`), large ones the
`torch.compile`d fused kernels where `torch._int_mm` is fast (AVX-512 VNNI, AMX) and masquant's
blocked AVX2 GEMM (`native.gemm`) where it is not. The raw `torch._int_mm` column is left empty
("-") where PyTorch runs it in plain loops and the product is large (minutes per call).

"""


def write(result: dict, out: Path, results: Path | None = None, command: str = "masquant bench --speed") -> None:
    """``out/speed.json`` / ``speed.md`` for this run; with ``results``, this run's section of that
    page replaced (the sections of other classes, kept in ``results``' ``.json`` twin, stay)."""
    sections = {}
    store = None if results is None else results.with_suffix(".json")
    if store is not None and store.exists():
        sections = json.loads(store.read_text()).get("sections", {})
    key = result.get("cpu_class") or result.get("device", "cpu")
    sections[key] = {"command": command, "result": result}
    order = sorted(sections, key=lambda k: cpuclass.ORDER.index(k) if k in cpuclass.ORDER else -1)
    page = HEADER + "".join(f"\n## {title(sections[k]['result'])}\n\nGenerated by `{sections[k]['command']}`.\n\n"
                            f"{markdown(sections[k]['result'], level=3)}\n" for k in order)
    write_page(out, "speed", result, page, results)
    if store is not None:
        store.write_text(json.dumps({"sections": sections}, indent=1))
    log.info("wrote %s", out)
