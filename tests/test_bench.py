"""The benchmark's bookkeeping (saving after every row, resuming, the goals table), with the
expensive parts (model loading, calibration, evaluation) replaced by counters."""

import json
from types import SimpleNamespace

import pytest
import torch

from masquant.bench import accuracy as bench


def _row(model, bits, method, acc, sqnr):
    return {"model": model, "bits": bits, "method": method, "item": {"accuracy": acc, "answer_nll": 1 - acc},
            "prose_ppl": 100.0, "decoder_sqnr": {"text": 20.0, "vision": sqnr}, "kl": 0.01,
            "storage": {"weight": 1, "patches": 0}, "calib_seconds": 1.0}


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_bench(monkeypatch):
    calls = {"quantize": [], "fp_evals": 0, "fail_at": None}

    def evaluate(model, processor, name, sizes):
        calls["fp_evals"] += model is fp_model
        return {"item": {"accuracy": 0.5, "answer_nll": 1.0, "n": 4}, "prose_ppl": 10.0}

    def quantize(model, calib, config, progress, cache=None):
        if len(calls["quantize"]) == calls["fail_at"]:
            raise Interrupted
        calls["quantize"].append((config.method, config.w_bits, config.a_bits, config.smooth_down_proj))
        return SimpleNamespace(samples=len(calib))

    fp_model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(bench.registry, "load", lambda name: (fp_model, None))
    monkeypatch.setattr(bench, "evaluate_reference", evaluate)
    monkeypatch.setattr(bench, "calibration_inputs", lambda processor, name: [{}] * 8)
    monkeypatch.setattr(bench, "comparison_inputs", lambda processor, name, n: [])
    monkeypatch.setattr(bench, "quantize", quantize)
    monkeypatch.setattr(bench, "compare", lambda fp, q, held: {"decoder_sqnr": {"text": 1.0}, "kl": {"all": 0.1}})
    return calls


