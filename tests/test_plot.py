"""`allattn plot`: learning curves and spans of finished and running runs; study charts."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train import data_dir, small_config  # noqa: F401  (data_dir is a fixture)

from allattn import plot, train
from allattn.cli import main

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path, data_dir):  # noqa: F811
    train.run(small_config(data_dir), tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_a_finished_run_and_several_overlaid(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    out = tmp_path / "figs" / "curves.png"
    assert main(["plot", str(run_dir), str(other), "--out", str(out), "--labels", "a,b"]) == 0
    assert out.read_bytes().startswith(PNG)
    assert f"wrote {out}" in capsys.readouterr().out
    curves = plot.read_run(run_dir)
    assert curves.key == "bpc" and curves.steps == [4, 8, 12]
    assert len(curves.spans) == 3 and len(curves.spans[0]) == 2  # records x layers


def test_a_run_in_progress_skips_its_torn_last_line(run_dir, tmp_path, caplog):
    metrics = run_dir / train.METRICS
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 30])  # a writer cut off mid-line
    out = tmp_path / "curves.svg"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    assert "skipped a truncated last line" in caplog.text
    assert plot.read_run(run_dir).steps == [4, 8]


def test_clock_of_a_resumed_run_keeps_counting(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": s, "train_bpc": 2.0, "valid_bpc": 2.0, "elapsed_s": e}
        for s, e in ((1, 60.0), (2, 120.0), (3, 30.0))
    ]
    (run / train.METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.read_run(run).minutes == [1.0, 2.0, 2.5]


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "no such run directory"),
        (lambda d: d.mkdir(), "no metrics.jsonl (no validation has run yet)"),
        (lambda d: (d.mkdir(), (d / train.METRICS).write_text("")), "no records yet"),
        (
            lambda d: (d.mkdir(), (d / train.METRICS).write_text("{oops\n")),
            "line 1 is not a metrics record",
        ),
    ],
)
def test_bad_run_directories_are_one_line(tmp_path, capsys, setup, message):
    bad = tmp_path / "bad"
    setup(bad)
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "x.png").exists()


def test_bad_options_are_one_line(run_dir, tmp_path, capsys):
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png, .pdf or .svg" in capsys.readouterr().err
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "x.png"), "--labels", "a,b"]) == 2
    assert "--labels gives 2 labels for 1 runs" in capsys.readouterr().err


def test_study_charts(tmp_path):
    results = [plot.Result("joint", 2.1, 0.02, 3), plot.Result("attn-split", 2.2, 0.03, 3)]
    assert plot.bars(results, tmp_path / "b.png", title="t", ylabel="bpc").read_bytes()[:8] == PNG
    out = plot.sweep([0, 8, 32], [*results, results[0]], tmp_path / "s.png", title="t",
                     xlabel="N", ylabel="bpc")  # fmt: skip
    assert out.read_bytes().startswith(PNG)


def test_matplotlib_missing_is_one_line(run_dir, tmp_path, hide_package, capsys):
    hide_package("matplotlib")
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "allattn plot needs matplotlib: pip install 'allattn[plot]'" in capsys.readouterr().err
