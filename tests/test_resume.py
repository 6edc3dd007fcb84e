"""Resumable calibration: a run interrupted at any point (exception or SIGKILL) and resumed
gives the same bytes as an uninterrupted one; stale or foreign state is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import masquant
from masquant import QuantConfig
from masquant.calibration.checkpoint import STATE_DIR
from masquant.cli.quantize import prepare_output
from masquant.refmodels import tiny

from conftest import interrupted_at, vl_samples

CONFIG = QuantConfig(method="masquant", w_bits=4, rank=4, epochs=1)


@pytest.mark.reliability(
    case='calibration interrupted (Ctrl-C in layer 2), then resumed; resumed with other inputs, settings, model '
         'or device type',
    expect='identical model and report; foreign state refused')
def test_an_interrupted_run_resumes_to_the_same_model_and_report(tmp_path):
    samples = vl_samples(range(3))
    whole = tiny.tiny_qwen2_5_vl(layers=4)
    expected = masquant.quantize(whole, samples, CONFIG, progress=False)
    with interrupted_at("masquant", 2), pytest.raises(KeyboardInterrupt):  # Ctrl-C in layer 2
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=4), samples, CONFIG, progress=False, checkpoint=tmp_path / "s")
    assert {p.name for p in (tmp_path / "s").glob("layer_*.json")} == {"layer_0000.json", "layer_0001.json"}
    with pytest.raises(FileExistsError, match="2 layers finished"):  # never reused silently
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=4), samples, CONFIG, progress=False, checkpoint=tmp_path / "s")
    with pytest.raises(ValueError, match="other inputs_sha256"):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=4), samples[:2], CONFIG, progress=False,
                          checkpoint=tmp_path / "s", resume=True)
    with pytest.raises(ValueError, match="other config"):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=4), samples, QuantConfig(method="masquant", w_bits=8),
                          progress=False, checkpoint=tmp_path / "s", resume=True)
    with pytest.raises(ValueError, match="other model_sha256"):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=4, seed=1), samples, CONFIG, progress=False,
                          checkpoint=tmp_path / "s", resume=True)
    run = tmp_path / "s" / "run.json"
    saved = json.loads(run.read_text())
    assert saved["device"] == "cpu"
    run.write_text(json.dumps({**saved, "device": "cuda"}))  # as if started on a GPU
    with pytest.raises(ValueError, match="started on cuda and this one computes on cpu"):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=4), samples, CONFIG, progress=False,
                          checkpoint=tmp_path / "s", resume=True)
    del saved["device"]
    run.write_text(json.dumps(saved))  # state written by a version that did not record the device: accepted
    resumed = tiny.tiny_qwen2_5_vl(layers=4)
    report = masquant.quantize(resumed, samples, CONFIG, progress=False, checkpoint=tmp_path / "s", resume=True)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report.to_dict()["layers"] == expected.to_dict()["layers"]


@pytest.mark.reliability(
    case="a finished layer's state file damaged on disk",
    expect='refused, naming the file')
def test_a_damaged_state_is_refused_with_the_file_named(tmp_path):
    samples = vl_samples(range(2))
    masquant.quantize(tiny.tiny_qwen2_5_vl(layers=3), samples, CONFIG, progress=False, checkpoint=tmp_path / "s")
    (tmp_path / "s" / "layer_0001.safetensors").write_bytes(b"torn")  # damaged after it was written
    with pytest.raises(ValueError, match=r"layer_0001\.safetensors is damaged.*start over"):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=3), samples, CONFIG, progress=False,
                          checkpoint=tmp_path / "s", resume=True)


SCRIPT = """
import sys
import masquant
from masquant import QuantConfig
from masquant.refmodels import tiny
samples = [tiny.tiny_sample(i, "vl", text_len=24) for i in range(4)]
model = tiny.tiny_qwen2_5_vl(layers=8)
masquant.quantize(model, samples, QuantConfig(method="masquant", w_bits=4, rank=4, epochs=2), progress=False,
                  checkpoint=sys.argv[1] + "/state", resume=True)
