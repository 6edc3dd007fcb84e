"""Where a benchmark writes its outputs."""

from __future__ import annotations

import json
from pathlib import Path


def write_page(out: Path, stem: str, data, text: str, results: Path | None = None) -> None:
    """A benchmark's outputs: ``out/stem.json`` (the measurements), ``out/stem.md`` (the page) and,
    with ``results``, the same page at that path (a generated docs page)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out / f"{stem}.md").write_text(text)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(text)
