"""Data-parallel scaling on one machine: 1 process × T threads against T processes × 1 thread.

    .venv/bin/python benchmarks/ddp_scaling.py [--threads 2] [--rounds 2] [--steps 30]
        [--out benchmarks/results/ddp_scaling.json]

Both train the same mid-size model (4 layers, d 256, N 256, span 512, M 256, global batch 8)
on the bundled corpus with the same global batch: `allattn train` in one process with
OMP_NUM_THREADS=T, and `torchrun --nproc_per_node T` (gloo on the CPU) with one thread per
process. The two alternate for `--rounds` rounds; each run's tokens/s is that of its last
validation interval (steady state: start-up, the first interval and checkpoint writes are
outside it; the interval's validation reads are inside it, as in any training run). Prints the
table and writes JSON. Run it alone on the machine: the variants share its cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MODEL = [
    "--preset", "tiny", "--model.n_layers", "4", "--model.d_model", "256",
    "--model.n_heads", "4", "--model.n_persistent", "256", "--model.attn_span", "512",
    "--model.span_init", "1.0", "--train.block_size", "256", "--train.batch_size", "8",
    "--train.eval_batch_size", "8", "--runtime.device", "cpu",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run: Path, processes: int, threads: int, steps: int) -> dict:
    """One training run; its last interval's record from metrics.jsonl."""
    argv = [*MODEL, "--out", str(run), "--force", "--quiet"]
    argv += ["--train.steps", str(steps), "--train.eval_interval", str(steps // 3)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launch = [sys.executable, "-m", "allattn"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
        launch += [str(processes), "--master_port", str(free_port()), "-m", "allattn"]
    subprocess.run([*launch, "train", *argv], env=env, check=True)
    records = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(records[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="cores to use (T)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="steps per run (3 intervals)")
    parser.add_argument("--out", default="benchmarks/results/ddp_scaling.json")
    args = parser.parse_args()
    t = args.threads
    variants = {f"1 process × {t} threads": (1, t), f"{t} processes × 1 thread": (t, 1)}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (processes, threads) in variants.items():
                record = train(Path(tmp) / "run", processes, threads, args.steps)
                rates[name].append(record["tokens_per_s"])
                losses[name].append(record["train_loss"])
    base = statistics.median(rates[next(iter(variants))])
    rows = []
    print(f"{'configuration':<26} {'tokens/s (median)':>18} {'runs':>22} {'ratio':>7}")
    for name, values in rates.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"{name:<26} {median:>18,.0f} {runs:>22} {median / base:>6.2f}x")
        rows.append(
            {"configuration": name, "tokens_per_s": values, "median": median,
             "ratio": median / base, "final_train_loss": losses[name]}
        )  # fmt: skip
    result = {
        "benchmark": "ddp_scaling",
        "model": MODEL,
        "steps": args.steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
