"""``masquant analyze``: measurements, plots and a recommendation that follows the evidence."""

import json

from masquant.cli.main import main
from masquant.evaluation.diagnose import analyze

from conftest import misaligned_vl, vl_samples


def test_misaligned_model_gets_masquant_and_every_artifact(tmp_path):
    result = analyze(misaligned_vl(), vl_samples(range(12), image_grid=8), tmp_path, w_bits=4, a_bits=8, rank=8,
                     progress=False)
    assert result["recommendation"]["method"] == "masquant"
    assert max(max(r["ratio_max"], r["inverse_ratio_max"]) for r in result["misalignment"]) > 3  # planted
    assert {"report.md", "analysis.json", "misalignment.png", "channels.png", "sqnr.png", "spectra.png"} <= {
        p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["recommendation"]["text"] == result["recommendation"]["text"]
    report = (tmp_path / "report.md").read_text()
    assert "Recommendation (W4A8):** masquant" in report and "![sqnr.png](sqnr.png)" in report
    # whitened spectra keep at least as much energy as plain ones at every rank
    for row in result["spectra"]:
        for rank, kept in row["whitened"].items():
            assert kept >= row["plain"][rank] - 1e-9


def test_text_only_calibration_recommends_one_vector(vl_model, tmp_path):
    result = analyze(vl_model, vl_samples(range(6), image=False, text_len=24), tmp_path, progress=False)
    assert result["recommendation"]["method"] == "smoothquant" and result["misalignment"] == []


def test_cli_analyze_writes_the_report(tmp_path, capsys):
    assert main(["analyze", "--model", "ref-nothing", "--out", str(tmp_path)]) == 1
    assert "neither a reference model" in capsys.readouterr().err
