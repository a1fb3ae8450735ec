"""The reproduction study's machinery: models as presets plus overrides, trained and scored
over seeds, results as JSON, claims answered from them (used by the claim scripts and
`collect.py`; see README.md here).

Every configuration is a preset and `--section.field` overrides, nothing else. A run trains
with `allattn train` semantics, keeps the checkpoint that is best on validation, and is scored
once on the test split; nothing is chosen by looking at the test split. Results go to
results/runs/CONFIG/seedK.json; a result already there is kept, so an interrupted study
continues where it stopped and configurations shared by several claims train once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from allattn import evaluate, train
from allattn.config import RunConfig, load_preset
from allattn.evaluate import EvalConfig
from allattn.metrics import MetricsLog
from allattn.model import parameter_count

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("REPRODUCTION_RESULTS", HERE / "results"))
"""Where results go (the environment variable moves them, as the tests do)."""
SEEDS = (0, 1, 2)

# The study's scale: the tiny preset (4 layers, d 128, 4 heads, N 128, S 256) on the bundled
# tiny-shakespeare, in float32. --quick: the same models, few steps (a check of the machinery,
# not a result).
FULL_STEPS = {"train.steps": "2400", "train.eval_interval": "400"}
QUICK_STEPS = {"train.steps": "40", "train.eval_interval": "20"}


@dataclass(frozen=True)
class Model:
    """A configuration of the study: a preset with overrides."""

    name: str
    label: str
    preset: str = "tiny"
    overrides: dict[str, str] = field(default_factory=dict)

    def config(self, seed: int, steps: dict[str, str], data: str) -> RunConfig:
        values = {**self.overrides, **steps, "train.seed": str(seed)}
        if data:
            values["train.data"] = data
        return load_preset(self.preset).override(values)


# The models the claims compare (the tiny preset's sizes; DESIGN §2.9).
N = 128  # tiny's persistent vectors per head, and its FF twin's d_inner
JOINT = Model("joint", "all-attention (joint softmax)")
FF = Model("ff", "transformer (FF ReLU)", "tiny_ff")
NO_MEMORY = Model(
    "no_memory", "attention only (N = 0, no FF)", overrides={"model.n_persistent": "0"}
)
N_SWEEP = {
    0: NO_MEMORY,
    32: Model("n32", "N = 32", overrides={"model.n_persistent": "32"}),
    N: JOINT,
    512: Model("n512", "N = 512", overrides={"model.n_persistent": "512"}),
}
ATTN_SPLIT = Model("attn_split", "attn-split", overrides={"model.memory_mode": "attn_split"})
HEAD_SPLIT = Model("head_split", "head-split", overrides={"model.memory_mode": "head_split"})
SINGLE_HEAD = Model("single_head", "single-head", overrides={"model.memory_mode": "single_head"})
FF_ATTN = Model("ff_attn", "FF-attn (softmax FF)", "tiny_ff", {"model.ff_activation": "softmax"})


def result_path(model: Model, seed: int, quick: bool) -> Path:
    return RESULTS / ("quick" if quick else "full") / "runs" / model.name / f"seed{seed}.json"


def run_model(model: Model, seed: int, *, quick: bool, data: str, work: Path) -> dict:
    """Train `model` with `seed`, score its best-on-validation checkpoint on the test split;
    the result (kept if already there)."""
    path = result_path(model, seed, quick)
    if path.is_file():
        return json.loads(path.read_text())
    config = model.config(seed, QUICK_STEPS if quick else FULL_STEPS, data)
    run_dir = work / model.name / f"seed{seed}"
    start = time.perf_counter()
    trained = train.run(config, run_dir, overwrite=True, progress=False)
    train_s = time.perf_counter() - start
    test = evaluate.run(EvalConfig(checkpoint=str(run_dir), split="test"))
    records = MetricsLog(run_dir).records()
    result = {
        "model": model.name,
        "label": model.label,
        "preset": model.preset,
        "overrides": model.overrides,
        "seed": seed,
        "steps": trained.step,
        "parameters": parameter_count(load_preset(str(run_dir / "config.toml")).model),
        "test": test.to_dict(),
        "test_value": test.value,
        "measure": test.measure.key,
        "best_valid": min(r["valid_loss"] for r in records),
        "final_spans": records[-1].get("spans", []),
        "records": records,
        "train_seconds": train_s,
        "config": config.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    figure_run = path.parent / f"seed{seed}_run"  # metrics kept for the plots
    figure_run.mkdir(exist_ok=True)
    shutil.copy(run_dir / train.METRICS, figure_run / train.METRICS)
    return result


def summary(results: list[dict]) -> dict:
    """Mean and standard deviation (sample, n - 1) of the test results over seeds."""
    values = [r["test_value"] for r in results]
    return {
        "model": results[0]["model"],
        "label": results[0]["label"],
        "parameters": results[0]["parameters"],
        "n_persistent": results[0]["config"]["model"]["n_persistent"],
        "steps": results[0]["steps"],
        "seeds": [r["seed"] for r in results],
        "values": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "measure": results[0]["measure"],
        "train_seconds": sum(r["train_seconds"] for r in results),
    }


def run_claim(claim: str, models: list[Model], argv: list[str] | None = None) -> dict:
    """Train every model of a claim over the seeds; write results/MODE/CLAIM.json."""
    parser = argparse.ArgumentParser(description=f"reproduction: {claim}")
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the study")
    parser.add_argument("--data", default="", help="prepared corpus (default: tiny-shakespeare)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated")
    parser.add_argument("--work", default="", help="run directories (default: a temporary one)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 3 and not args.quick:
        parser.error("a claim needs at least 3 seeds")
    work = Path(args.work) if args.work else RESULTS / "work"
    summaries = []
    for model in models:
        runs = []
        for seed in seeds:
            print(f"{claim}: {model.name} seed {seed}", file=sys.stderr, flush=True)
            runs.append(run_model(model, seed, quick=args.quick, data=args.data, work=work))
        summaries.append(summary(runs))
    out = RESULTS / ("quick" if args.quick else "full") / f"{claim}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"claim": claim, "data": args.data or "tiny-shakespeare (bundled)",
              "quick": args.quick, "models": summaries}  # fmt: skip
    out.write_text(json.dumps(report, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report
