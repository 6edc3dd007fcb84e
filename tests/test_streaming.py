"""Streaming quantization: one decoder layer in memory at a time, same result as in memory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from masquant import QuantConfig, quantize
from masquant.calibration.shards import CheckpointTensors, match_names
from masquant.calibration.streaming import quantize_streaming
from masquant.io.serialization import load, model_class, save
from masquant.refmodels import tiny

from conftest import interrupted_at, omni_samples, vl_samples

CONFIG = QuantConfig(method="masquant", w_bits=4, a_bits=8, rank=4, epochs=1, calib_batch=2)


def _in_memory(directory, samples, config, out):
    cls, _ = model_class(directory)
    model = cls.from_pretrained(directory).eval()
    report = quantize(model, samples, config, progress=False)
    save(model, out)
    return report


def _assert_same_weights(a, b):
    sa, sb = load(a).state_dict(), load(b).state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("family", ["vl", "omni"])
def test_streamed_model_equals_the_in_memory_one(family, tmp_path):
    model = tiny.tiny_qwen2_5_vl(layers=3) if family == "vl" else tiny.tiny_qwen2_5_omni_thinker(layers=3)
    model.save_pretrained(tmp_path / "fp")  # saved under the checkpoint's names, not the module names
    samples = vl_samples(range(4)) if family == "vl" else omni_samples(range(4))
    expected = _in_memory(tmp_path / "fp", samples, CONFIG, tmp_path / "mem")
    report = quantize_streaming(tmp_path / "fp", samples, CONFIG, tmp_path / "stream", progress=False)

    files = {p.name for p in (tmp_path / "stream").iterdir()}
    assert "model.safetensors.index.json" in files and "model-00004-of-00004.safetensors" in files
    _assert_same_weights(tmp_path / "mem", tmp_path / "stream")
    assert [r.output_sqnr for r in report.layers] == [r.output_sqnr for r in expected.layers]
    streamed, reference = load(tmp_path / "stream"), load(tmp_path / "mem")
    inputs = {k: v for k, v in samples[0].items() if k != "labels"}
    assert torch.equal(streamed(**inputs).logits, reference(**inputs).logits)
    saved = json.loads((tmp_path / "stream" / "report.json").read_text())
    assert len(saved["layers"]) == 3


def test_half_precision_checkpoint_streams_in_its_dtype(tmp_path):
    tiny.tiny_qwen2_5_vl().to(torch.bfloat16).save_pretrained(tmp_path / "fp")
    config = QuantConfig(method="smoothquant", w_bits=8, a_bits=8, calib_batch=2)
    samples = vl_samples(range(3))
    _in_memory(tmp_path / "fp", samples, config, tmp_path / "mem")
    quantize_streaming(tmp_path / "fp", samples, config, tmp_path / "stream", progress=False)
    _assert_same_weights(tmp_path / "mem", tmp_path / "stream")


@pytest.mark.reliability(case="streamed calibration interrupted in layer 1, resumed",
                         expect="the resumed run writes the same weights as an uninterrupted one")
def test_streaming_resumes_after_an_interruption(tmp_path):
    tiny.tiny_qwen2_5_vl(layers=3).save_pretrained(tmp_path / "fp")
    samples = vl_samples(range(4))
    quantize_streaming(tmp_path / "fp", samples, CONFIG, tmp_path / "clean", progress=False)
    with interrupted_at("masquant", 1), pytest.raises(KeyboardInterrupt):
        quantize_streaming(tmp_path / "fp", samples, CONFIG, tmp_path / "out", progress=False,
                           checkpoint=tmp_path / "state")
    assert not (tmp_path / "out").exists()  # nothing half-written at the destination
    quantize_streaming(tmp_path / "fp", samples, CONFIG, tmp_path / "out", progress=False,
                       checkpoint=tmp_path / "state", resume=True)
    _assert_same_weights(tmp_path / "clean", tmp_path / "out")


def test_names_match_across_transformers_renamings():
    wanted = {"model.language_model.layers.0.mlp.up_proj.weight": (8, 4),
              "model.visual.blocks.0.mlp.up_proj.weight": (8, 4),
              "model.audio_tower.layers.0.fc1.weight": (2, 2),
              "model.language_model.norm.weight": (4,)}
    available = {"model.layers.0.mlp.up_proj.weight": (8, 4), "visual.blocks.0.mlp.up_proj.weight": (8, 4),
                 "audio_tower.layers.0.fc1.weight": (2, 2), "model.norm.weight": (4,),
                 "audio_tower.layers.0.mlp.up_proj.weight": (8, 4)}
    assert match_names(wanted, available) == {
        "model.language_model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "model.visual.blocks.0.mlp.up_proj.weight": "visual.blocks.0.mlp.up_proj.weight",
        "model.audio_tower.layers.0.fc1.weight": "audio_tower.layers.0.fc1.weight",
        "model.language_model.norm.weight": "model.norm.weight"}


@pytest.mark.reliability(case="streaming a checkpoint that does not fit the model's config",
                         expect="ValueError listing the missing / mis-shaped / ambiguous tensors")
def test_mismatched_checkpoints_are_refused():
    with pytest.raises(ValueError, match="no tensor"):
        match_names({"model.layers.0.q.weight": (2, 2)}, {"model.layers.0.k.weight": (2, 2)})
    with pytest.raises(ValueError, match="shape"):
        match_names({"model.layers.0.q.weight": (2, 2)}, {"model.layers.0.q.weight": (2, 3)})
    with pytest.raises(ValueError, match="ambiguous"):
        match_names({"m.x.y.layers.0.q.weight": (2, 2)}, {"x.layers.0.q.weight": (2, 2), "m.layers.0.q.weight": (2, 2)})


@pytest.mark.reliability(case="streaming a damaged checkpoint (NaN in a layer, truncated shard, no safetensors)",
                         expect="ValueError / FileNotFoundError naming the tensor or file; no output written")
def test_damaged_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny.tiny_qwen2_5_vl()
    model.save_pretrained(tmp_path / "fp")
    weights = tmp_path / "fp" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN/Inf in checkpoint tensor model\.layers\.1\.mlp\.up_proj"):
        quantize_streaming(tmp_path / "fp", vl_samples(range(2)), CONFIG, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        store = CheckpointTensors(tmp_path / "fp")
        for key in store.entries:
            store.get(key)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        quantize_streaming(tmp_path / "fp", vl_samples(range(2)), CONFIG, tmp_path / "out", progress=False)


def _gradient_weights(report, key: str) -> list[dict[str, float]]:
    return [layer.groups[key]["weights" if key == "mbq" else "lambdas"] for layer in report.layers]


@pytest.mark.parametrize("family", ["vl", "omni"])
def test_streamed_mbq_measures_the_gradient_ratios_layer_by_layer(family, tmp_path):
    """MBQ streams: its gradient ratios come from a forward pass that keeps every layer's input
    and a backward pass from the last layer to the first, one layer in memory at a time. They
    equal the whole-model backward's up to float order, and MBQ picks the same vectors."""
    model = tiny.tiny_qwen2_5_vl(layers=3) if family == "vl" else tiny.tiny_qwen2_5_omni_thinker(layers=3)
    model.save_pretrained(tmp_path / "fp")
    media = {"image": True} if family == "vl" else {"image": True, "audio": True}
    samples = [tiny.tiny_sample(s, family=family, text_len=8 + 3 * s, **media) for s in range(5)]  # padded batches
    config = QuantConfig(method="mbq", w_bits=4, a_bits=8, calib_batch=2, awq_grid=6)
    expected = _in_memory(tmp_path / "fp", samples, config, tmp_path / "mem")
    report = quantize_streaming(tmp_path / "fp", samples, config, tmp_path / "stream", progress=False,
                                offload=tmp_path / "act")
    want, got = _gradient_weights(expected, "mbq"), _gradient_weights(report, "mbq")
    assert len(got) == 3 and all(len(w) >= 2 for w in got)  # text and at least one other modality per layer
    assert len({tuple(w.values()) for w in got}) > 1  # the ratios really differ between layers
    for w, g in zip(want, got, strict=True):
        assert g == pytest.approx(w, rel=1e-4)
    _assert_same_weights(tmp_path / "mem", tmp_path / "stream")


