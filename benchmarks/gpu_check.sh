#!/usr/bin/env bash
# GPU checks for a machine with CUDA and torch but possibly no pytest and no network.
# Run from anywhere: bash benchmarks/gpu_check.sh   (well under 10 minutes on one H100)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())"
python3 tests/test_gpu.py          # float32 model on CUDA == float64 on the CPU; bf16 autocast runs
python3 benchmarks/gpu_check.py    # chunked == reference on CUDA; enwik8_small bf16 step, MFU
# data parallel: a reduced enwik8_small under torchrun (NCCL, one process per GPU) against one
# process with the same global batch (one GPU: the launch is checked, not NCCL)
python3 benchmarks/ddp_check.py --device cuda --nproc "$(python3 -c 'import torch; print(torch.cuda.device_count())')"
