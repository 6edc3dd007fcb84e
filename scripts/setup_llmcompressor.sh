#!/usr/bin/env bash
# Create .venv-llmc: llm-compressor 0.14.0.1 (its own pins bring transformers 5.17 and
# compressed-tensors 0.19) beside the CPU torch, plus this repo without its dependencies, so that
# masquant.bench.llmc_recipes runs llm-compressor's recipes on the reference models with masquant's
# calibration samples. Used by `python -m masquant.bench.peers` and the tests marked `llmcompressor`;
# quick when already set up.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
VENV="${LLMC_VENV:-.venv-llmc}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
# already set up: this llm-compressor, and masquant installed from this checkout
if python - "$LLMC_VERSION" 2>/dev/null <<'PY'
import importlib.metadata as m
import pathlib
import sys

import masquant

here = pathlib.Path(masquant.__file__).resolve().parents[2] == pathlib.Path.cwd().resolve()
sys.exit(0 if here and m.version("llmcompressor") == sys.argv[1] else 1)
PY
then
    echo "$VENV: llmcompressor $LLMC_VERSION already installed"
    exit 0
fi
python -m pip install --quiet --upgrade pip
# CPU torch first (a file on this disk), so llm-compressor's range is met and no CUDA build is pulled
python -m pip install --quiet "torch==2.13.0"
python -m pip freeze | grep -iE '^torch==' > "$VENV/constraints.txt"
python -m pip install --quiet -c "$VENV/constraints.txt" "llmcompressor==$LLMC_VERSION" \
    "scipy>=1.10" "soundfile>=0.12" "soxr>=0.3" pillow
python -m pip install --quiet --no-deps -e .
python - <<'PY'
import importlib.metadata as m

versions = {d: m.version(d) for d in ("llmcompressor", "torch", "transformers", "compressed-tensors")}
print(" ".join(f"{k} {v}" for k, v in versions.items()))
PY
