#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the CUDA tests (kernels, calibration, streaming,
# offload and resume on the GPU, NCCL in a group of one, MAS training's Triton fake
# quantization), a profile of one quantized linear and the GPU speed rows. CI has no GPU;
# run this on a machine with one, from the repository root, with a Python that has torch (CUDA),
# transformers and accelerate (the package itself is taken from src/):
#
#   scripts/gpu-checks.sh [OUT]        # OUT: where the logs and speed.md go (default out/gpu)
#
# Each step has its own time limit, so a hanging step still leaves the others' results.
set -uo pipefail
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$python" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| NCCL', torch.distributed.is_nccl_available())" | tee -a "$out/gpu.txt"

echo "== CUDA tests"
timeout "${TESTS_TIMEOUT:-330}" "$python" -m pytest -p no:cacheprovider -q -rs --durations=12 tests/test_cuda.py \
    "tests/test_distributed.py::test_a_group_of_one_runs_every_collective_and_changes_nothing" \
    "tests/test_masquant.py::test_compiled_fake_quantization_of_training_matches_the_eager_one" 2>&1 \
    | tee "$out/tests.log" || status=1

echo "== where a quantized linear's time goes (scripts/gpu_profile.py)"
timeout "${PROFILE_TIMEOUT:-90}" "$python" scripts/gpu_profile.py "$out/profile.txt" > /dev/null 2>&1 || status=1
grep "us/call" "$out/profile.txt"

echo "== GPU speed rows (masquant bench --speed --device cuda)"
timeout "${BENCH_TIMEOUT:-240}" "$python" -m masquant bench --speed --device cuda --no-progress --out "$out/speed" 2>&1 \
    | tee "$out/bench.log" || status=1
exit $status
