"""Offloaded calibration activations (``offload="cpu"`` or a directory): the same bits as in
memory, the files really hold the activations, and they are gone afterwards (also on errors)."""

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import masquant
from masquant import QuantConfig
from masquant.calibration.streaming import quantize_streaming
from masquant.io.serialization import load, save
from masquant.methods import METHODS
from masquant.refmodels import tiny

from conftest import interrupted_at, vl_samples

MAS = QuantConfig(method="masquant", w_bits=4, a_bits=8, rank=4, epochs=1, calib_batch=2)
AWQ = QuantConfig(method="awq", w_bits=4, a_bits=8, calib_batch=2)


def _run(config, samples, **kw):
    model = tiny.tiny_qwen2_5_vl(layers=3)
    report = masquant.quantize(model, samples, config, progress=False, **kw)
    return model.state_dict(), report.to_dict()["layers"]


def _assert_same(a, b):
    (sa, ra), (sb, rb) = a, b
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]
    assert ra == rb


@pytest.mark.parametrize("config", [MAS, AWQ], ids=["masquant", "awq"])
def test_offload_gives_the_same_bits(config, tmp_path):
    samples = vl_samples(range(5))
    expected = _run(config, samples)
    _assert_same(expected, _run(config, samples, offload="cpu"))
    _assert_same(expected, _run(config, samples, offload=tmp_path / "act" / "new"))  # created when missing
    assert list((tmp_path / "act" / "new").iterdir()) == []


def _mapped_files() -> list[tuple[int, int, str]]:
    rows = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            rows.append((lo, hi, parts[5]))
    return rows


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_disk_offloaded_activations_are_mapped_from_their_files(tmp_path, monkeypatch):
    """While a layer calibrates, every sample's input and target lives in a file of the offload
    directory (memory the OS can page out), not in anonymous memory."""
    seen = []
    original = METHODS["masquant"]

    def checking(ctx):
        maps = _mapped_files()
        for tensor in [s.hidden for s in ctx.samples] + ctx.fp_outputs:
            ptr = tensor.data_ptr()
            where = [path for lo, hi, path in maps if lo <= ptr < hi]
            assert where and where[0].startswith(str(tmp_path / "act")), (ctx.index, where)
        assert ctx.store.file_bytes() >= sum(t.nbytes for t in ctx.fp_outputs) * 2  # inputs and targets
        seen.append(ctx.index)
        return original.fit(ctx)

    monkeypatch.setitem(METHODS, "masquant", dataclasses.replace(original, fit=checking))
    _run(MAS, vl_samples(range(4)), offload=tmp_path / "act")
    assert seen == [0, 1, 2]
    assert list((tmp_path / "act").iterdir()) == []


@pytest.mark.reliability(
    case="calibration interrupted (Ctrl-C in layer 1) with activations offloaded to a directory, then resumed",
    expect="the offload directory is left empty; the resumed run gives the uninterrupted model and report")
def test_files_are_removed_after_an_interruption_and_resume_works(tmp_path):
    samples = vl_samples(range(4))
    expected = _run(MAS, samples)
    with interrupted_at("masquant", 1), pytest.raises(KeyboardInterrupt):
        _run(MAS, samples, offload=tmp_path / "act", checkpoint=tmp_path / "state")
    assert list((tmp_path / "act").iterdir()) == []
    _assert_same(expected, _run(MAS, samples, offload=tmp_path / "act", checkpoint=tmp_path / "state", resume=True))
    assert list((tmp_path / "act").iterdir()) == []


KILLED_IN_LAYER_1 = """
import dataclasses, os, signal, sys
import masquant
from masquant import QuantConfig
from masquant.refmodels import tiny
from masquant.methods import METHODS

original = METHODS["masquant"]

def killing(ctx):
    if ctx.index == 1:
        sys.stdout.write(str(len(os.listdir(sys.argv[1]))) + " " + str(ctx.store.file_bytes()) + "\\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return original.fit(ctx)

METHODS["masquant"] = dataclasses.replace(original, fit=killing)
samples = [tiny.tiny_sample(i, "vl", text_len=24) for i in range(4)]
masquant.quantize(tiny.tiny_qwen2_5_vl(layers=3), samples, QuantConfig(method="masquant", w_bits=4, rank=4, epochs=1),
                  progress=False, offload=sys.argv[1])
"""