def test_layerwise_ratios_leave_no_gradient_and_free_what_they_kept(monkeypatch):
    """Called on a model in memory (loading a layer is then a no-op): the ratios of the whole-model
    backward, no parameter left with a gradient or with other ``requires_grad`` flags, and every
    activation it stored given back to the store."""
    from masquant.arch import get_adapter
    from masquant.calibration.collate import collate
    from masquant.calibration.gradients import layerwise_gradient_ratios, modality_gradient_ratios
    from masquant.calibration.offload import ActivationStore
    from masquant.calibration.quantize import capture_all, validate_all

    model = tiny.tiny_qwen2_5_vl(layers=3).eval()
    adapter = get_adapter(model)
    model.lm_head.weight.requires_grad_(False)  # a flag that must survive
    batches = collate(validate_all(model, adapter, [tiny.tiny_sample(s, text_len=6 + 4 * s) for s in range(5)]), 2, 0)
    expected = modality_gradient_ratios(model, adapter, batches)
    stored, forgotten = [], []
    put, forget = ActivationStore.put, ActivationStore.forget
    monkeypatch.setattr(ActivationStore, "put", lambda self, key, t: stored.append(key) or put(self, key, t))
    monkeypatch.setattr(ActivationStore, "forget", lambda self, key: forgotten.append(key) or forget(self, key))
    got = layerwise_gradient_ratios(model, adapter, batches, capture_all(model, adapter, batches, progress=False),
                                    lambda i: None, lambda i: None, ActivationStore("cpu"))
    for w, g in zip(expected, got, strict=True):
        assert g == pytest.approx(w, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert not model.lm_head.weight.requires_grad and model.model.language_model.norm.weight.requires_grad
    assert set(stored) <= set(forgotten) and len(set(stored)) == 3 * 3 + 3  # 3 layer outputs and a gradient per batch


def test_streamed_auto_lambdas_match_the_in_memory_ones(tmp_path):
    tiny.tiny_qwen2_5_vl(layers=2).save_pretrained(tmp_path / "fp")
    samples = vl_samples(range(4))
    config = QuantConfig(method="masquant", w_bits=4, a_bits=8, rank=4, epochs=1, calib_batch=2, lambdas="auto")
    expected = _in_memory(tmp_path / "fp", samples, config, tmp_path / "mem")
    report = quantize_streaming(tmp_path / "fp", samples, config, tmp_path / "stream", progress=False)
    for w, g in zip(_gradient_weights(expected, "mas"), _gradient_weights(report, "mas"), strict=True):
        assert g == pytest.approx(w, rel=1e-4) and g["vision"] != 1.0


CAPPED = textwrap.dedent("""
    import resource, sys
    import torch
    torch.set_num_threads(1)
    from transformers import Qwen2_5_VLForConditionalGeneration
    from masquant import QuantConfig, quantize
    from masquant.refmodels import tiny
    from masquant.io.serialization import model_class, save
    from masquant.calibration.streaming import quantize_streaming
    samples = [tiny.tiny_sample(s, family="vl") for s in range(4)]
    # the cap: what the runtime (python, torch, transformers, masquant) holds now, plus a headroom
    runtime = next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmData:"))
    cap = runtime + int(sys.argv[4])
    print("cap", cap, flush=True)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    config = QuantConfig(method="smoothquant", w_bits=8, a_bits=8)
    if sys.argv[1] == "stream":
        quantize_streaming(sys.argv[2], samples, config, sys.argv[3], progress=False)
    else:
        cls, _ = model_class(sys.argv[2])
        model = cls.from_pretrained(sys.argv[2]).eval()
        quantize(model, samples, config, progress=False)
        save(model, sys.argv[3])
    print("peak RSS MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's data size (Linux)")
@pytest.mark.reliability(case="a model larger than the process's memory limit (RLIMIT_DATA)",
                         expect="streaming quantizes it under the limit and writes the in-memory result; "
                                  "loading it whole under the same limit fails")
def test_a_model_larger_than_the_memory_cap_streams_and_matches(tmp_path):
    model = tiny.tiny_qwen2_5_vl(hidden=1024, layers=20, intermediate=4096, heads=8)
    model.save_pretrained(tmp_path / "fp")
    size = sum(p.stat().st_size for p in (tmp_path / "fp").glob("*.safetensors"))
    del model
    # the limit is the runtime's own data size (~430 MiB with the model classes imported; it differs
    # between library versions, so the capped process measures it) plus this headroom; the checkpoint
    # alone is ~1.15 GiB
    headroom = 560 << 20
    assert size > 1.5 * headroom

    def run(mode, out):
        script = tmp_path / "capped.py"
        script.write_text(CAPPED)
        return subprocess.run([sys.executable, str(script), mode, str(tmp_path / "fp"), str(out), str(headroom)],
                              capture_output=True, text=True, timeout=600)

    streamed = run("stream", tmp_path / "stream")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    cap = int(streamed.stdout.split()[1])
    assert size > cap, (size, cap)  # the whole checkpoint does not fit under the process's limit
    whole = run("memory", tmp_path / "whole")
    assert whole.returncode != 0 and ("memory" in whole.stderr.lower() or "MemoryError" in whole.stderr)
    config = QuantConfig(method="smoothquant", w_bits=8, a_bits=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the capped process: same kernels, same bits
    try:
        _in_memory(tmp_path / "fp", [tiny.tiny_sample(s, family="vl") for s in range(4)], config, tmp_path / "mem")
    finally:
        torch.set_num_threads(threads)
    _assert_same_weights(tmp_path / "mem", tmp_path / "stream")


def test_memory_bench_child_measures_one_run(tmp_path):
    from masquant.bench.memory import child, markdown

    tiny.tiny_qwen2_5_vl().save_pretrained(tmp_path / "fp")
    row = child("stream", str(tmp_path / "fp"), "smoothquant", str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert row["peak_mib"] >= row["runtime_mib"] > 0 and row["seconds"] > 0
    table = markdown([{"model": "tiny", "method": "smoothquant", "mode": "stream", "checkpoint_mib": 1.0,
                       "layer_mib": 0.5, **row}])
    assert "| tiny | 1 | 0.5 | smoothquant | streamed |" in table


@pytest.mark.reliability(case="quantize / bench --speed --device cuda on a machine without a GPU; "
                              "--stream of a quantized model",
                         expect="one-line error before anything is loaded / naming the directory")
def test_cli_refuses_a_missing_gpu_and_a_quantized_source(tmp_path, capsys):
    from masquant.cli.main import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["quantize", "--model", "ref-vl", "--device", "cuda", "--out", str(tmp_path / "q")]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "--speed", "--device", "cuda", "--out", str(tmp_path / "b")]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "b").exists()
    tiny.tiny_qwen2_5_vl().save_pretrained(tmp_path / "fp")
    (tmp_path / "fp" / "quant_config.json").write_text("{}")
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--stream", "--out", str(tmp_path / "q")]) == 1
    assert "already quantized" in capsys.readouterr().err


def test_tied_embeddings_save_load_and_stream(tmp_path):
    """Qwen2.5-VL-3B ties its head to the embeddings; the checkpoint then holds one of the two
    names. Saved (in memory or streamed) and loaded back, the model gives the same logits."""
    model = tiny.tiny_qwen2_5_vl()
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "fp")
    config = QuantConfig(method="smoothquant", calib_batch=2)
    samples = vl_samples(range(3))
    _in_memory(tmp_path / "fp", samples, config, tmp_path / "mem")
    quantize_streaming(tmp_path / "fp", samples, config, tmp_path / "stream", progress=False)
    a, b = load(tmp_path / "mem"), load(tmp_path / "stream")
    assert b.lm_head.weight is b.model.language_model.embed_tokens.weight
    inputs = {k: v for k, v in samples[0].items() if k != "labels"}
    assert torch.equal(a(**inputs).logits, b(**inputs).logits)


@pytest.mark.reliability(case="a streamed save killed mid-way (its staging directory left), then run again",
                         expect="the next run removes the leftover staging directory and writes the model")
def test_a_killed_streaming_run_leaves_nothing_the_next_run_keeps(tmp_path):
    tiny.tiny_qwen2_5_vl().save_pretrained(tmp_path / "fp")
    leftover = tmp_path / ".out.masquant-staging"
    leftover.mkdir()
    (leftover / "model-00002-of-00003.safetensors").write_bytes(b"half a layer")
    quantize_streaming(tmp_path / "fp", vl_samples(range(2)), CONFIG, tmp_path / "out", progress=False)
    assert not leftover.exists() and (tmp_path / "out" / "quant_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "out"]


@pytest.mark.reliability(case="streaming a pre-quantized (FP8) checkpoint, or a directory with two checkpoints",
                         expect="ValueError saying a full-precision checkpoint is needed / naming both files")
def test_quantized_or_ambiguous_checkpoints_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = tiny.tiny_qwen2_5_vl()
    model.config.quantization_config = {"quant_method": "fp8"}
    model.save_pretrained(tmp_path / "fp8", safe_serialization=True)
    with pytest.raises(ValueError, match="already quantized checkpoint"):
        quantize_streaming(tmp_path / "fp8", vl_samples(range(2)), CONFIG, tmp_path / "out", progress=False)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"b\.safetensors holds tensors that a\.safetensors also holds"):
        CheckpointTensors(tmp_path)
    save_file({"x": torch.zeros(2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="F8_E4M3; streaming reads full-precision"):
        CheckpointTensors(tmp_path)
