"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).parent.parent / "README.md"


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1 and 'method="masquant"' in blocks[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert "| layer |" in capsys.readouterr().out  # the report's summary table
    assert (tmp_path / "q-tiny" / "model.safetensors").exists()
    sample = scope["sample"]
    with torch.no_grad():
        assert torch.equal(scope["model"].generate(**sample, max_new_tokens=4, do_sample=False), scope["tokens"])
    assert any(m.patches for m in scope["model"].modules() if isinstance(m, scope["masquant"].QuantLinear))
