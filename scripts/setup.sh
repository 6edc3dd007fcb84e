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
# lmms-eval for the wrapper masquant.evaluation.lmms (its tests run in CI): lmms-eval's own requirements pull
# torchvision, wandb, opencv and ~60 more, so it goes in without them, plus what its registry,
# evaluator and results table import; torch and transformers stay as installed above.
python -m pip install --quiet --no-deps "lmms-eval==0.7.3"
python -m pip freeze | grep -iE '^(torch|transformers)==' > .venv/constraints.txt
python -m pip install --quiet -c .venv/constraints.txt "evaluate==0.4.6" "loguru==0.7.3" "sacrebleu==2.6.0" \
    "tenacity==9.2.1" "pytablewriter==1.2.1" pillow "filelock<4"
