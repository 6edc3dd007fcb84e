"""The integer runtime on CUDA (skipped without a GPU): ``torch._int_mm``'s shape rules
(more than 16 rows, widths that are multiples of 8) and the padded / float64 fallbacks,
and a quantized model giving the same logits on the GPU as on the CPU.

Tests that compare two GPU runs bit for bit run with ``deterministic`` (see there)."""

import copy

import pytest
import torch

import masquant
from masquant import QuantConfig, QuantLinear
from masquant.config import options_for
from masquant.refmodels import tiny
from masquant.runtime.kernels import int_linear, int_matmul, quantize_tokens
from masquant.runtime.primitives import IntGrid, quantize_weight
from masquant.runtime.qlinear import IntWeight

from conftest import interrupted_at, omni_samples, set_switch, vl_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {dict(list(differ.items())[:4])}"


@pytest.mark.parametrize("m", [1, 5, 16, 17, 32, 100])
@pytest.mark.parametrize(("k", "n"), [(64, 64), (64, 24), (60, 64), (64, 36), (4096, 1024)])
def test_cuda_int_matmul_is_exact_for_every_shape(m, k, n):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    got = int_matmul(a.cuda(), b.cuda())
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.cpu().long(), a.long() @ b.long().T)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
def test_cuda_int_linear_matches_the_cpu(symmetric, group_size):
    w, x, bias = torch.randn(48, 64), torch.randn(20, 64), torch.randn(48)
    weight = IntWeight(48, 64, IntGrid(4, symmetric), group_size)
    weight.set(quantize_weight(w, IntGrid(4, symmetric), group_size))
    codes, scale = quantize_tokens(x, 8)
    args = (weight.int8(), weight.scale, None if symmetric else weight.zero, group_size, bias)
    cpu = int_linear(codes, scale, *args)
    gpu = int_linear(codes.cuda(), scale.cuda(), *[a.cuda() if torch.is_tensor(a) else a for a in args])
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("family", "method", "w_bits"), [("vl", "masquant", 4), ("omni", "masquant", 8),
                                                        ("vl", "smoothquant", 8), ("omni", "mas", 4)])
def test_quantized_model_gives_the_same_logits_on_gpu(family, method, w_bits):
    model = tiny.tiny_qwen2_5_vl() if family == "vl" else tiny.tiny_qwen2_5_omni_thinker()
    samples = vl_samples(range(2)) if family == "vl" else omni_samples(range(2))
    config = QuantConfig(method=method, w_bits=w_bits, a_bits=8, **options_for(method, epochs=1, rank=8))
    masquant.quantize(model, samples, config, progress=False)
    sample = (vl_samples([500]) if family == "vl" else omni_samples([500]))[0]
    with torch.no_grad():
        cpu = model(**sample).logits
        gpu_model = copy.deepcopy(model).cuda()
        assert all(m.qweight.codes.is_cuda for m in gpu_model.modules() if isinstance(m, QuantLinear))
        gpu = gpu_model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in sample.items()}).logits
    err = float((gpu.cpu() - cpu).norm() / cpu.norm())
    # float reductions differ between devices, so a few activation codes round the other way
    # (seen: 3.2e-3 on an H200 for W4A8 MASQuant); a wrong kernel gives O(1)
    assert err < 1e-2, f"GPU vs CPU logits differ by {err:.2e}"


@pytest.mark.parametrize("method", ["masquant", "mbq", "awq"])
def test_calibration_runs_on_the_gpu_and_matches_the_cpu(method):
    samples = vl_samples(range(2))
    config = QuantConfig(method=method, w_bits=4, a_bits=8 if method != "awq" else 16,
                         **options_for(method, epochs=1, rank=8, awq_grid=4))
    cpu_model, gpu_model = tiny.tiny_qwen2_5_vl(), tiny.tiny_qwen2_5_vl().cuda()
    cpu_report = masquant.quantize(cpu_model, samples, config, progress=False)
    gpu_report = masquant.quantize(gpu_model, samples, config, progress=False)
    assert all(m.qweight.codes.is_cuda for m in gpu_model.modules() if isinstance(m, QuantLinear))
    sample = vl_samples([500])[0]
    with torch.no_grad():
        cpu = cpu_model(**sample).logits
        gpu = gpu_model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in sample.items()}).logits.cpu()
    # different float reduction orders move a few rounding decisions: close, not equal
    assert float((gpu - cpu).norm() / cpu.norm()) < 5e-2
    for key, value in cpu_report.mean_output_sqnr().items():
        assert abs(gpu_report.mean_output_sqnr()[key] - value) < 1.0, key


def test_speed_rows_run_on_the_gpu():
    from masquant.bench import speed

    rows = speed.linear_rows({"tiny": (64, 32)}, (1, 40), device="cuda")
    assert [r["device"] for r in rows] == ["cuda", "cuda"]
    assert all(v > 0 for r in rows for v in r["ms"].values())


def test_fused_kernels_on_the_gpu_match_the_eager_ones(monkeypatch):
    from masquant.bench.speed import quant_linear
    from masquant.modality import ModalityRouter
    from masquant.runtime import kernels

    if not kernels.fusion_available(torch.device("cuda")):
        pytest.skip("no Triton for torch.compile")
    router = ModalityRouter({})
    layer = quant_linear(torch.nn.Linear(256, 128), 8, rank=8, router=router).cuda()
    x = torch.randn(3, 200, 256, device="cuda")
    ids = torch.zeros(3, 200, dtype=torch.long, device="cuda")
    ids[1, 20:150] = int(masquant.Modality.VISION)
    with router.scope(ids), torch.no_grad():
        assert kernels.use_fusion(x)
        fused = layer(x)
        assert "cuda" not in kernels._broken  # the fused region ran compiled (Triton)
        set_switch(monkeypatch, "MASQUANT_FUSE", "0")
        eager = layer(x)
    assert float((fused - eager).norm() / eager.norm()) < 1e-5


