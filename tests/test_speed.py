"""The speed benchmark's measurements on tiny shapes (no timing assertions: CI machines are noisy)."""

import copy

import pytest
import torch

from masquant import QuantLinear
from masquant.bench import calibspeed, cpuclass, perf, speed
from masquant.refmodels import tiny


def test_linear_rows_time_every_variant_and_agree_on_outputs():
    rows = speed.linear_rows({"tiny": (64, 32)}, (1, 8))
    assert [r["tokens"] for r in rows] == [1, 8]
    assert {"fp32", "bf16", "int_mm kernel", "W8A8", "W4A8", "MASQuant W8A8 r32"} <= set(rows[0]["ms"])
    assert all(v > 0 for r in rows for v in r["ms"].values())
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    y = speed.quant_linear(linear, 8)(x)
    assert torch.nn.functional.cosine_similarity(y.flatten(), linear(x).flatten(), 0) > 0.999


def test_checkpoint_bytes_count_codes_scales_and_patches():
    model = speed.synthetic_quantize(tiny.tiny_qwen2_5_vl(hidden=64, layers=1), 4, rank=8)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    params = sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in linears)
    expected = 0
    for m in linears:
        expected += m.out_features * ((m.in_features + 1) // 2)  # packed codes
        expected += 2 * 4 * m.out_features  # fp32 scale and zero per row
        expected += 3 * 4 * m.in_features  # smoothing table
        expected += 4 * m.out_features if m.bias is not None else 0
        expected += sum(2 * 8 * (m.in_features + m.out_features) for _ in m.patches.values())  # fp16 patches
    sizes = speed.checkpoint_bytes(model)
    assert abs(sizes["linear_bytes_per_param"] - expected / params) < 1e-9
    assert 0 < sizes["linear_vs_fp16"] < sizes["model_vs_fp16"] < 1
    assert any(m.patches for m in linears)


def test_synthetic_masquant_model_runs_with_routing():
    model = speed.synthetic_quantize(tiny.tiny_qwen2_5_vl(), 8, rank=4)
    out = model(**tiny.tiny_sample(0, "vl"))
    assert torch.isfinite(out.logits).all()


def test_goals_are_judged_from_the_measurements():
    linear = [{"shape": "square 4096", "tokens": 512, "ms": {"fp32": 9.0, "W8A8": 2.0, "MASQuant W8A8 r32": 2.4},
               "speedup": {"W8A8": 4.5, "int_mm kernel": 5.0}},
              {"shape": "ref-vl attn 256>256", "in": 256, "out": 256, "tokens": 512,  # not in the patch goal
               "ms": {"fp32": 0.1, "W8A8": 0.1, "MASQuant W8A8 r32": 0.5}, "speedup": {"W8A8": 1.0}}]
    models = [{"model": "m", "variant": "fp32", "prefill_ms": 10.0, "decode_ms": 1.0},
              {"model": "m", "variant": "W8A8", "prefill_ms": 6.0, "decode_ms": 0.9, "linear_vs_fp16": 0.52,
               "model_vs_fp16": 0.6},
              {"model": "m", "variant": speed.FREE, "prefill_ms": 8.0, "decode_ms": 0.5}]
    calibration = [{"method": "smoothquant", "seconds": 2.0, "calib_batch": 1},
                   {"method": "masquant", "seconds": 12.0, "calib_batch": 1}]
    memory = [{"layers": 2, "calibration_mb": 100.0, "loaded_mb": 50.0},
              {"layers": 4, "calibration_mb": 110.0, "loaded_mb": 90.0}]
    goals = perf.goals({"linear": linear, "models": models, "calibration": calibration, "memory": memory})
    table = {g: ok for g, _, ok in goals}
    measured = {g: m for g, m, _ in goals}
    assert measured["MASQuant patch overhead <= 10% (rank 32, half non-text), 3B / 7B / 4096 linears, >= 512 tokens"] \
        == "worst +20.0%"
    # the Amdahl bound: 10 ms of FP32 prefill of which 8 ms stay with free linears
    assert measured["m: prefill W8A8 >= 2x FP32"] == "1.67x (no linear kernel can exceed 1.25x here)"
    assert measured["m: decode W8A8 not slower than FP32"].endswith("exceed 2.00x here)")
    assert table["linear W8A8 >= 3x FP32 (4096x4096, 512 tokens)"] is True
    assert table["MASQuant patch overhead <= 10% (rank 32, half non-text), 3B / 7B / 4096 linears, >= 512 tokens"] \
        is False  # 20%
    assert table["m: prefill W8A8 >= 2x FP32"] is False and table["m: decode W8A8 not slower than FP32"] is True
    assert table["m: W8A8 decoder linears <= 0.55x FP16 bytes"] is True
    assert table["MAS+CMC calibration <= 5x SmoothQuant (same samples, calib_batch 1)"] is False
    assert table["peak RSS of calibration grows < 20% from 2 to 4 layers"] is True


def test_model_rows_time_every_variant_in_the_same_rounds(monkeypatch):
    calls = []
    real = speed.timeit
    monkeypatch.setattr(speed, "timeit", lambda fn, **kw: calls.append(1) or real(fn, min_time=0.0, min_runs=1))
    fp = tiny.tiny_qwen2_5_vl(hidden=64, layers=1)
    models = {"fp32": fp, "W8A8": speed.synthetic_quantize(tiny.tiny_qwen2_5_vl(hidden=64, layers=1), 8)}
    sample = speed._strip(tiny.tiny_sample(0, "vl"))
    rows = speed.model_rows("tiny", models, sample, sample, decode_tokens=2)
    assert [r["variant"] for r in rows] == ["fp32", "W8A8"]
    assert len(calls) == speed.ROUNDS * 3 * 2  # prefill, short and long generate of each variant, every round
    assert "linear_vs_fp16" in rows[1] and "linear_vs_fp16" not in rows[0]
    assert all(r["prefill_ms"] > 0 and r["decode_ms"] >= 0 for r in rows)


def test_calibration_scaling_rows_time_both_methods_and_feed_the_goals():
    rows = calibspeed.calibration_scaling_rows(((32, 2),), layers=1, repeats=1)
    assert rows[0]["width"] == 32 and set(rows[0]["seconds"]) == {"smoothquant", "masquant"}
    assert rows[0]["ratio"] == rows[0]["seconds"]["masquant"] / rows[0]["seconds"]["smoothquant"]
    result = {"linear": [], "models": [], "calibration": [], "memory": [], "calibration_scaling": rows}
    goals = perf.goals(result)
    assert [g for g, _, _ in goals] == ["MAS+CMC calibration <= 5x SmoothQuant (random VL 32 wide, 2 samples)"]
    page = perf.markdown({**result, "machine": "x", "threads": 1, "torch": "t", "cpu_capability": "c"})
    assert "Calibration time by model width and number of samples" in page



def test_cmc_rows_time_both_eigensolvers_and_restore_the_default(monkeypatch):
    """The CMC table times the default patch and the full-eigendecomposition one (by lifting
    ``FAST_MIN`` for that call only), and the page shows their ratio."""
    from masquant.methods import cmc as compensation

    sizes = []
    default, real = compensation.FAST_MIN, compensation._top_eigh
    monkeypatch.setattr(compensation, "_top_eigh", lambda g, c: sizes.append(compensation.FAST_MIN) or real(g, c))
    rows = calibspeed.cmc_rows({"t": (48, 160)}, rank=4, repeats=1)
    assert sizes == [default, float("inf")] and default == compensation.FAST_MIN  # default, full, restored
    assert rows[0]["in"] == 48 and set(rows[0]["seconds"]) == {
        "patch", "patch, small-matrix path", "whitening basis", "whitening basis, small-matrix path", "plain spectrum"}
    result = {"linear": [], "models": [], "calibration": [], "memory": [], "cmc": rows}
    page = perf.markdown({**result, "machine": "x", "threads": 1, "torch": "t", "cpu_capability": "c",
                          "cpu": "Some CPU (avx2)"})
    assert "| t | " in page and "CMC's float64 linear algebra" in page
    assert page.startswith("Machine: Some CPU (avx2), x, 1 threads")
    assert perf.cpu_name().endswith(f"({cpuclass.machine_class()})")

def test_a_gpu_page_has_no_empty_calibration_tables():
    """``bench --speed --device cuda`` measures no calibration rows (they are CPU rows): its page
    leaves those sections out rather than printing empty tables."""
    result = {"linear": [], "models": [], "calibration": [], "memory": [], "machine": "x", "threads": 1,
              "torch": "t", "cpu_capability": "c", "gpu": "Some GPU"}
    page = perf.markdown(result)
    assert "on Some GPU" in page and "## Whole models" in page
    assert "Calibration" not in page and "peak RSS" not in page


def test_w8a8_of_a_bf16_model_keeps_bf16_around_the_integer_linears():
    """The benchmark's "W8A8 on bf16" variant: integer linears inside a bfloat16 model, whose
    output stays bf16 and close to the bf16 model's."""
    bf16 = tiny.tiny_qwen2_5_vl(hidden=128, layers=1).to(torch.bfloat16)
    quantized = speed.synthetic_quantize(copy.deepcopy(bf16), 8)
    sample = tiny.tiny_sample(0, "vl")
    with torch.no_grad():
        ref, out = bf16(**sample).logits, quantized(**sample).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), 0) > 0.98


