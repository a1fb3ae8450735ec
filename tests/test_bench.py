"""The benchmark harness: FLOP accounting, allocator settings, train-step measurement, errors."""

from __future__ import annotations

import json

import pytest

from allattn import bench, runtime
from allattn.cli import main
from allattn.config import load_preset


def test_layer_flops_accounting():
    batch, block, context, heads, head_dim, n_mem = 2, 8, 24, 2, 4, 5
    d = heads * head_dim
    q_and_o = 2 * 3 * (2 * batch * block * d * d)  # forward, input grad, weight grad
    k_and_v = 2 * (2 * 2 * batch * (context + block) * d * d + 2 * batch * block * d * d)
    attention = 3 * 2 * batch * heads * block * head_dim * (3 * context + 2 * n_mem)
    assert bench.layer_flops(batch, block, context, heads, head_dim, n_mem) == (
        q_and_o + k_and_v + attention
    )


def test_allocator_settings_apply_on_glibc():
    assert runtime.keep_allocations() is True


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layer_case_measures_the_layer(precision):
    result = bench._layer_case("small", "chunked", 1, precision)
    assert result["context"] == 256 and result["tokens"] == 8 * 128
    assert result["seconds"] > 0 and result["flops"] > 0 and result["peak_mb"] >= 0


def test_layer_bench_refuses_an_unknown_precision(capsys):
    assert main(["bench", "layer", "--precisions", "fp32,fp8"]) == 2
    assert "unknown precision 'fp8'; choose from fp32, bf16, fp16" in capsys.readouterr().err
    assert main(["bench", "layer", "--precisions", "fp16"]) == 2
    assert "fp16 needs CUDA; use bf16" in capsys.readouterr().err


def test_train_step_case_reports_throughput_and_memory():
    overrides = {"model.n_layers": "1", "train.block_size": "16", "train.batch_size": "2"}
    result = bench.train_step_case(load_preset("tiny").override(overrides).to_dict(), 2)
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0 and result["parameters"] > 0


def test_train_step_cli_prints_json_last(capsys):
    argv = [
        "bench",
        "train-step",
        "--preset",
        "tiny",
        "--model.n_layers",
        "1",
        "--train.block_size",
        "16",
        "--train.batch_size",
        "2",
        "--steps",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"tokens_per_s", "peak_rss_mb"} <= set(last)


def test_train_step_compares_adaptive_and_full_softmax(capsys):
    small = "--model.n_layers 1 --model.d_model 32 --model.n_heads 2 --model.n_persistent 8 "
    small += "--model.attn_span 32 --model.vocab_size 3000 --model.adaptive_cutoffs 100,1000 "
    small += "--train.block_size 16 --train.batch_size 2 --train.batch_split 1"
    argv = ["bench", "train-step", "--preset", "wt103", *small.split(), "--steps", "1"]
    assert main([*argv, "--compare-softmax", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["full_softmax"]["parameters"] > last["parameters"]
    assert last["full_softmax_memory_ratio"] > 0 and last["full_softmax_speed_ratio"] > 0
    tiny = ["bench", "train-step", "--preset", "tiny", "--steps", "1", "--compare-softmax"]
    assert main(tiny) == 2
    assert "the model has none" in capsys.readouterr().err


def test_bench_errors_are_one_line(capsys):
    for argv, message in (
        (["bench", "layer", "--sizes", "huge"], "unknown size 'huge'"),
        (["bench", "train-step", "--model.bogus", "1"], "unknown flag --model.bogus"),
        (["bench", "layer", "--model.n_layers", "2"], "unrecognized arguments"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