def test_calibration_on_the_gpu_resumes_to_the_same_weights(tmp_path, deterministic):
    samples = vl_samples(range(2))
    config = QuantConfig(method="masquant", w_bits=4, rank=4, epochs=1)
    whole = tiny.tiny_qwen2_5_vl(layers=3).cuda()
    masquant.quantize(whole, samples, config, progress=False)
    with interrupted_at("masquant", 1), pytest.raises(KeyboardInterrupt):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=3).cuda(), samples, config, progress=False,
                          checkpoint=tmp_path / "s")
    resumed = tiny.tiny_qwen2_5_vl(layers=3).cuda()
    masquant.quantize(resumed, samples, config, progress=False, checkpoint=tmp_path / "s", resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(b[k].is_cuda == a[k].is_cuda for k in a)
    _same_bits(a, b)


@pytest.mark.parametrize("family", ["vl", "omni"])
def test_streaming_on_the_gpu_equals_the_in_memory_gpu_run(tmp_path, family, deterministic):
    """``quantize_streaming(..., device="cuda")``: every layer materialised on the GPU, the same
    weights as quantizing the whole model on the GPU (the Omni audio tower adds a buffer made at
    construction, which must follow the weights to the GPU)."""
    from masquant.calibration.streaming import quantize_streaming
    from masquant.io.serialization import load, model_class, save

    build = tiny.tiny_qwen2_5_vl if family == "vl" else tiny.tiny_qwen2_5_omni_thinker
    build(layers=3).save_pretrained(tmp_path / "fp")
    samples = vl_samples(range(4)) if family == "vl" else omni_samples(range(4))
    config = QuantConfig(method="masquant", w_bits=4, rank=4, epochs=1, calib_batch=2)
    cls, _ = model_class(tmp_path / "fp")
    whole = cls.from_pretrained(tmp_path / "fp").cuda().eval()
    masquant.quantize(whole, samples, config, progress=False)
    save(whole, tmp_path / "mem")
    quantize_streaming(tmp_path / "fp", samples, config, tmp_path / "stream", progress=False, device="cuda")
    a, b = load(tmp_path / "mem").state_dict(), load(tmp_path / "stream").state_dict()
    _same_bits(a, b)


def test_cli_streams_on_the_gpu(tmp_path):
    from masquant.cli.main import main

    assert main(["quantize", "--model", "ref-vl", "--method", "smoothquant", "--w-bits", "8", "--a-bits", "8",
                 "--stream", "--device", "cuda", "--no-progress", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "model.safetensors.index.json").exists()


def test_offload_from_the_gpu_keeps_the_activations_on_the_host(tmp_path, monkeypatch, deterministic):
    """``offload="cpu"`` / a directory on a GPU run: the same weights as keeping the activations on
    the GPU, every stored activation on the host, and a GPU peak lower by about what they hold."""
    from masquant.calibration import offload

    stored = []
    put = offload.ActivationStore.put

    def spy(self, key, tensor):
        kept = put(self, key, tensor)
        stored.append(kept.device.type)
        return kept

    monkeypatch.setattr(offload.ActivationStore, "put", spy)
    samples = vl_samples(range(32), text_len=400)
    # every sample's decoder-layer input and full-precision output (float32, hidden 64)
    held = sum(2 * s["input_ids"].numel() * 64 * 4 for s in samples)
    config = QuantConfig(method="masquant", w_bits=4, rank=4, epochs=1, calib_batch=2)
    runs = {}
    for where in (None, "cpu", tmp_path / "act"):
        model = tiny.tiny_qwen2_5_vl(layers=3).cuda()
        stored.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        masquant.quantize(model, samples, config, progress=False, offload=where)
        torch.cuda.synchronize()
        runs[str(where)] = (model.state_dict(), torch.cuda.max_memory_allocated(), set(stored))
    (plain, plain_peak, plain_where), *offloaded = runs.values()
    assert plain_where == {"cuda"}
    for state, peak, where in offloaded:
        assert where == {"cpu"}
        _same_bits(plain, state)
        assert plain_peak - peak > held / 2, (plain_peak, peak, held)  # minus the one batch on the GPU


def test_streamed_mbq_on_the_gpu_matches_the_in_memory_gpu_run(tmp_path, deterministic):
    """The layer-by-layer gradient ratios on the GPU (every kept layer input offloaded to the host)."""
    from masquant.calibration.streaming import quantize_streaming
    from masquant.io.serialization import model_class

    tiny.tiny_qwen2_5_vl(layers=3).save_pretrained(tmp_path / "fp")
    samples = vl_samples(range(4))
    config = QuantConfig(method="mbq", w_bits=4, a_bits=8, calib_batch=2, awq_grid=6)
    cls, _ = model_class(tmp_path / "fp")
    whole = cls.from_pretrained(tmp_path / "fp").cuda().eval()
    expected = masquant.quantize(whole, samples, config, progress=False)
    report = quantize_streaming(tmp_path / "fp", samples, config, tmp_path / "stream", progress=False, device="cuda",
                                offload="cpu")
    for a, b in zip(expected.layers, report.layers, strict=True):
        assert b.groups["mbq"]["weights"] == pytest.approx(a.groups["mbq"]["weights"], rel=1e-4)
