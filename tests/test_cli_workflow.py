"""The command line through subprocesses on a reference model: quantize -> saved model -> eval."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from masquant.refmodels.registry import slices


def masquant(*args, check=True):
    run = subprocess.run([sys.executable, "-m", "masquant", *args], capture_output=True, text=True, timeout=900)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    images, _ = slices("ref-vl", "calib")["item"]
    lines = []
    for i in range(6):
        Image.fromarray(images[i]).save(root / f"item{i}.png")
        lines.append({"text": "What item is shown in this picture?", "image": f"item{i}.png"})
    lines.append({"text": "It was the best of times, it was the worst of times."})
    (root / "calib.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root / "calib.jsonl"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, calib_file):
    out = tmp_path_factory.mktemp("q") / "ref-vl-w8a8"
    run = masquant("--log-json", "quantize", "--model", "ref-vl", "--calib", str(calib_file), "--method",
                   "smoothquant", "--w-bits", "8", "--a-bits", "8", "--out", str(out), "--no-progress")
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert any("layer 4/4: output SQNR" in e["message"] for e in events)
    return out


def test_quantize_writes_a_complete_model(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"model.safetensors", "quant_config.json", "config.json", "report.json", "tokenizer.json",
            "masquant_processor.json"} <= names
    meta = json.loads((saved / "quant_config.json").read_text())
    assert meta["reference"] == "ref-vl" and meta["quant_config"]["method"] == "smoothquant"
    assert json.loads((saved / "report.json").read_text())["samples"] == 7


def test_eval_scores_the_saved_model(saved):
    scores = json.loads(masquant("eval", "--model", str(saved), "--quick").stdout)
    assert scores["item"]["accuracy"] >= 0.6 and scores["digit"]["accuracy"] >= 0.7
    assert np.isfinite(scores["prose_ppl"])


@pytest.mark.reliability(
    case='CLI quantize into an existing output directory',
    expect='exit 1, one-line error, the existing model kept')
def test_existing_output_is_refused_and_kept(saved, calib_file):
    run = masquant("quantize", "--model", "ref-vl", "--calib", str(calib_file), "--method", "rtn", "--out",
                   str(saved), check=False)
    assert run.returncode == 1 and "not empty" in run.stderr and "Traceback" not in run.stderr
    assert json.loads((saved / "quant_config.json").read_text())["quant_config"]["method"] == "smoothquant"


@pytest.mark.reliability(
    case='--resume on an output that is already complete (a retried job)',
    expect='exit 0 and nothing recomputed when its checksums and settings match; exit 1 naming what differs')
def test_resume_of_a_finished_output_verifies_it_and_exits_0(saved, calib_file, tmp_path):
    args = ["quantize", "--model", "ref-vl", "--calib", str(calib_file), "--method", "smoothquant", "--w-bits", "8",
            "--a-bits", "8", "--resume", "--no-progress"]
    stamps = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    run = masquant(*args, "--out", str(saved))
    assert "already complete" in run.stdout and "Loading weights" not in run.stderr
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == stamps  # nothing rewritten
    other = masquant(*[a if a != "smoothquant" else "rtn" for a in args], "--out", str(saved), check=False)
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "method 'smoothquant' there, 'rtn' asked" in other.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(saved, damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    bad = masquant(*args, "--out", str(damaged), check=False)
    assert bad.returncode == 1 and "fails its checks" in bad.stderr and "--overwrite" in bad.stderr


def test_asymmetric_grouped_weights_from_the_command_line(calib_file, tmp_path):
    """W4A16 with zero points and groups of 128, as AWQ users run it, and the reference rank rule."""
    out = tmp_path / "asym"
    masquant("quantize", "--model", "ref-vl", "--calib", str(calib_file), "--method", "rtn", "--a-bits", "16",
             "--w-group-size", "128", "--no-w-symmetric", "--out", str(out), "--no-progress")
    config = json.loads((out / "quant_config.json").read_text())["quant_config"]
    assert (config["w_symmetric"], config["w_group_size"], config["a_bits"]) == (False, 128, 16)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        zeros = [f.get_tensor(k) for k in f.keys() if k.endswith("qweight.zero")]  # noqa: SIM118
    assert zeros and any(bool(z.any()) for z in zeros)  # real zero points, one per group of 128
    assert zeros[0].numel() % 2 == 0
    run = masquant("quantize", "--model", "ref-vl", "--calib", str(calib_file), "--rank", "ratio:0.05,floor:32",
                   "--out", str(tmp_path / "x"), "--method", "smoothquant", check=False)
    assert run.returncode == 1 and "takes no --rank" in run.stderr


@pytest.mark.reliability(
    case='CLI with a bad calibration line',
    expect='exit 1, one line with file:line, no traceback')
def test_bad_calibration_line_is_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "hi", "image": "nowhere.png"}\n')
    run = masquant("quantize", "--model", "ref-vl", "--calib", str(bad), "--out", str(tmp_path / "q"), check=False)
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("masquant: error")]
    assert run.returncode == 1 and len(lines) == 1 and "bad.jsonl:2:" in lines[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.reliability(case="CLI quantize killed (SIGKILL) after layer 2, rerun without and with --resume",
                         expect="without: exit 1 asking for --resume or --overwrite; with: the same weights as "
                                "an uninterrupted run, and the state removed")
def test_a_killed_cli_run_resumes_to_the_same_weights(saved, calib_file, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "resumed"
    args = ["quantize", "--model", "ref-vl", "--calib", str(calib_file), "--method", "smoothquant", "--w-bits", "8",
            "--a-bits", "8", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "masquant", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (out / ".masquant-partial" / "layer_0001.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "quant_config.json").exists()
    refused = masquant(*args, check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    masquant(*args, "--resume")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "quant_config.json"}
    assert not (out / ".masquant-partial").exists()

    def digest(d):
        return json.loads((d / "quant_config.json").read_text())["files"]["model.safetensors"]["sha256"]

    assert digest(out) == digest(saved)


def test_export_of_the_saved_model_loads_back_and_evaluates_with_and_without_sidecar(saved, tmp_path):
    out = tmp_path / "ct"
    run = masquant("export", str(saved), "--format", "compressed-tensors", "--out", str(out))
    assert "exported int-quantized W8A8" in run.stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    assert json.loads((out / "masquant_sidecar.json").read_text())["reference"] == "ref-vl"
    with_sidecar = json.loads(masquant("eval", "--model", str(out), "--quick").stdout)
    without = json.loads(masquant("eval", "--model", str(out), "--quick", "--no-sidecar").stdout)
    for scores in (with_sidecar, without):
        assert scores["item"]["accuracy"] >= 0.6 and np.isfinite(scores["prose_ppl"])


def test_analyze_writes_its_report_and_plots(calib_file, tmp_path):
    out = tmp_path / "analysis"
    masquant("analyze", "--model", "ref-vl", "--calib", str(calib_file), "--out", str(out), "--no-progress")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 4 and all((out / p).stat().st_size > 5000 for p in pngs)
    assert "ecommend" in (out / "report.md").read_text()


def test_streamed_cli_quantize_writes_the_same_model(saved, calib_file, tmp_path):
    import torch

    from masquant.io.serialization import load

    out = tmp_path / "streamed"
    masquant("quantize", "--model", "ref-vl", "--calib", str(calib_file), "--method", "smoothquant", "--w-bits", "8",
             "--a-bits", "8", "--out", str(out), "--no-progress", "--stream")
    assert (out / "model.safetensors.index.json").exists() and (out / "masquant_processor.json").exists()
    streamed, whole = load(out).state_dict(), load(saved).state_dict()
    assert streamed.keys() == whole.keys()
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    scores = json.loads(masquant("eval", "--model", str(out), "--quick").stdout)
    assert scores["item"]["accuracy"] >= 0.6