masquant.save(model, sys.argv[1] + "/model")
"""


def _run(directory: Path, kill_when=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASQUANT_FUSE": "0"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(directory)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_when is not None:
        deadline = time.monotonic() + 120
        while not kill_when() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    return proc


def _weights_digest(directory: Path) -> str:
    return json.loads((directory / "model" / "quant_config.json").read_text())["files"]["model.safetensors"]["sha256"]


@pytest.mark.reliability(
    case='SIGKILL during calibration, then --resume',
    expect='no model appears before the end; bit-identical weights after resuming')
@pytest.mark.parametrize("moment", ["during layer 0", "after layer 3", "twice"])
def test_sigkill_at_any_point_then_resume_gives_identical_bytes(tmp_path, moment):
    reference = _run(tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr
    state = tmp_path / "killed" / "state"
    kills = {"during layer 0": [lambda: (state / "run.json").exists()],
             "after layer 3": [lambda: (state / "layer_0003.json").exists()],
             "twice": [lambda: (state / "layer_0001.json").exists(),
                       lambda: (state / "layer_0005.safetensors").exists()]}
    for when in kills[moment]:
        proc = _run(tmp_path / "killed", kill_when=when)
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "killed" / "model").exists()  # no model appears before calibration ends
    resumed = _run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert _weights_digest(tmp_path / "killed") == _weights_digest(tmp_path / "whole")


@pytest.mark.reliability(
    case='--resume / --overwrite on directories with and without user files',
    expect='user files never deleted; unfinished state continued or discarded only when asked')
def test_the_cli_keeps_user_files_and_continues_only_what_it_started(tmp_path):
    out = tmp_path / "out"
    assert prepare_output(out, overwrite=False, resume=False) == (out / STATE_DIR, True)
    (out / STATE_DIR).mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_output(out, overwrite=False, resume=False)
    assert prepare_output(out, overwrite=False, resume=True) == (out / STATE_DIR, True)
    assert prepare_output(out, overwrite=True, resume=False) == (out / STATE_DIR, True)
    assert not (out / STATE_DIR).exists()  # --overwrite discarded the old state
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_output(out, overwrite=False, resume=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / STATE_DIR).mkdir()
    assert prepare_output(out, overwrite=True, resume=False) == (out / STATE_DIR, True)
    assert not (out / STATE_DIR).exists()  # --overwrite without --resume starts over
    (out / STATE_DIR).mkdir()  # user files and an unfinished run side by side
    with pytest.raises(FileExistsError, match="--resume --overwrite continues it"):
        prepare_output(out, overwrite=False, resume=True)
    assert prepare_output(out, overwrite=True, resume=True) == (out / STATE_DIR, True)
    assert (out / STATE_DIR).exists() and (out / "notes.txt").exists()


@pytest.mark.reliability(case="resume with a model whose decoder weights differ (same config and embeddings)",
                         expect="refused, naming the first layer that differs")
def test_resuming_with_other_decoder_weights_is_refused(tmp_path):
    """Same config and embeddings, different decoder layers (e.g. a merged fine-tune)."""
    samples = vl_samples(range(2))
    config = QuantConfig(method="smoothquant")
    with interrupted_at("smoothquant", 1), pytest.raises(KeyboardInterrupt):
        masquant.quantize(tiny.tiny_qwen2_5_vl(layers=3), samples, config, progress=False, checkpoint=tmp_path / "s")
    other = tiny.tiny_qwen2_5_vl(layers=3)
    with torch.no_grad():
        for p in other.model.language_model.layers.parameters():
            p.mul_(1.5)
    with pytest.raises(ValueError, match="decoder layer 0 of this model differs"):
        masquant.quantize(other, samples, config, progress=False, checkpoint=tmp_path / "s", resume=True)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_resumed_run_reuses_the_saved_gradient_ratios(tmp_path, monkeypatch, streamed):
    """MBQ's gradient ratios (a whole-model backward, or a layer-by-layer pass when streaming) are
    saved with the state: a resumed run reads them instead of measuring again, and ends with the
    same bytes as an uninterrupted run."""
    import masquant.calibration.quantize as api
    from masquant.calibration.streaming import quantize_streaming
    from masquant.io.serialization import load, model_class

    config = QuantConfig(method="mbq", w_bits=4, a_bits=8, calib_batch=2, awq_grid=4)
    samples = vl_samples(range(4))
    tiny.tiny_qwen2_5_vl(layers=3).save_pretrained(tmp_path / "fp")
    measured = []
    for name in ("modality_gradient_ratios", "layerwise_gradient_ratios"):
        real = getattr(api, name)
        monkeypatch.setattr(api, name, lambda *a, real=real, **k: measured.append(1) or real(*a, **k))

    def run(out, **kw):
        if streamed:
            quantize_streaming(tmp_path / "fp", samples, config, tmp_path / out, progress=False, **kw)
            return load(tmp_path / out).state_dict()
        cls, _ = model_class(tmp_path / "fp")
        model = cls.from_pretrained(tmp_path / "fp").eval()
        masquant.quantize(model, samples, config, progress=False, **kw)
        return model.state_dict()

    expected = run("whole")
    with interrupted_at("mbq", 1), pytest.raises(KeyboardInterrupt):
        run("resumed", checkpoint=tmp_path / "s")
    assert len(measured) == 2 and (tmp_path / "s" / "gradient_ratios.json").exists()
    resumed = run("resumed", checkpoint=tmp_path / "s", resume=True)
    assert len(measured) == 2  # read from the state, not measured again
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