def test_free_linears_bound_the_speed_up_of_any_linear_kernel():
    """The bound variant: every decoder linear that quantization replaces (and nothing else) is a
    stand-in that returns zeros of the right shape; the model still runs and generates."""
    fp = tiny.tiny_qwen2_5_vl(hidden=64, layers=2)
    free = speed.free_linears(copy.deepcopy(fp))
    quantized = speed.synthetic_quantize(copy.deepcopy(fp), 8)
    kinds = {n: type(m).__name__ for n, m in free.named_modules()}
    replaced = {n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert replaced and {n for n, k in kinds.items() if k == "_FreeLinear"} == replaced
    assert sum(isinstance(m, torch.nn.Linear) for m in free.modules()) == \
        sum(isinstance(m, torch.nn.Linear) for m in fp.modules()) - len(replaced)
    sample = speed._strip(tiny.tiny_sample(0, "vl"))
    with torch.no_grad():
        assert free(**sample).logits.shape == fp(**sample).logits.shape
        assert free.generate(**sample, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape[1] == \
            sample["input_ids"].shape[1] + 2


def test_the_cpu_class_goals_are_judged_from_the_linear_rows():
    """Never slower than FP32 (the worst integer variant at any shape but the reference model's),
    W8A8 >= 1.5x FP32 at 3B / 7B shapes from 512 tokens, and >= 1.0x BF16 judged only on AMX."""
    def row(shape, tokens, fp32, bf16, w8, w4, mq):
        ms = {"fp32": fp32, "bf16": bf16, "W8A8": w8, "W4A8": w4, "MASQuant W8A8 r32": mq}
        return {"shape": shape, "tokens": tokens, "ms": ms, "speedup": {k: fp32 / v for k, v in ms.items()}}

    linear = [row("3B up 2048>11008", 512, 10.0, 5.0, 6.0, 6.5, 6.2), row("7B up 3584>18944", 16, 4.0, 2.0, 2.0, 2.0,
                                                                          4.4),
              row("ref-vl attn 256>256", 1, 0.01, 0.02, 0.1, 0.1, 0.1)]  # (reported, not a goal)
    goals = {g: (m, ok) for g, m, ok in perf.class_goals({"linear": linear, "cpu_class": "avx2"})}
    assert goals["integer runtime >= 1.0x FP32 at every linear shape and token count"] == \
        ("worst 0.91x (MASQuant W8A8 r32, 7B up 3584>18944, 16 tokens)", False)
    assert goals["W8A8 >= 1.5x FP32 at 3B / 7B shapes, >= 512 tokens"] == \
        ("worst 1.67x (3B up 2048>11008, 512 tokens)", True)
    measured, met = goals["on AMX CPUs: W8A8 >= 1.0x BF16 at every linear shape"]
    assert met is None and measured.startswith("worst 0.83x BF16 (3B up 2048>11008, 512 tokens); not an AMX CPU")
    amx = {g: ok for g, _, ok in perf.class_goals({"linear": linear, "cpu_class": "amx"})}
    assert amx["on AMX CPUs: W8A8 >= 1.0x BF16 at every linear shape"] is False


def test_the_page_keeps_one_section_per_cpu_class(tmp_path):
    base = {"torch": "t", "threads": 2, "machine": "x86_64", "cpu_capability": "AVX512", "quick": True,
            "device": "cpu", "native": "n", "cpu": "Some CPU (avx512-vnni)", "int_gemm": "torch._int_mm",
            "linear": [], "models": [], "calibration": [], "memory": []}
    page = tmp_path / "PERF.md"
    perf.write({**base, "cpu_class": "avx2", "emulated": True, "onednn": False}, tmp_path / "a", page, "cmd avx2")
    perf.write({**base, "cpu_class": "avx512-vnni", "emulated": False}, tmp_path / "b", page, "cmd vnni")
    perf.write({**base, "cpu_class": "avx2", "emulated": True, "onednn": False, "threads": 7}, tmp_path / "c", page,
               "cmd avx2 again")
    text = page.read_text()
    vnni, avx2 = text.index("## AVX-512 VNNI\n"), text.index("## AVX2 without VNNI (emulated on Some CPU")
    assert vnni < avx2 and "`cmd vnni`" in text and "`cmd avx2 again`" in text and "`cmd avx2`" not in text
    assert "7 threads" in text and "### Goals" in text and "torch._int_mm in plain loops" in text[avx2:]


def test_cpu_classes_are_checked_against_this_cpu():
    assert cpuclass.machine_class({"avx2", "avx512_vnni", "amx_int8"}) == "amx"
    assert cpuclass.machine_class({"avx2", "avx512f"}) == "avx2" and cpuclass.machine_class(set()) == "plain"
    here = cpuclass.machine_class()
    cpuclass.check(here)
    with pytest.raises(ValueError, match="unknown CPU class"):
        cpuclass.check("sse2")
    if here != "amx":
        with pytest.raises(ValueError, match=f"this CPU \\({here}\\) cannot run the amx class"):
            cpuclass.check("amx")


def test_bench_speed_for_another_class_runs_a_child_limited_to_it(monkeypatch):
    """``bench --speed --cpu-class avx2`` on a more capable CPU re-runs itself in a child process
    whose environment limits ATen, MKL, oneDNN and the native kernel; the child (marked) measures
    with oneDNN off, so that ``torch._int_mm`` runs in PyTorch's plain loops."""
    from masquant.cli.main import main

    if cpuclass.ORDER.index(cpuclass.machine_class()) > cpuclass.ORDER.index("avx2"):
        pytest.skip("this CPU has no AVX2")
    calls = []
    monkeypatch.setattr(cpuclass, "run_as", lambda name, argv: calls.append((name, argv)) or 0)
    seen = {}

    def fake_run_speed(quick, device):
        seen["onednn"] = torch.backends.mkldnn.enabled
        return {"linear": [], "models": [], "calibration": [], "memory": []}

    monkeypatch.setattr(perf, "run_speed", fake_run_speed)
    monkeypatch.setattr(perf, "write", lambda *a, **k: None)
    monkeypatch.setattr(perf, "markdown", lambda *a, **k: "")
    argv = ["bench", "--speed", "--quick", "--cpu-class", "avx2"]
    monkeypatch.delenv(cpuclass.MARK, raising=False)
    if cpuclass.machine_class() != "avx2":
        assert main(argv) == 0 and calls == [("avx2", argv)] and not seen
    monkeypatch.setenv(cpuclass.MARK, "avx2")  # as in the child
    before = torch.backends.mkldnn.enabled
    try:
        assert main(argv) == 0
    finally:
        torch.backends.mkldnn.enabled = before
    assert seen == {"onednn": False}


def test_the_avx2_class_reproduces_the_slow_int_mm_and_takes_the_native_gemm():
    """In the child's environment: ATen at AVX2, ``torch._int_mm`` slower than FP32 (plain
    loops), the native kernel built for AVX2, and large products through its blocked GEMM."""
    import json
    import subprocess
    import sys

    if cpuclass.ORDER.index(cpuclass.machine_class()) > cpuclass.ORDER.index("avx2"):
        pytest.skip("this CPU has no AVX2")
    code = """
import json, torch
from masquant.bench import cpuclass
from masquant.runtime import dispatch, native
cpuclass.enter()
from masquant.bench.speed import quant_linear
q = quant_linear(torch.nn.Linear(512, 256), 8)
x = torch.randn(300, 512)
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "fast": dispatch.probe_int_gemm(),
                  "native": native.describe(), "kind": dispatch.kernel(q, x)}))
"""
    env = {**cpuclass.environment("avx2"), "MASQUANT_INT_GEMM": "auto"}
    assert env["TORCHINDUCTOR_CACHE_DIR"].endswith("avx2") and env["ATEN_CPU_CAPABILITY"] == "avx2"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"aten": "AVX2", "fast": False, "native": "AVX2 (MASQUANT_NATIVE=avx2)", "kind": "gemm"}
