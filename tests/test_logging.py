"""metrics.jsonl records each head's span; --train.tensorboard writes the same scalars."""

from __future__ import annotations

import json

import pytest
from test_train import data_dir, small_config  # noqa: F401  (data_dir is a fixture)

from allattn import train
from allattn.config import ConfigError


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard events in `directory`, by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_records_hold_every_head_s_span(tmp_path, data_dir):  # noqa: F811
    train.run(small_config(data_dir), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / train.METRICS).open()]
    for record in records:
        spans = record["spans"]
        assert len(spans) == 2 and all(len(heads) == 2 for heads in spans)  # layers x heads
        assert all(0 <= s <= 80 for heads in spans for s in heads)
    assert records[0]["spans"] != records[-1]["spans"]  # they move in training


def test_tensorboard_holds_the_metrics_scalars_and_resume_purges(tmp_path, data_dir):  # noqa: F811
    run = tmp_path / "run"
    train.run(small_config(data_dir, steps=8, tensorboard=True), run, progress=False)
    train.run(small_config(data_dir, tensorboard=True), run, resume=True, progress=False)
    records = [json.loads(line) for line in (run / train.METRICS).open()]
    found = scalars(run / "tensorboard")
    for key in ("train_loss", "valid_loss", "valid_bpc", "lr", "span_avg", "tokens_per_s"):
        expected = [(r["step"], r[key]) for r in records]
        assert [s for s, _ in found[key]] == [4, 8, 12], key
        assert [v for _, v in found[key]] == pytest.approx([v for _, v in expected], rel=1e-6)
    head = found["spans/layer_1/head_0"]
    assert [v for _, v in head] == pytest.approx([r["spans"][1][0] for r in records], rel=1e-6)


def test_a_resume_from_an_earlier_step_drops_later_events(tmp_path, data_dir):  # noqa: F811
    import shutil

    run = tmp_path / "run"
    train.run(small_config(data_dir, steps=4, tensorboard=True), run, progress=False)
    shutil.copy(run / train.LAST, tmp_path / "step4.safetensors")
    train.run(small_config(data_dir, steps=8, tensorboard=True), run, resume=True, progress=False)
    # as if the process had died after step 8's record but before its checkpoint
    shutil.copy(tmp_path / "step4.safetensors", run / train.LAST)
    train.run(small_config(data_dir, steps=8, tensorboard=True), run, resume=True, progress=False)
    assert [s for s, _ in scalars(run / "tensorboard")["valid_loss"]] == [4, 8]


def test_tensorboard_missing_is_one_line(tmp_path, data_dir, hide_package):  # noqa: F811
    hide_package("tensorboard")
    with pytest.raises(ConfigError, match=r"--train.tensorboard needs the tensorboard package"):
        train.run(small_config(data_dir, tensorboard=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
