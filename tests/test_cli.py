"""The command line: presets, overrides, --print-config, and one-line user errors."""

from __future__ import annotations

import pytest

from allattn.cli import main
from allattn.config import load_preset, preset_names


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "preset,params",
    [
        ("enwik8_small", "38,501,725"),
        ("enwik8_large", "114,017,773"),
        ("text8_small", "38,320,300"),
        ("text8_large", "113,836,348"),
        ("enwik8_small_ff", "38,547,805"),
        ("enwik8_large_ff", "114,146,797"),
        ("wt103", "132,493,746"),
        ("wt103_ff", "132,622,770"),
        # the adaptive-span transformer baselines (DESIGN §3.1 (b))
        ("enwik8_transformer_small", "38,538,541"),
        ("enwik8_transformer_large", "208,910,221"),
        ("text8_transformer_small", "38,357,116"),
        ("text8_transformer_large", "208,638,172"),
    ],
)
def test_print_config_shows_the_paper_parameter_counts(preset, params, capsys):
    assert main(["train", "--preset", preset, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"{params} parameters" in out
    assert "[model]" in out and "[optim]" in out and "[train]" in out


def test_presets_follow_the_paper():
    assert {"tiny", "tiny_ff", "enwik8_small", "enwik8_large", "text8_small", "text8_large"} <= set(
        preset_names()
    )
    small = load_preset("enwik8_small")
    assert (small.model.n_layers, small.model.n_persistent, small.model.attn_span) == (
        18,
        1024,
        8192,
    )
    assert (small.model.dropout, small.model.span_loss_coef, small.model.span_ramp) == (
        0.3,
        1e-7,
        32,
    )
    assert small.model.adapt_cache and small.model.adapt_span and small.model.span_init == 0
    assert (small.optim.optimizer, small.optim.lr, small.optim.warmup_steps) == (
        "adagrad",
        0.07,
        32000,
    )
    assert small.optim.grad_clip == 0.03
    assert (small.train.batch_size, small.train.block_size, small.train.batch_split) == (64, 512, 2)
    assert (small.train.steps, small.train.eval_interval, small.train.eval_batch_size) == (
        450_000,
        1000,
        8,
    )
    large = load_preset("enwik8_large")
    assert (large.model.n_layers, large.model.n_persistent, large.model.dropout) == (36, 2048, 0.4)
    assert large.train.steps == 200_000
    ff = load_preset("enwik8_small_ff")
    assert (ff.model.n_persistent, ff.model.d_inner) == (0, 1024)


def test_overrides_reach_the_config(capsys):
    argv = [
        "train",
        "--preset",
        "enwik8_small",
        "--print-config",
        "--model.n_persistent",
        "512",
        "--train.batch_size",
        "4",
        "--train.block_size=512",
        "--train.steps",
        "100",
        "--model.adapt_cache",
        "false",
        "--optim.lr",
        "0.05",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for line in (
        "n_persistent = 512",
        "batch_size = 4",
        "block_size = 512",
        "steps = 100",
        "adapt_cache = false",
        "lr = 0.05",
    ):
        assert line in out.splitlines()
    assert "29,064,541 parameters" in out  # 18 x 2 x 512 x 512 fewer than enwik8_small


def test_default_train_config_is_tiny_on_the_bundled_corpus(capsys):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'data = ""' in out and "vocab_size = 65" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--preset", "enwik9"], "unknown preset 'enwik9'"),
        (["train", "--model.nb_layers", "3"], "unknown flag --model.nb_layers"),
        (["train", "--model.n_layers", "three"], "--model.n_layers expects int, got 'three'"),
        (["train", "--model.n_heads", "3"], "--model.n_heads (3) must divide --model.d_model"),
        (["train", "--train.batch_split", "3"], "--train.batch_split (3) must divide"),
        (["train", "--bogus"], "unrecognized argument --bogus"),
        (["train", "--train.steps"], "--train.steps needs a value"),
        (["train", "--data", "/nonexistent/dir"], "data directory /nonexistent/dir does not exist"),
        (["train", "--resume"], "--resume needs --out"),
        (["info", "x", "--extra"], "unrecognized arguments: --extra"),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in one_line(capsys)


def test_resume_from_the_command_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    small = ["--model.n_layers", "1", "--train.eval_interval", "2", "--no-progress"]
    assert main(["train", "--out", run, "--train.steps", "2", *small]) == 0
    assert main(["train", "--out", run, "--resume", "--train.steps", "4", "--no-progress"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert main(["train", "--out", run, "--preset", "tiny", "--resume"]) == 2
    assert "--resume takes the config from the run" in one_line(capsys)


def test_quiet_kernel_choice_and_which_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    small = ["--model.n_layers", "1", "--train.eval_interval", "2", "--train.steps", "4"]
    assert main(["train", "--out", run, *small, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "trained to step 4" in captured.out
    # The kernel is a run-time choice: it may change at resume, and auto says what it chose.
    resumed = ["train", "--out", run, "--resume", "--train.steps", "6", "--no-progress"]
    assert main([*resumed, "--runtime.attn_impl", "reference"]) == 0
    assert "attention kernel: reference (asked for)" in capsys.readouterr().err
    for select, name in (("last", "last.safetensors"), ("best", "")):
        argv = ["eval", "--checkpoint", run, "--split", "valid", "--select", select]
        assert main([*argv, "--runtime.attn_impl", "auto"]) == 0
        err = capsys.readouterr().err
        assert f"checkpoint {run}/{name}" in err and "attention kernel: chunked (auto" in err
    argv = ["generate", "--checkpoint", run, "--select", "last", "--max-new-tokens", "5"]
    assert main([*argv, "--seed", "0", "--runtime.attn_impl", "reference"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out) >= 2 and "(step 6, newest)" in captured.err


def test_help_lists_every_section_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model.n_persistent",
        "--optim.lr",
        "--train.eval_batch_size",
        "--runtime.precision",
    ):
        assert flag in out
    assert "{auto,chunked,reference,flex}" in out
