import json

from masquant.cli.main import main


def test_demo_quick_writes_results(tmp_path, capsys):
    assert main(["demo", "--tiny", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    printed = capsys.readouterr().out
    assert "| tiny-qwen2.5-vl | smoothquant | W8A8 |" in printed
    by_key = {(r["model"], r["method"], r["bits"]): r for r in rows}
    for model in ("tiny-qwen2.5-vl", "tiny-qwen2.5-omni-thinker"):
        w8 = by_key[(model, "rtn", "W8A8")]["decoder_sqnr"]
        w4 = by_key[(model, "rtn", "W4A8")]["decoder_sqnr"]
        assert all(w8[m] > w4[m] + 10 for m in w8)
    assert set(by_key[("tiny-qwen2.5-omni-thinker", "awq", "W4A8")]["decoder_sqnr"]) == {"text", "vision", "audio"}


def test_help_lists_examples(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "masquant demo" in capsys.readouterr().out


def test_bad_input_gives_one_line_error(capsys):
    assert main(["eval", "--model", "ref-nothing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("masquant: error: ") and "neither a reference model" in err
    assert "Traceback" not in err


def test_conflicting_or_meaningless_flags_are_refused(capsys, monkeypatch):
    """One bench per run (``--speed`` with ``--export`` used to run the export bench silently), and
    ``eval --no-sidecar`` only for an exported model (it used to be ignored)."""
    import pytest

    import masquant.io.loading

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--speed", "--export"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setattr(masquant.io.loading, "load_any", lambda *a, **k: pytest.fail("loaded before refusing"))
    for args in (["--model", "ref-vl", "--no-sidecar"], ["--model", "ref-vl", "--method", "rtn", "--no-sidecar"]):
        assert main(["eval", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("masquant: error: --no-sidecar scores an exported") and "ref-vl is not one" in err


def test_deterministic_flag_holds_for_the_calibration_only(tmp_path, monkeypatch):
    """``quantize --deterministic`` calibrates with PyTorch's deterministic algorithms and a fixed
    cuBLAS workspace (what makes two GPU runs bit-identical), and leaves the setting as it was."""
    import torch
    from safetensors.torch import load_file

    import masquant.calibration.quantize
    from masquant.refmodels import tiny

    seen = []
    real = masquant.calibration.quantize.quantize

    def spy(*args, **kwargs):
        import os

        seen.append((torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(*args, **kwargs)

    monkeypatch.setattr(masquant.calibration.quantize, "quantize", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr("masquant.io.loading.load_any", lambda spec: (tiny.tiny_qwen2_5_vl(layers=1), None, None))
    monkeypatch.setattr("masquant.cli.quantize.calibration",
                        lambda args, processor, reference: [tiny.tiny_sample(s) for s in range(3)])
    for flag, out in ((["--deterministic"], "a"), ([], "b")):
        assert main(["quantize", "--model", "tiny", "--method", "masquant", "--epochs", "1", "--rank", "4",
                     "--no-progress", *flag, "--out", str(tmp_path / out)]) == 0
    assert seen == [(True, ":4096:8"), (False, ":4096:8")]  # (the variable only matters before CUDA starts)
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))  # on a CPU: the same bits
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unsupported_architecture_is_named_before_anything_else(tmp_path, capsys, monkeypatch):
    """A BERT checkpoint with a calibration file: the error names the architecture and the supported
    ones (it used to say the checkpoint had no processor files), before the model is loaded."""
    import pytest
    from transformers import BertConfig, BertModel

    import masquant.io.loading

    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    monkeypatch.setattr(masquant.io.loading, "load_any", lambda *a, **k: pytest.fail("loaded before refusing"))
    for command in (["quantize", "--calib", str(tmp_path / "calib.jsonl"), "--out", str(tmp_path / "q")],
                    ["analyze", "--out", str(tmp_path / "a")]):
        assert main([command[0], "--model", str(tmp_path / "bert"), *command[1:]]) == 1
        err = capsys.readouterr().err
        assert "does not support BertModel (model_type='bert')" in err and "Supported: qwen2_5_vl" in err
        assert "processor" not in err and not (tmp_path / "q").exists()


def test_the_demo_runs_without_compiling_unless_asked(monkeypatch, capsys):
    """A one-shot command: compiling the fused kernels costs more than it saves on a fresh machine."""
    import os

    import masquant.bench.demo
    from masquant import switches

    seen = []
    monkeypatch.setattr(masquant.bench.demo, "run_tiny_demo", lambda **kw: seen.append(switches.switches().fuse))
    monkeypatch.delenv("MASQUANT_FUSE", raising=False)
    assert main(["demo", "--tiny"]) == 0
    assert seen == ["0"] and "MASQUANT_FUSE" not in os.environ
    monkeypatch.setenv("MASQUANT_FUSE", "1")
    assert main(["demo", "--tiny"]) == 0
    assert seen == ["0", "1"]


def test_a_generated_pages_command_shows_no_absolute_path(tmp_path, monkeypatch):
    """Pages print the command that regenerates them: an absolute ``--results`` path inside the
    working directory is shown relative to it, one outside by its name."""
    import argparse
    from pathlib import Path

    from masquant.cli.main import _results_flag

    monkeypatch.chdir(tmp_path)
    inside = argparse.Namespace(results=tmp_path / "docs" / "SERVING.md")
    assert _results_flag(inside) == ["--results docs/SERVING.md"]
    assert _results_flag(argparse.Namespace(results=Path("/elsewhere/PAGE.md"))) == ["--results PAGE.md"]
    assert _results_flag(argparse.Namespace(results=None)) == []