@pytest.mark.skipif(os.name != "posix", reason="unlinking a mapped file needs a POSIX system")
@pytest.mark.reliability(
    case="SIGKILL during calibration with activations offloaded to a directory",
    expect="nothing is left in the offload directory (each file is unlinked once mapped)")
def test_a_killed_run_leaves_no_activation_files(tmp_path):
    import signal
    import subprocess
    import sys

    act = tmp_path / "act"
    act.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_LAYER_1, str(act)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    entries, held = (int(x) for x in proc.stdout.split())
    assert held > 0  # the activations were in files when the process died ...
    assert entries == 0 and list(act.iterdir()) == []  # ... and none of them had a name left


def test_streamed_run_with_disk_offload_equals_the_in_memory_one(tmp_path):
    tiny.tiny_qwen2_5_vl(layers=3).save_pretrained(tmp_path / "fp")
    samples = vl_samples(range(4))
    model = tiny.tiny_qwen2_5_vl(layers=3)
    expected = masquant.quantize(model, samples, MAS, progress=False)
    report = quantize_streaming(tmp_path / "fp", samples, MAS, tmp_path / "stream", progress=False,
                                offload=tmp_path / "act")
    assert report.to_dict()["layers"] == expected.to_dict()["layers"]
    save(model, tmp_path / "mem")
    sa, sb = load(tmp_path / "mem").state_dict(), load(tmp_path / "stream").state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert list((tmp_path / "act").iterdir()) == []


@pytest.mark.reliability(
    case="offload directory that cannot be created or written to",
    expect="ValueError naming the directory before anything is captured; the CLI refuses it before loading")
def test_an_unwritable_offload_directory_is_refused(tmp_path, capsys, monkeypatch):
    import masquant.io.loading
    from masquant.cli.main import main

    (tmp_path / "file").write_text("not a directory")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ValueError, match=f"offload directory {bad} .*writable"):
            _run(AWQ, vl_samples(range(2)), offload=bad)
    monkeypatch.setattr(masquant.io.loading, "load_any", lambda *a: pytest.fail("loaded before refusing"))
    bad = tmp_path / "file" / "sub"
    assert main(["quantize", "--model", "ref-vl", "--offload", str(bad), "--out", str(tmp_path / "q")]) == 1
    assert f"offload directory {bad}" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not a writable directory"):
            _run(AWQ, vl_samples(range(2)), offload=tmp_path / "ro")


def test_captured_inputs_go_to_the_store_as_they_are_captured(tmp_path, monkeypatch):
    """With offload, each batch's first-layer input leaves the compute device right after its
    capture (not all of them at the start of calibration), and is written once."""
    import masquant.calibration.quantize as api
    from masquant.calibration.offload import ActivationStore

    events = []
    capture, put = api.capture, ActivationStore.put

    def spy_capture(*args, **kw):
        events.append("capture")
        return capture(*args, **kw)

    def spy_put(self, key, tensor):
        stored = put(self, key, tensor)
        if key[0] == "hidden":
            events.append(("hidden", key[1], "kept" if stored is tensor else "written"))
        return stored

    monkeypatch.setattr(api, "capture", spy_capture)
    monkeypatch.setattr(ActivationStore, "put", spy_put)
    _run(MAS, vl_samples(range(6)), offload=tmp_path / "act")
    captures = [i for i, e in enumerate(events) if e == "capture"]
    assert len(captures) == 3  # 6 samples in batches of 2
    for j, i in enumerate(captures):
        assert events[i + 1] == ("hidden", j, "written")  # stored before the next batch is captured
    # calibration starts from them as stored (later layers' outputs replace them, written anew)
    assert [e for e in events[captures[-1] + 2:] if e[0] == "hidden"][:3] == [("hidden", j, "kept") for j in range(3)]
