#!/usr/bin/env bash
# GPU checks for a machine with CUDA and torch but possibly no pytest and no network:
# the model on CUDA (float32) equals the float64 CPU model, and bf16 autocast trains.
# Run from the repository root: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())"
python3 tests/test_gpu.py
