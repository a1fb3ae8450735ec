"""Training follows DESIGN §3: streams, wrap-around, batch_split, clamp; resume is exact."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from allattn import AllAttentionLM, checkpoint, train
from allattn.config import ConfigError, ModelConfig, OptimConfig, RunConfig, TrainConfig
from allattn.data import char_corpus

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 12  # 540 characters


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    char_corpus(TEXT, (0.6, 0.2, 0.2), {"name": "test"}).save(path)
    return str(path)


def small_config(data: str, **train_changes) -> RunConfig:
    train_values = (
        dict(data=data, batch_size=4, block_size=8, steps=12, eval_interval=4, seed=3)
        | train_changes
    )
    return RunConfig(
        model=ModelConfig(
            vocab_size=1,  # taken from the data
            d_model=16,
            n_heads=2,
            n_layers=2,
            n_persistent=4,
            attn_span=80,
            span_ramp=4,
            span_init=0.2,
            span_loss_coef=0.01,
            dropout=0.2,
            emb_dropout=0.1,
        ),
        optim=OptimConfig(optimizer="adagrad", lr=0.05, warmup_steps=3, grad_clip=0.03),
        train=TrainConfig(**train_values),
    )


def weights(run_dir, name=train.LAST):
    return checkpoint.load(run_dir / name).weights


def test_streams_wrap_at_a_random_offset_and_every_block_is_full():
    tokens = np.arange(4 * 50).reshape(4, 50)
    streams = train.Streams(tokens, block_size=8, seed=0, split="train")
    seen_offsets = set()
    for _ in range(40):
        start = streams.pos
        x, y, wrapped = streams.next_block()
        assert x.shape == y.shape == (4, 8)
        assert torch.equal(y, x + 1) and x[0, 0].item() == start  # Y = X shifted by one
        if wrapped:
            assert 0 <= streams.pos < 8
            seen_offsets.add(streams.pos)
        else:
            assert streams.pos == start + 8 and streams.pos < 50 - 8
    assert len(seen_offsets) > 1  # offsets are drawn, not fixed


def test_exact_resume_is_bitwise(tmp_path, data_dir):
    config = small_config(data_dir)
    straight = tmp_path / "straight"
    train.run(config, straight, progress=False)

    split = tmp_path / "split"
    train.run(small_config(data_dir, steps=8), split, progress=False)  # stops at 8
    train.run(config, split, resume=True, progress=False)  # 8 -> 12

    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = checkpoint.load(straight / train.LAST).state
    state_b = checkpoint.load(split / train.LAST).state
    assert state_a["train_streams"]["pos"] == state_b["train_streams"]["pos"]
    for x, y in zip(
        state_a["train_cache"] + state_a["valid_cache"],
        state_b["train_cache"] + state_b["valid_cache"],
        strict=True,
    ):
        assert torch.equal(x, y)
    metrics_a = (straight / train.METRICS).read_text().splitlines()
    metrics_b = (split / train.METRICS).read_text().splitlines()
    strip = [
        lambda r: {k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "elapsed_s")}
    ][0]
    assert [strip(r) for r in metrics_a] == [strip(r) for r in metrics_b]
    assert [json.loads(r)["step"] for r in metrics_a] == [4, 8, 12]


def test_the_run_wraps_around_within_the_test(data_dir):
    corpus = train.load_corpus(data_dir)
    length = corpus.streams("train", 4).shape[1]
    assert length < 12 * 8  # 12 steps of 8 tokens pass the end of the streams at least once
    valid_length = corpus.streams("valid", 4).shape[1]
    assert valid_length < 3 * 8 + 8  # so do three validations of one block each


def test_original_resume_restarts_the_data(tmp_path, data_dir):
    straight = tmp_path / "straight"
    train.run(small_config(data_dir), straight, progress=False)
    split = tmp_path / "split"
    train.run(small_config(data_dir, steps=8, exact_resume=False), split, progress=False)
    train.run(small_config(data_dir, exact_resume=False), split, resume=True, progress=False)
    state = checkpoint.load(split / train.LAST).state
    assert state["step"] == 12
    a, b = weights(straight), weights(split)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_batch_split_gives_the_same_gradients_loss_and_caches():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=11,
        d_model=16,
        n_heads=2,
        n_layers=2,
        n_persistent=4,
        attn_span=80,
        span_ramp=4,
        span_init=0.3,
        span_loss_coef=0.01,
    )
    model = AllAttentionLM(config).double()
    seq = torch.randint(0, 11, (4, 9))
    cache = [torch.randn(4, c, 16, dtype=torch.float64) for c in model.cache_sizes()]
    results = []
    for k in (1, 2, 4):
        model.zero_grad()
        loss, new_cache = train.run_block(
            model, seq[:, :-1], seq[:, 1:], cache, k, contextlib.nullcontext(), backward=True
        )
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss, new_cache, grads))
    loss, new_cache, grads = results[0]
    for other_loss, other_cache, other_grads in results[1:]:
        assert other_loss == pytest.approx(loss, rel=1e-12)
        for a, b in zip(new_cache, other_cache, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for name in grads:  # the span term counts once, not once per slice
            torch.testing.assert_close(other_grads[name], grads[name], rtol=0, atol=1e-12)


def test_spans_are_clamped_and_loss_decreases(tmp_path, data_dir):
    config = small_config(data_dir, steps=40, eval_interval=20)
    config = config.replace(
        model=config.model.replace(span_loss_coef=5.0),  # pushes z below 0 without the clamp
        optim=config.optim.replace(optimizer="adam", lr=0.01, grad_clip=1.0),
    )
    train.run(config, tmp_path / "r", progress=False)
    ckpt = checkpoint.load(tmp_path / "r" / train.LAST)
    for name, tensor in ckpt.weights.items():
        if name.endswith("span.z"):
            assert tensor.min() >= 0 and tensor.max() <= 1
    records = [json.loads(r) for r in (tmp_path / "r" / train.METRICS).read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[0]["train_loss"] < math.log(ckpt.config.vocab_size) + 0.5
    assert {"step", "train_bpc", "valid_bpc", "lr", "span_avg", "span_max", "tokens_per_s"} <= set(
        records[0]
    )
    assert (tmp_path / "r" / train.BEST).exists() and (tmp_path / "r" / train.CONFIG).exists()


def test_run_directory_is_never_clobbered(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "r"
    train.run(small_config(data_dir, steps=4), run_dir, progress=False)
    before = (run_dir / train.LAST).read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train.run(small_config(data_dir, steps=4), run_dir, progress=False)
    assert (run_dir / train.LAST).read_bytes() == before
    changed = small_config(data_dir, steps=8)
    changed = changed.replace(model=changed.model.replace(n_layers=3))
    with pytest.raises(ConfigError, match=r"cannot change --model\.n_layers when resuming"):
        train.run(changed, run_dir, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"cannot change --train\.batch_size when resuming"):
        train.run(
            small_config(data_dir, steps=8, batch_size=2), run_dir, resume=True, progress=False
        )
    assert (run_dir / train.LAST).read_bytes() == before


def test_fine_tuning_resumes_with_a_new_learning_rate(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    train.run(small_config(data_dir, steps=8), run_dir, progress=False)
    tuned = small_config(data_dir, steps=12)
    tuned = tuned.replace(optim=tuned.optim.replace(lr=0.005))
    train.run(tuned, run_dir, resume=True, progress=False)
    last = [json.loads(r) for r in (run_dir / train.METRICS).read_text().splitlines()][-1]
    assert last["step"] == 12 and last["lr"] == 0.005  # warm-up long over: the new lr at once
    state = checkpoint.load(run_dir / train.LAST).state
    assert state["optimizer"]["updates"] == 12  # accumulators kept, not reset


def test_fp16_loss_scaling_trains_resumes_and_logs_the_scale(tmp_path, data_dir, monkeypatch):
    """fp16 is refused on the CPU (it is CUDA's); with that rule lifted, the CPU's float16
    autocast exercises the same path: the loss is scaled for backward, the scale is logged
    and checkpointed, resuming continues bitwise, and the run tracks the float32 one."""
    from allattn import runtime
    from allattn.config import RuntimeConfig

    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        runtime.resolve(RuntimeConfig(device="cpu", precision="fp16"))
    monkeypatch.setattr(runtime, "require_precision", lambda precision, device: None)
    fp16 = RuntimeConfig(device="cpu", precision="fp16")
    config = small_config(data_dir).replace(runtime=fp16)
    straight, split, fp32 = tmp_path / "straight", tmp_path / "split", tmp_path / "fp32"
    train.run(config, straight, progress=False)
    early = small_config(data_dir, steps=8).replace(runtime=fp16)
    train.run(early, split, progress=False)
    train.run(config, split, resume=True, progress=False)
    train.run(small_config(data_dir), fp32, progress=False)

    a, b, c = weights(straight), weights(split), weights(fp32)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert all(a[name].dtype == torch.float32 for name in a)  # weights stay float32
    # Adagrad's steps are about lr = 0.05 whatever the gradient's size: 0.033 measured
    assert max((a[n] - c[n]).abs().max().item() for n in a) < 0.05
    records = [json.loads(r) for r in (straight / train.METRICS).read_text().splitlines()]
    assert all(r["loss_scale"] == 2.0**16 for r in records)
    assert "scaler" in checkpoint.load(straight / train.LAST).state["optimizer"]


def test_a_run_starts_from_another_runs_weights(tmp_path, data_dir, capsys):
    """--train.init_from: the checkpoint's model and weights, a new optimiser, step 0."""
    from allattn.cli import main

    source = tmp_path / "source"
    train.run(small_config(data_dir, steps=4), source)
    start = weights(source, train.BEST)
    options = train.TrainOptions(out=str(tmp_path / "tuned"))
    overrides = {
        "train.init_from": str(source),
        "train.data": data_dir,
        "train.steps": "1",
        "train.eval_interval": "1",
        "train.batch_size": "4",
        "train.block_size": "8",
        "model.dropout": "0.0",  # training-only: may change
    }
    config, run_dir = train.resolve_config(options, overrides)
    assert config.model == checkpoint.load(source).config.replace(dropout=0.0)
    # One step from those weights with a fresh optimiser (the preset's): Adagrad's first step
    # moves each weight by at most the warmed-up learning rate.
    result = train.run(config, run_dir)
    assert result.step == 1
    tuned = checkpoint.load(run_dir / train.LAST)
    assert tuned.meta["step"] == 1 and tuned.run_config.train.init_from == str(source)
    moved = [(tuned.weights[k] - start[k]).abs().max().item() for k in start]
    first_lr = config.optim.lr / config.optim.warmup_steps
    assert 0 < max(moved) <= first_lr * (1 + 1e-5)

    capsys.readouterr()

    def error(*extra):
        argv = ["train", "--data", data_dir, "--out", str(tmp_path / "other"), "--force"]
        argv += ["--train.batch_size", "4", "--train.block_size", "8", "--train.steps", "1"]
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    init = ("--train.init_from", str(source))
    assert "--model.d_model 32 differs from the checkpoint" in error(*init, "--model.d_model", "32")
    assert "does not exist" in error("--train.init_from", str(tmp_path / "missing.safetensors"))
    other = tmp_path / "other_data"
    char_corpus("xyz xyz\n" * 80, (0.6, 0.2, 0.2)).save(other)
    assert "differs" in error(*init, "--data", str(other))
