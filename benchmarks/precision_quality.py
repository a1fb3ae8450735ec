"""Training quality at reduced precision: `tiny` on the bundled corpus in fp32 and in bf16.

    .venv/bin/python benchmarks/precision_quality.py [--seeds 0,1,2]
        [--variants fp32,bf16,fp32/reference] [--out benchmarks/results/precision_quality.json]

For each seed, trains the `tiny` preset once per variant (same seed: same initial weights and
batches), evaluates the best checkpoint on the test split at float32 (so that only training
differs), and prints a table of test bits per character, the largest difference from the first
variant at the same seed, the mean over seeds, whether any logged loss was non-finite, and the
spans at the end. A variant is a precision, optionally with a kernel after a slash:
`fp32/reference` is float32 with the dense kernel, which computes the same function as the
chunked one and differs only in rounding, so its distance from `fp32` is the noise floor of a
same-seed comparison (how far two runs drift apart from rounding alone). The runs take about
four minutes each on a 2-core CPU; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def allattn(*argv: str) -> str:
    command = [sys.executable, "-m", "allattn", *argv]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def train_and_test(run: Path, variant: str, seed: int, extra: list[str]) -> dict:
    """One `tiny` run; its test bpc (best checkpoint, float32), final spans, finiteness."""
    precision, _, kernel = variant.partition("/")
    allattn("train", "--preset", "tiny", "--out", str(run), "--force", "--quiet",
            "--train.seed", str(seed), "--runtime.precision", precision,
            "--runtime.attn_impl", kernel or "auto", *extra)  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r[k] for r in records for k in ("train_loss", "valid_loss") if k in r]
    test = ["--split", "test", "--select", "best", "--runtime.precision", "fp32", "--json"]
    report = json.loads(allattn("eval", "--checkpoint", str(run), *test))
    last = records[-1]
    return {
        "test_bpc": report["bpc"],
        "best_valid_bpc": min(r["valid_bpc"] for r in records if "valid_bpc" in r),
        "finite": all(math.isfinite(x) for x in losses),
        "span_avg": last.get("span_avg"),
        "span_max": last.get("span_max"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds")
    parser.add_argument(
        "--variants", default="fp32,bf16,fp32/reference", help="the first is the baseline"
    )
    parser.add_argument("--out", default="benchmarks/results/precision_quality.json")
    parser.add_argument("extra", nargs="*", help="more `allattn train` flags (after --)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    runs: dict[str, dict[int, dict]] = {p: {} for p in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for variant in variants:
                result = train_and_test(Path(tmp) / "run", variant, seed, args.extra)
                runs[variant][seed] = result
                print(f"seed {seed} {variant}: test {result['test_bpc']:.4f} bpc", flush=True)
    base = variants[0]
    header = f"{'variant':<15} " + " ".join(f"{'seed ' + str(s):>9}" for s in seeds)
    print(header + f" {'mean':>8} {'max |diff|':>11} {'finite':>7} {'spans (avg/max)':>16}")
    rows = []
    for variant in variants:
        bpcs = [runs[variant][s]["test_bpc"] for s in seeds]
        diffs = [abs(b - runs[base][s]["test_bpc"]) for b, s in zip(bpcs, seeds, strict=True)]
        ends = [runs[variant][s] for s in seeds]
        spans = "; ".join(f"{r['span_avg']}/{r['span_max']}" for r in ends)
        finite = all(r["finite"] for r in ends)
        cells = " ".join(f"{b:9.4f}" for b in bpcs)
        mean = statistics.mean(bpcs)
        print(f"{variant:<15} {cells} {mean:8.4f} {max(diffs):11.4f} {finite!s:>7} {spans:>16}")
        row = {"variant": variant, "runs": runs[variant], "mean_test_bpc": mean}
        rows.append(row | {"max_abs_diff": max(diffs)})
    result = {
        "benchmark": "precision_quality",
        "preset": "tiny",
        "extra": args.extra,
        "seeds": seeds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
