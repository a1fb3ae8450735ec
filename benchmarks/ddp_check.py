"""A short data-parallel training under torchrun against the same training in one process.

    PYTHONPATH=src python3 benchmarks/ddp_check.py --device cuda --nproc 8   # NCCL, 8 GPUs
    .venv/bin/python benchmarks/ddp_check.py --device cpu --nproc 2          # gloo, 2 processes

The model is `enwik8_small` reduced to fit a short check (4 layers, span 1024, M 256, global
batch 16, the bundled corpus): `allattn train` in one process, then `torchrun --nproc_per_node
K` on the same global batch (B/K streams per process; NCCL with one GPU per process on CUDA,
gloo on the CPU). Prints one JSON line per run and one with the largest per-tensor relative
weight difference; exits non-zero if it exceeds --tolerance (float32 sums of K partial
gradients round differently from one sum, and CUDA kernels are not bitwise deterministic).
With one GPU the torchrun launch is a single process: it checks the launch, not NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from allattn import checkpoint

REDUCED = [
    "--preset", "enwik8_small", "--data", "", "--model.n_layers", "4", "--model.attn_span", "1024",
    "--model.dropout", "0", "--train.block_size", "256", "--train.batch_size", "16",
    "--train.eval_batch_size", "16", "--optim.warmup_steps", "10",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run: Path, nproc: int, device: str, steps: int, torchrun: bool) -> dict:
    argv = [*REDUCED, "--runtime.device", device, "--out", str(run), "--quiet", "--force"]
    argv += ["--train.steps", str(steps), "--train.eval_interval", str(steps // 2)]
    launch = [sys.executable, "-m", "allattn"]
    env = dict(os.environ)
    if torchrun:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launch += ["--master_port", str(free_port()), "-m", "allattn"]
        env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run([*launch, "train", *argv], env=env, check=True)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return {"processes": nproc, "device": device, **last}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--nproc", type=int, required=True, help="processes (GPUs) of the job")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        for run, nproc, torchrun in ((one, 1, False), (many, args.nproc, True)):
            print(json.dumps(train(run, nproc, args.device, args.steps, torchrun)), flush=True)
        a, b = (checkpoint.load(r / "last.safetensors").weights for r in (many, one))
    relative = max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)
    ok = relative <= args.tolerance
    print(json.dumps({"check": "ddp_equals_one_process", "relative": relative, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
