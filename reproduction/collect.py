"""Write the study's report from results/MODE/claim*.json: docs/REPRODUCTION.md and the
figures in docs/figures/ (with --quick: results/quick/REPRODUCTION.md and its figures, which
check the machinery and are not results).

Each claim's verdict follows a rule fixed before any result was seen (lower is better, in bits
or perplexity; SE = the standard error of a difference of two means over seeds,
sqrt(s1^2/n1 + s2^2/n2)):
  claim 1 holds if the all-attention mean is below the transformer's or above it by at most
          2 SE;
  claim 2 holds if the attention-only mean is above both others' by more than 2 SE;
  claim 3 holds if the mean improves at every step of N, and partly if the largest N beats
          N = 0 by more than 2 SE;
  claim 4 holds if the joint mean is below every other variant's by more than 2 SE, is
          unresolved if it is below all of them but not by 2 SE each, and fails otherwise.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import sys
from pathlib import Path

from study import RESULTS

from allattn import plot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLAIMS = {
    "claim1": "At equal parameters the all-attention network matches the transformer",
    "claim2": "Without persistent vectors (N = 0, FF removed) the network performs poorly",
    "claim3": "More persistent vectors help (Fig. 2, left)",
    "claim4": "A joint softmax beats the other ways of integrating persistent vectors "
    "(Fig. 2, right)",
}


def description(claim: str) -> str:
    """The claim script's docstring (what it compares, and how the parameters compare), as
    one paragraph."""
    script = next(HERE.glob(f"{claim}_*.py"))
    text = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(text.split()) + f" (`reproduction/{script.name}`)"


def se(a: dict, b: dict) -> float:
    return math.sqrt(a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"]))


def verdict(claim: str, models: list[dict]) -> str:
    by = {m["model"]: m for m in models}
    if claim == "claim1":
        joint, ff = by["joint"], by["ff"]
        gap = joint["mean"] - ff["mean"]
        ok = gap <= 2 * se(joint, ff)
        return (f"{'holds' if ok else 'does not hold'}: all-attention minus transformer = "
                f"{gap:+.4f} (2 SE = {2 * se(joint, ff):.4f})")  # fmt: skip
    if claim == "claim2":
        ablation = by["no_memory"]
        gaps = [(o["label"], ablation["mean"] - o["mean"], 2 * se(ablation, o))
                for o in models if o is not ablation]  # fmt: skip
        ok = all(g > t for _, g, t in gaps)
        detail = "; ".join(f"worse than {name} by {g:+.4f} (2 SE {t:.4f})" for name, g, t in gaps)
        return f"{'holds' if ok else 'does not hold'}: attention only is {detail}"
    if claim == "claim3":
        means = [m["mean"] for m in models]
        monotone = all(b < a for a, b in itertools.pairwise(means))
        first, last = models[0], models[-1]
        gain = first["mean"] - last["mean"]
        if monotone:
            state = "holds"
        elif gain > 2 * se(first, last):
            state = "holds partly (not at every step of N)"
        else:
            state = "does not hold"
        listed = ", ".join(f"{m['label']} {m['mean']:.4f}" for m in models)
        threshold = 2 * se(first, last)
        return f"{state}: {listed}; largest N against N = 0: {gain:+.4f} (2 SE {threshold:.4f})"
    joint = by["joint"]
    others = [m for m in models if m is not joint]
    gaps = [(m["label"], m["mean"] - joint["mean"], 2 * se(joint, m)) for m in others]
    if all(g > t for _, g, t in gaps):
        state = "holds"
    elif all(g > 0 for _, g, _ in gaps):
        state = "unresolved at this scale (joint is best, but not by 2 SE against every variant)"
    else:
        state = "does not hold"
    detail = "; ".join(f"{name} {g:+.4f} (2 SE {t:.4f})" for name, g, t in gaps)
    return f"{state}: each variant minus joint: {detail}"


def table(models: list[dict], unit: str) -> list[str]:
    lines = [f"| model | parameters | steps | seeds | test {unit} (mean ± std) | per seed |",
             "|---|---:|---:|---|---|---|"]  # fmt: skip
    for m in models:
        per_seed = ", ".join(f"{v:.4f}" for v in m["values"])
        seeds = ",".join(map(str, m["seeds"]))
        lines.append(f"| {m['label']} | {m['parameters']:,} | {m['steps']:,} | {seeds} | "
                     f"{m['mean']:.4f} ± {m['std']:.4f} | {per_seed} |")  # fmt: skip
    return lines


def spans_table(runs: list[dict], order: list[str]) -> list[str]:
    """Do the spans move? Each model's learned spans z·S over heads, layers and seeds at the
    first and the last validation."""
    by_model: dict[str, list[dict]] = {name: [] for name in order}
    for run in runs:
        by_model.setdefault(run["model"], []).append(run)
    lines = ["## Do the spans move?", "",
             "Each head's learned span z·S (tokens; the soft mask reaches R = 32 further), over "
             "all heads, layers and seeds, at the first validation and at the last:", "",
             "| model | first: mean | first: max | last: mean | last: max |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for model_runs in by_model.values():
        cells = []
        for index in (0, -1):
            spans = [s for r in model_runs for layer in r["records"][index].get("spans", [])
                     for s in layer]  # fmt: skip
            if not spans:  # no runs, or no adaptive span
                break
            cells += [f"{sum(spans) / len(spans):.1f}", f"{max(spans):.1f}"]
        if cells:
            lines.append(f"| {model_runs[0]['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the reproduction report")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=0.0, help="the study's wall-clock time")
    parser.add_argument("--machine", default="", help="what ran it")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    source = RESULTS / mode
    if args.quick:
        report, figures = source / "REPRODUCTION.md", source / "figures"
    else:
        report, figures = ROOT / "docs" / "REPRODUCTION.md", ROOT / "docs" / "figures"
    claims = {c: json.loads((source / f"{c}.json").read_text())
              for c in CLAIMS if (source / f"{c}.json").is_file()}  # fmt: skip
    if not claims:
        print(f"collect: no results in {source} (run the claim scripts first)", file=sys.stderr)
        return 2
    runs = [json.loads(p.read_text()) for p in sorted(source.glob("runs/*/seed*.json"))]
    first = next(iter(claims.values()))
    unit = first["models"][0]["measure"]
    name = {"bpc": "bits per character", "bpb": "bits per byte", "ppl": "perplexity"}[unit]
    lines = ["# Reproducing the paper's claims at CPU scale", ""]
    if args.quick:
        lines += ["**Quick mode: a few steps per run. This checks the study's machinery; the "
                  "numbers below are not results.**", ""]  # fmt: skip
    lines += [
        "Generated by `bash reproduction/run_all.sh` (`python reproduction/collect.py`) from "
        f"`reproduction/results/{mode}/`; do not edit by hand.",
        "",
        f"- Corpus: {first['data']}; results are test-split {name} of the checkpoint that "
        "was best on validation (lower is better). No setting was chosen by looking at "
        "the test split.",
        "- Models: the `tiny` preset (4 layers, d 128, 4 heads, N 128, span 256, block 64, "
        "batch 16, Adagrad with the paper's clipping), changed only by the overrides named in "
        "`reproduction/study.py`; every compared model trains the same steps with the same "
        "seeds, in float32: bfloat16 is no faster at this size on the development machine "
        "(`allattn bench train-step --preset tiny --runtime.precision fp32|bf16`, two rounds: "
        "17,232 and 16,739 tokens/s in float32, 18,251 and 14,695 in bfloat16).",
        f"- Machine: {args.machine or 'not stated'}. Training all {len(runs)} runs took "
        f"{sum(r['train_seconds'] for r in runs) / 60:.1f} minutes; the last call of "
        f"run_all.sh took {args.seconds / 60:.1f} minutes (finished runs are kept, not redone).",
        "- Verdict rules (fixed before the runs): see `reproduction/collect.py`. SE is the "
        "standard error of a difference of two means over seeds.",
        "",
    ]
    figures.mkdir(parents=True, exist_ok=True)
    ylabel = f"test {name}\n(mean ± std over seeds)"
    rel = Path("figures")
    low, high = min(r["parameters"] for r in runs), max(r["parameters"] for r in runs)
    train = runs[0]["config"]["train"]
    seen = runs[0]["steps"] * train["batch_size"] * train["block_size"]
    lines += [
        "## Summary",
        "",
        "The paper's claims were made for 38M-114M-parameter models trained for 200k-450k steps "
        f"on 100M characters; here the models have {low / 1e6:.2f}M-{high / 1e6:.2f}M "
        f"parameters and each sees {seen / 1e6:.2f}M tokens. A claim that fails here is not "
        "refuted at the paper's scale, and one that holds here is not confirmed there.",
        "",
    ]
    for claim, data in claims.items():
        state = verdict(claim, data["models"]).split(":")[0]
        text = CLAIMS[claim][0].lower() + CLAIMS[claim][1:]
        lines.append(f"- Claim {claim[-1]}, {text}: **{state}**.")
    lines.append("")
    for claim, data in claims.items():
        models = data["models"]
        lines += [f"## {claim[-1]}. {CLAIMS[claim]}", "", description(claim), ""]
        lines += [*table(models, unit), ""]
        lines += [f"**Verdict at this scale: {verdict(claim, models)}.**", ""]
        results = [plot.Result(m["label"], m["mean"], m["std"], len(m["values"])) for m in models]
        out = figures / f"{claim}.png"
        if claim == "claim3":
            plot.sweep([m["n_persistent"] for m in models], results, out, title=CLAIMS[claim],
                       xlabel="persistent vectors per head (N)", ylabel=ylabel)  # fmt: skip
        else:
            plot.bars(results, out, title=CLAIMS[claim], ylabel=ylabel)
        lines += [f"![{claim}]({rel / out.name})", ""]
    order = [m["model"] for data in claims.values() for m in data["models"]]
    lines += spans_table(runs, list(dict.fromkeys(order)))
    runs_shown = [
        ("joint", "all-attention"),
        ("ff", "transformer"),
        ("no_memory", "attention only"),
    ]
    shown = [(source / "runs" / m / "seed0_run", label) for m, label in runs_shown]
    curves = [plot.read_run(path, label) for path, label in shown if path.is_dir()]
    if curves:
        plot.learning_curves(curves, figures / "curves.png")
        lines += ["## Learning curves and spans (seed 0)", "",
                  "The learning curves, and each head's learned span z·S at every validation:", "",
                  f"![curves]({rel / 'curves.png'})", ""]  # fmt: skip
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