def test_an_interrupted_bench_keeps_its_rows_and_resumes_where_it_stopped(fake_bench, tmp_path):
    fake_bench["fail_at"] = 2
    with pytest.raises(Interrupted):
        bench.run_bench(("ref-vl",), quick=True, progress=False, out=tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [(r["bits"], r["method"]) for r in saved] == [("FP32", "fp"), ("W4A8", "rtn"), ("W4A8", "smoothquant")]
    fake_bench["fail_at"] = None
    rows = bench.run_bench(("ref-vl",), quick=True, progress=False, out=tmp_path, resume=True)
    assert [r["method"] for r in rows] == ["fp", "rtn", "smoothquant", "masquant"]
    assert [q[0] for q in fake_bench["quantize"]] == ["rtn", "smoothquant", "masquant"]  # nothing twice
    assert fake_bench["fp_evals"] == 1
    assert len(json.loads((tmp_path / "bench.json").read_text())) == 4


def test_without_resume_everything_is_recomputed(fake_bench, tmp_path):
    bench.run_bench(("ref-vl",), quick=True, progress=False, out=tmp_path)
    bench.run_bench(("ref-vl",), quick=True, progress=False, out=tmp_path)
    assert len(fake_bench["quantize"]) == 6 and fake_bench["fp_evals"] == 2


def test_resume_reuses_only_rows_of_the_same_size(fake_bench, tmp_path):
    """``--resume`` after a ``--quick`` run must not put quick rows into a full page."""
    bench.run_bench(("ref-vl",), quick=True, progress=False, out=tmp_path)
    rows = bench.run_bench(("ref-vl",), quick=False, progress=False, out=tmp_path, resume=True)
    assert fake_bench["fp_evals"] == 2 and all(not r["quick"] for r in rows)
    assert [q[0] for q in fake_bench["quantize"]].count("rtn") == 1 + sum(m.partition("@")[0] == "rtn"
                                                                           for _, m in bench.settings(False))


def test_full_settings_include_the_down_proj_variants():
    todo = bench.settings(quick=False)
    assert ("W4A8", "masquant+down") in todo and ("W4A16", "awq") in todo and ("W4A16", "masquant") not in todo
    assert bench.config_for("W4A6", "masquant+down", quick=False).smooth_down_proj
    assert not bench.config_for("W4A6", "masquant", quick=False).smooth_down_proj
    with pytest.raises(ValueError, match="variant"):
        bench.config_for("W4A8", "masquant+up", quick=False)


def test_goals_table_reports_misses_as_misses():
    rows = [{"model": "m", "bits": "FP32", "method": "fp", "item": {"accuracy": 0.8, "answer_nll": 0.5}},
            _row("m", "W8A8", "masquant", 0.75, 40.0),
            _row("m", "W4A8", "rtn", 0.70, 20.0), _row("m", "W4A8", "smoothquant", 0.72, 23.0),
            _row("m", "W4A8", "mbq", 0.71, 21.0), _row("m", "W4A8", "mas", 0.80, 26.0),
            _row("m", "W4A8", "masquant", 0.725, 23.5)]
    table = bench.goals(rows).splitlines()
    w8 = next(line for line in table if "W8A8 within 1 pt" in line)
    assert w8.endswith("| no |") and "-5.0 pt" in w8
    beats = next(line for line in table if "beats" in line)
    assert "smoothquant 72.0" in beats and "+0.5 pt" in beats and beats.endswith("| no |")
    assert next(line for line in table if "MAS-only" in line).endswith("| no |")  # 7.5 pt behind
    sqnr = next(line for line in table if "SQNR" in line)
    assert "+0.5 dB" in sqnr and sqnr.endswith("| no |")


def test_budget_variants_and_the_comparison_section(tmp_path):
    """The same-budget rows map to their settings; the comparison lines up lrc, GPTQ and peer rows against
    MASQuant at the same bits (SQNR differences, KL ratio) and the page carries peer rows without storage."""
    todo = bench.settings(quick=False)
    assert all((bits, m) in todo for bits in ("W8A8", "W4A8", "W4A6") for m in bench.BUDGET_VARIANTS)
    assert bench.config_for("W4A8", "masquant+text", quick=False).text_patch
    assert bench.config_for("W4A8", "smoothquant+gptq", quick=False).w_rounding == "gptq"
    with pytest.raises(ValueError, match="has no text patch"):
        bench.config_for("W4A8", "smoothquant+text", quick=False)
    from masquant.bench.comparison import comparison, read_peers

    def row(method, bits, text, vision, kl, storage=True):
        r = {"model": "m", "bits": bits, "method": method, "decoder_sqnr": {"text": text, "vision": vision}, "kl": kl,
             "prose_ppl": 1.0, "item": {"accuracy": 0.5, "answer_nll": 1.0}}
        return {**r, "storage": {"weight": 2**20, "patches": 0}, "calib_seconds": 1.0} if storage else r

    rows = [row("masquant", "W4A8", 20.0, 30.0, 0.04), row("lrc", "W4A8", 22.0, 27.5, 0.05),
            row("rtn", "W4A8", 1.0, 1.0, 1.0), row("llmc:gptq", "W4A16", 25.0, 31.0, 0.02, storage=False)]
    table = comparison(rows).splitlines()
    lrc = next(line for line in table if "| lrc |" in line)
    assert "+2.0 | -2.5 | 0.0500 | 1.25x | 1.00" in lrc
    assert not any("| rtn |" in line for line in table)
    peer = next(line for line in table if "llmc:gptq" in line)
    assert peer.endswith("| 0.0200 | - | - |")  # (no MASQuant row at W4A16, no storage)
    (tmp_path / "peers.json").write_text(json.dumps(rows[-1:]))
    assert read_peers(tmp_path / "peers.json") == rows[-1:]
    with pytest.raises(FileNotFoundError, match=r"masquant\.bench\.peers"):
        read_peers(tmp_path / "missing.json")
    assert "llmc:gptq" in bench.markdown(rows)


def test_a_page_from_saved_rows_runs_nothing_and_keeps_the_bench_order(tmp_path):
    rows = [{"model": "ref-vl", "bits": "W4A8", "method": "lrc"}, {"model": "ref-vl", "bits": "FP32", "method": "fp"},
            {"model": "ref-omni", "bits": "W4A8", "method": "rtn"},
            {"model": "ref-vl", "bits": "W4A8", "method": "rtn", "quick": True}]
    with pytest.raises(FileNotFoundError, match="no saved rows"):
        bench.saved_rows(("ref-vl",), tmp_path)
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    assert bench.saved_rows(("ref-vl",), tmp_path) == [rows[1], rows[0]]
    assert bench.saved_rows(("ref-vl", "ref-omni"), tmp_path)[-1] == rows[2]
    with pytest.raises(ValueError, match="no rows of ref-x"):
        bench.saved_rows(("ref-x",), tmp_path)


def test_calibration_seeds_use_disjoint_halves_and_get_their_own_section(fake_bench, tmp_path):
    """``METHOD@k``: the method calibrated on the k-th half of the slice with seed k; the page shows the whole
    slice's score and the halves' mean +- half range, and keeps the halves out of the main tables."""
    from masquant.bench import seeds

    todo = bench.settings(quick=False)
    assert ("W4A8", "masquant@1") in todo and ("W4A6", "rtn@2") in todo and ("W4A16", "rtn@1") not in todo
    assert todo.index(("W4A8", "masquant@1")) > todo.index(("W4A16", "mbq"))  # (after every main row)
    assert bench.config_for("W4A8", "masquant@2", quick=False).seed == 2
    assert bench.config_for("W4A8", "masquant+gptq", quick=False).seed == 0
    with pytest.raises(ValueError, match="calibration seed"):
        seeds.split("masquant@3")
    samples = list(range(9))
    assert seeds.calibration_half(samples, 1) == [0, 2, 4, 6, 8] and seeds.calibration_half(samples, 2) == [1, 3, 5, 7]
    rows = bench.run_settings("ref-vl", [("W4A8", "smoothquant"), ("W4A8", "smoothquant@1"),
                                         ("W4A8", "smoothquant@2")], quick=False)
    assert [r["calib_samples"] for r in rows[1:]] == [8, 4, 4]

    def row(method, wer, vision):
        return {**_row("m", "W4A8", method, 0.5, vision), "sentence": {"wer": wer, "cer": 0.1, "exact": 0.0}}

    page_rows = [row("masquant", 0.10, 30.0), row("masquant@1", 0.12, 29.0), row("masquant@2", 0.08, 31.0),
                 row("rtn", 0.5, 20.0)]
    section = seeds.section(page_rows)
    assert "| W4A8 | masquant | 10.0 (10.0 ± 2.0) | 20.0 (20.0 ± 0.0) | 30.0 (30.0 ± 1.0) |" in section
    assert "| rtn |" not in section  # (no halves run)
    bench.write(page_rows, tmp_path / "out", tmp_path / "RESULTS.md")
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## Calibration seeds" in page and "masquant@1" not in page.split("## Calibration seeds")[0]
    assert "| sentence WER / CER % |" in page and "| 10.0 / 10.0 |" in page  # (the main table's generative column)


def test_the_demo_table_shows_the_tasks_a_model_has():
    from masquant.bench.demo import format_reference_table

    vl = [{"model": "ref-vl", "bits": "FP32", "method": "fp", "item": {"accuracy": 0.8}, "digit": {"accuracy": 0.9},
           "prose_ppl": 170.0},
          {"model": "ref-vl", "bits": "W4A8", "method": "masquant", "item": {"accuracy": 0.79},
           "digit": {"accuracy": 0.9}, "prose_ppl": 171.0, "decoder_sqnr": {"text": 17.0, "vision": 28.5}}]
    table = format_reference_table(vl).splitlines()
    assert table[0] == ("| ref-vl | item acc (vision) | digit acc (vision) | prose ppl (text) | SQNR text | "
                        "SQNR vision |")  # (as before the generative tasks)
    assert table[2] == "| full precision | 80.0 | 90.0 | 170.00 | - | - |"
    omni = [{**r, "model": "ref-omni", "sentence": {"wer": 0.081}, "word": {"accuracy": 0.95}} for r in vl]
    omni[1]["decoder_sqnr"]["audio"] = 25.0
    table = format_reference_table(omni).splitlines()
    assert "| word acc (audio) | sentence WER (audio) | prose ppl (text) |" in table[0] and "SQNR audio" in table[0]
    assert table[3] == "| masquant W4A8 | 79.0 | 90.0 | 95.0 | 8.1 | 171.00 | 17.0 | 28.5 | 25.0 |"


def test_reference_page_names_the_training_recipe():
    from masquant.bench.reference import _extras, _threads

    run = {"threads": 1, "batch": {"qa": 8, "read": 12}, "tower_ctc_weight": 0.5, "tower_lr": {"visual": 0.25}}
    assert _threads(run) == "1 core" and _threads({}) == "2 cores"
    assert "visual x0.25" in _extras(run) and "CTC weight 0.5" in _extras(run) and "'read': 12" in _extras(run)
    assert _extras({"steps": 10}) == ""  # an older record names no recipe
