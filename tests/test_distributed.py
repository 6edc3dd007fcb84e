"""Data-parallel calibration (``masquant.calibration.distributed``): two Gloo processes against one.

``distributed_worker.py`` runs in two processes started with the environment variables
``torchrun`` sets; each writes what it computed, and the tests compare that with the same
calibration run in this (single) process."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker
import masquant
from masquant.calibration import distributed
from masquant.cli.main import main

TESTS = Path(__file__).parent
SRC = Path(masquant.__file__).parents[1]


def _env(**extra) -> dict:
    path = os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two worker processes computed."""
    out, port = tmp_path_factory.mktemp("ranks"), _free_port()
    logs = [(out / f"rank{r}.log").open("w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(TESTS / "distributed_worker.py"), str(out)],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(2)]
    deadline = time.monotonic() + 240
    try:  # a failed rank leaves the other waiting in a collective: stop it then
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            assert time.monotonic() < deadline, "the worker processes did not finish in time"
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    for r, p in enumerate(procs):
        assert p.returncode == 0, (out / f"rank{r}.log").read_text()[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    """The same calibration in one process (one thread, as the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return worker.quantize_all()
    finally:
        torch.set_num_threads(threads)


def _without_time(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


def test_every_rank_ends_with_the_same_model(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    for name in worker.RUNS:
        a, b = ranks[0]["runs"][name], ranks[1]["runs"][name]
        assert a["state"].keys() == b["state"].keys()
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        assert _without_time(a["report"]) == _without_time(b["report"])
        assert torch.equal(a["logits"], b["logits"])


# per run: largest layer-SQNR difference (dB), fraction of integer codes that may differ, float rtol
# (MASQuant: the learned vectors differ in the last bits, which can move a few activation codes of
# the 16 vision tokens: a few 1e-2 dB in layer 1, with every weight code equal)
TOLERANCES = {"masquant": (0.05, 1e-3, 1e-3), "mbq": (1e-6, 0.0, 1e-5)}


@pytest.mark.parametrize("name", list(worker.RUNS))
def test_two_processes_give_the_one_process_result(ranks, single, name):
    sqnr_tol, codes_tol, rtol = TOLERANCES[name]
    one, two = single[name], ranks[0]["runs"][name]
    r1, r2 = one["report"], two["report"]
    assert (r1["samples"], r1["tokens"]) == (r2["samples"], r2["tokens"]) == (7, {"text": 92, "vision": 16})
    assert len(r1["layers"]) == len(r2["layers"]) == 2
    for l1, l2 in zip(r1["layers"], r2["layers"], strict=True):
        assert l1["output_sqnr"].keys() == l2["output_sqnr"].keys() == {"text", "vision"}
        for m in l1["output_sqnr"]:
            assert abs(l1["output_sqnr"][m] - l2["output_sqnr"][m]) < sqnr_tol, (l1["index"], m)
        for path, lin in l1["linears"].items():
            for m, acts in lin["activations"].items():  # merged statistics: exact counts, close ranges
                other = l2["linears"][path]["activations"][m]
                assert acts["tokens"] == other["tokens"]
                assert math.isclose(acts["absmax"], other["absmax"], rel_tol=rtol)
    a, b = one["state"], two["state"]
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".l2"):
            continue
        if key.endswith(".l1"):  # a patch: its singular vectors may flip sign, the product may not
            x, y = (s[key].double() @ s[key[:-1] + "2"].double() for s in (a, b))
            atol = 1e-3 * float(x.abs().max())
            assert torch.allclose(x, y, rtol=0, atol=atol), key
        elif a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=rtol, atol=rtol * float(a[key].abs().max())), key
        else:
            assert float((a[key] != b[key]).float().mean()) <= codes_tol, key
    assert torch.allclose(one["logits"], two["logits"], atol=1e-3 * float(one["logits"].abs().max()))


def test_mbq_is_bit_identical(ranks, single):
    """No learned step: the merged statistics and errors pick the same scales, hence the same tensors."""
    a, b = single["mbq"]["state"], ranks[0]["runs"]["mbq"]["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # (the report's float64 errors may differ in the last bit)


def test_reduce_helpers_merge_what_each_rank_saw(ranks):
    gen0, gen1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    text0, audio0 = torch.randn(3, 4, generator=gen0), torch.randn(5, 4, generator=gen0)
    text1 = torch.randn(4, 4, generator=gen1)
    text = torch.cat([text0, text1])
    for result in ranks:
        helpers = result["helpers"]
        stats = helpers["stats"]
        assert list(stats) == ["text", "audio"]  # audio held by rank 0 only
        assert torch.equal(stats["text"]["absmax"], text.abs().amax(0)) and stats["text"]["count"] == 7
        assert torch.allclose(stats["text"]["abssum"], text.abs().sum(0, dtype=torch.float64))
        assert stats["text"]["second"] is None
        assert torch.equal(stats["audio"]["absmax"], audio0.abs().amax(0)) and stats["audio"]["count"] == 5
        assert torch.allclose(stats["audio"]["second"], audio0.double().T @ audio0.double())
        assert helpers["meter"] == pytest.approx({"text": 10 * math.log10(3.0 / 1.0), "vision": 10 * math.log10(4.0)})
        assert torch.equal(helpers["grad_p"], torch.full((3,), 2.0)) and helpers["grad_q"] is None
        assert helpers["ints"] == [1, 2] and helpers["max"] == [1.5]
        assert helpers["on_rank0"] == "from rank 0" and helpers["on_rank0_error"] == "refused by rank 0"


def test_errors_are_clear_on_every_rank(ranks):
    for result in ranks:
        errors = result["errors"]
        assert "1 batches for 2 processes" in errors["too_few"] and "fewer processes" in errors["too_few"]
        assert "not available with data-parallel calibration (2 processes)" in errors["checkpoint"]
        assert "calibration sample 1 has no 'input_ids'" in errors["invalid"]


def test_one_process_helpers_change_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.shard(3)) == (0, 1, [0, 1, 2])
    t = torch.ones(2)
    assert distributed.all_reduce(t, "max") is t and distributed.all_reduce_floats([0.1, 2]) == [0.1, 2]
    assert distributed.on_rank0(lambda x: x + 1, 1) == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_from_env()


def test_torchrun_cli_saves_the_one_process_model(tmp_path):
    """``torchrun --nproc-per-node 2 -m masquant quantize``: rank 0 alone saves and prints, and the
    model equals the one a single-process ``masquant quantize`` saves."""
    from PIL import Image

    from masquant.refmodels.registry import slices

    images, _ = slices("ref-vl", "calib")["item"]
    lines = [{"text": "It was the best of times, it was the worst of times."}]
    for i in range(3):
        Image.fromarray(images[i]).save(tmp_path / f"item{i}.png")
        lines.append({"text": "What item is shown in this picture?", "image": f"item{i}.png"})
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["quantize", "--model", "ref-vl", "--calib", str(calib), "--method", "mbq", "--calib-batch", "1",
            "--awq-grid", "10", "--no-progress"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "masquant", *args, "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1 and run.stderr.count("layer 4/4: output SQNR") == 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert json.loads((tmp_path / "two" / "quant_config.json").read_text())["quant_config"]["awq_grid"] == 10
    assert one["samples"] == two["samples"] == 4 and one["tokens"] == two["tokens"]
    for l1, l2 in zip(one["layers"], two["layers"], strict=True):
        assert l1["output_sqnr"] == pytest.approx(l2["output_sqnr"], abs=1e-6)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if not a[key].is_floating_point() else torch.allclose(a[key], b[key])

    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "masquant", *args, "--out", str(tmp_path / "three"), "--resume"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode != 0 and "--resume is not available with data-parallel calibration" in resumed.stderr
    assert not (tmp_path / "three").exists()


def test_torchrun_streams_and_rank0_alone_writes(tmp_path):
    """``--stream`` under torchrun: every rank reads each layer from the shards, rank 0 alone
    writes; the sharded model equals the single-process streamed one (SmoothQuant reduces
    abs-max only, so bit for bit)."""
    from safetensors.torch import load_file as read

    args = ["quantize", "--model", "ref-vl", "--method", "smoothquant", "--w-bits", "8", "--a-bits", "8",
            "--calib-batch", "4", "--no-progress", "--stream"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "masquant", *args, "--out", str(tmp_path / "two")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved to") == 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    shards = sorted(p.name for p in (tmp_path / "one").glob("model-*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "two").glob("model-*.safetensors"))
    for name in shards:
        a, b = read(str(tmp_path / "one" / name)), read(str(tmp_path / "two" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_cli_picks_gloo_for_cpu_and_warns_when_nccl_overrides_the_device(monkeypatch, caplog):
    """``--device cpu`` under torchrun calibrates on the CPUs (Gloo) even on a GPU machine; under
    NCCL a ``--device`` naming another GPU is ignored with a warning, not silently."""
    import argparse

    from masquant.cli.quantize import compute_device, process_backend

    assert process_backend("cpu") == "gloo" and process_backend(None) is None and process_backend("cuda:0") is None
    monkeypatch.setattr(distributed, "device", lambda: torch.device("cuda", 1))
    with caplog.at_level("WARNING", logger="masquant"):
        assert compute_device(argparse.Namespace(device="cuda:1")) == torch.device("cuda", 1)
        assert not caplog.records
        assert compute_device(argparse.Namespace(device="cuda:0")) == torch.device("cuda", 1)
    assert "--device cuda:0 ignored" in caplog.text and "cuda:1" in caplog.text


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.distributed.is_nccl_available(), reason="needs a CUDA GPU and NCCL"))])
def test_a_group_of_one_runs_every_collective_and_changes_nothing(backend, monkeypatch, deterministic):
    """Calibration in a process group of one process, forced to count as data-parallel: every
    collective of calibration runs (statistics, gradient ratios, MAS gradients and losses, the
    meters) and the model and report equal the plain run's on the same device (deterministic
    algorithms: two GPU runs differ otherwise, collectives or not). Under NCCL this
    puts every reduced tensor on the GPU; two NCCL ranks cannot share one GPU, so on a machine
    with one GPU this is as far as NCCL can be checked."""
    device = "cuda" if backend == "nccl" else "cpu"

    def run() -> dict:
        out = {}
        for name, settings in worker.RUNS.items():
            qmodel = worker.model().to(device)
            report = masquant.quantize(qmodel, worker.calibration(), masquant.QuantConfig(**settings), progress=False)
            out[name] = (qmodel.state_dict(), _without_time(report.to_dict()))
        return out

    plain = run()
    calls = []
    reduce = distributed.dist.all_reduce
    monkeypatch.setattr(distributed.dist, "all_reduce",
                        lambda t, *a, **k: calls.append(t.device.type) or reduce(t, *a, **k))
    if backend == "nccl":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "active", lambda: True)
        assert distributed.device().type == device
        grouped = run()
    finally:
        torch.distributed.destroy_process_group()
    assert len(calls) > 100 and set(calls) == {device}
    for name, (state, report) in plain.items():
        other_state, other_report = grouped[name]
        assert state.keys() == other_state.keys()
        assert all(torch.equal(state[k], other_state[k]) for k in state), name
        assert report == other_report, name
