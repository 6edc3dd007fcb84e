#!/usr/bin/env bash
# Create .venv and install masquant with its dev tools. CPU PyTorch is pinned first so that
# the range in pyproject.toml is already satisfied and pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
