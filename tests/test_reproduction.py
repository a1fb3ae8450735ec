"""The reproduction study: its verdict rules, and (slow) the whole study in --quick mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "reproduction"))

import collect  # noqa: E402


def model(name: str, values: list[float], label: str | None = None) -> dict:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {"model": name, "label": label or name, "values": values, "mean": mean, "std": std}


def test_verdicts_follow_the_stated_rules():
    joint = model("joint", [2.00, 2.01, 2.02])
    assert collect.verdict("claim1", [joint, model("ff", [2.00, 2.01, 2.02])]).startswith("holds")
    worse = model("ff", [1.80, 1.81, 1.82])  # the transformer clearly better
    assert collect.verdict("claim1", [joint, worse]).startswith("does not hold")
    ablation = model("no_memory", [2.30, 2.31, 2.32])
    assert collect.verdict("claim2", [ablation, joint, worse]).startswith("holds")
    sweep = [model(f"n{i}", [v, v + 0.01, v + 0.02]) for i, v in enumerate((2.3, 2.2, 2.1))]
    assert collect.verdict("claim3", sweep).startswith("holds")
    sweep[1] = model("n1", [2.35, 2.36, 2.37])
    assert collect.verdict("claim3", sweep).startswith("holds partly")
    close = model("attn_split", [2.01, 2.02, 2.04])
    assert collect.verdict("claim4", [joint, close]).startswith("unresolved")
    assert collect.verdict("claim4", [joint, ablation]).startswith("holds")
    assert collect.verdict("claim4", [joint, worse]).startswith("does not hold")


@pytest.mark.slow
def test_the_quick_study_writes_its_report_and_figures(tmp_path):
    env = {**os.environ, "REPRODUCTION_RESULTS": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "reproduction" / "run_all.sh"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "quick" / "REPRODUCTION.md").read_text()
    for claim in range(1, 5):
        assert f"## {claim}." in report
        assert (tmp_path / "quick" / "figures" / f"claim{claim}.png").is_file()
    assert "Verdict at this scale" in report and "not results" in report
    assert len(list((tmp_path / "quick" / "runs").glob("*/seed*.json"))) == 27  # 9 models x 3
