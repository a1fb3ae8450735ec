"""Data-parallel training and evaluation (DESIGN §3.0a): W processes compute one process's run.

Jobs run in two ways: with torchrun itself (fresh interpreters; the launch users type), and as
processes forked from the test process with the environment torchrun would give them (torch
already imported: a fraction of a second per process), which also lets the tests kill, stop
and inspect single ranks. Both use gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import forked, wait

from allattn import checkpoint, distributed, train
from allattn.cli import main
from allattn.config import ConfigError
from allattn.data import char_corpus, word_corpus
from allattn.lock import LOCK

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while")
WORDS += ("seven", "wizards", "quietly", "hex", "jam", "vexed", "nymphs", "fjord")
TEXT = "".join(
    random.Random(i).choice(WORDS) + random.Random(-i).choice(" \n ,") for i in range(3000)
)
MODEL = [
    "--model.d_model", "16", "--model.n_heads", "2", "--model.n_layers", "2",
    "--model.n_persistent", "4", "--model.attn_span", "24", "--model.span_ramp", "4",
    "--model.span_init", "0.3", "--model.span_loss_coef", "0.01",
]  # fmt: skip
TRAIN = [
    "--train.batch_size", "4", "--train.block_size", "8", "--train.eval_interval", "3",
    "--train.eval_batch_size", "4", "--optim.lr", "0.3", "--runtime.device", "cpu",
]  # fmt: skip
NO_DROPOUT = ["--model.dropout", "0", "--model.emb_dropout", "0"]
DROPOUT = ["--model.dropout", "0.2", "--model.emb_dropout", "0.1"]
TIMING = {"tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("distributed") / "data"
    char_corpus(TEXT, (0.8, 0.1, 0.1), {"name": "distributed"}).save(path)
    return str(path)


def train_argv(data: str, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "--quiet", "--data", data, "--out", str(run), "--train.steps", str(steps),
        *MODEL, *TRAIN, *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun exports to rank `rank` of a one-node job."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def start_job(argv: list[str], world: int = 2) -> list[tuple[int, Path]]:
    """The ranks of a job, forked; `finish` waits for them."""
    port = free_port()
    return [forked(argv, env=launch_env(rank, world, port)) for rank in range(world)]


def finish(ranks: list[tuple[int, Path]], timeout: float = 120) -> list[tuple[int, str]]:
    return [wait(pid, err, timeout) for pid, err in ranks]


def job(argv: list[str], world: int = 2) -> list[tuple[int, str]]:
    """Run a forked job of `world` ranks to the end: each rank's (status, stderr)."""
    return finish(start_job(argv, world))


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun ARGS` (the module form, as in the README), one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def torchrun_job(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    port = str(free_port())
    done = torchrun("--nproc_per_node", str(nproc), "--master_port", port, "-m", "allattn", *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / train.LAST).weights


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest per-tensor ‖a − b‖ / ‖b‖."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300)).item() for k in a)


def records(run: Path) -> list[dict]:
    lines = (run / train.METRICS).read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in TIMING} for r in lines]


def assert_close_records(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("train_loss", "valid_loss", "span_avg", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rel), key


# -- the same training as one process ------------------------------------------------------------
def test_two_processes_under_torchrun_train_as_one(data, tmp_path):
    """float32, batch_split 2 inside each rank (DDP synchronises only the last slice)."""
    assert main(train_argv(data, tmp_path / "one", 6, *NO_DROPOUT)) == 0
    two = train_argv(data, tmp_path / "two", 6, *NO_DROPOUT, "--train.batch_split", "2")
    done = torchrun_job(two)
    assert "trained to step 6" in done.stdout and done.stdout.count("trained to step") == 1
    assert relative(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-6
    assert_close_records(records(tmp_path / "two"), records(tmp_path / "one"), 1e-5)
    one, two_state = (checkpoint.load(tmp_path / n / train.LAST).state for n in ("one", "two"))
    assert two_state["world_size"] == 2 and len(two_state["rank_rng"]) == 2
    assert two_state["train_streams"]["pos"] == one["train_streams"]["pos"]
    for x, y in zip(two_state["train_cache"], one["train_cache"], strict=True):
        assert x.shape == y.shape and x.shape[0] == 4  # all four streams' caches
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_float64_word_level_with_adaptive_io_equals_one_process(tmp_path):
    """Every parameter of the adaptive input/softmax gets its gradient through DDP."""
    path = tmp_path / "words"
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    texts = {"train": "\n".join(lines[:240]), "valid": "\n".join(lines[240:])}
    word_corpus({**texts, "test": texts["valid"]}, {"name": "words"}).save(path)
    extra = [
        *NO_DROPOUT, "--runtime.precision", "fp64", "--model.adaptive_io", "true",
        "--model.adaptive_cutoffs", "4,9", "--model.adaptive_div", "2", "--optim.optimizer",
        "adam", "--optim.lr", "0.01", "--optim.grad_clip", "1.0",
    ]  # fmt: skip
    assert main(train_argv(str(path), tmp_path / "one", 6, *extra)) == 0
    results = job(train_argv(str(path), tmp_path / "two", 6, *extra))
    assert all(code == 0 for code, _ in results), results
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one["adaptive.cluster.weight"].dtype == torch.float64
    assert relative(two, one) <= 1e-12
    assert_close_records(records(tmp_path / "two"), records(tmp_path / "one"), 1e-11)


def test_dropout_runs_are_reproducible_and_ranks_draw_their_own(data, tmp_path):
    for name in ("a", "b"):
        results = job(train_argv(data, tmp_path / name, 4, *DROPOUT))
        assert all(code == 0 for code, _ in results), results
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rngs = checkpoint.load(tmp_path / "a" / train.LAST).state["rank_rng"]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert distributed.rank_seed(0, 0) != distributed.rank_seed(0, 1)


# -- resume ---------------------------------------------------------------------------------------
def test_resume_on_the_same_world_size_is_bitwise(data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for argv in (
        train_argv(data, straight, 6, *DROPOUT),
        train_argv(data, split, 3, *DROPOUT),
        ["train", "--quiet", "--resume", "--out", str(split), "--train.steps", "6"],
    ):
        results = job(argv)
        assert all(code == 0 for code, _ in results), results
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(straight) == records(split)
    sa, sb = (checkpoint.load(r / train.LAST).state for r in (straight, split))
    caches = zip(
        sa["train_cache"] + sa["valid_cache"], sb["train_cache"] + sb["valid_cache"], strict=True
    )
    for x, y in caches:
        assert torch.equal(x, y)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(first, then, data, tmp_path):
    """Trained on `first` processes, resumed on `then`: equal to one process's 6 steps."""
    assert main(train_argv(data, tmp_path / "one", 6, *NO_DROPOUT)) == 0
    run = tmp_path / "run"
    for world, argv in (
        (first, train_argv(data, run, 3, *NO_DROPOUT)),
        (then, ["train", "--quiet", "--resume", "--out", str(run), "--train.steps", "6"]),
    ):
        results = job(argv, world) if world > 1 else [(main(argv), "")]
        assert all(code == 0 for code, _ in results), results
    assert relative(weights(run), weights(tmp_path / "one")) <= 1e-6
    assert_close_records(records(run), records(tmp_path / "one"), 1e-5)
    assert checkpoint.load(run / train.LAST).state["world_size"] == then


# -- evaluation -----------------------------------------------------------------------------------
def test_distributed_eval_equals_one_process(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 3, *DROPOUT)) == 0
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run), "--json", "--quiet", "--runtime.device", "cpu"]
    assert main(argv) == 0
    single = json.loads(capsys.readouterr().out)
    done = torchrun_job(argv)
    lines = done.stdout.splitlines()
    assert len(lines) == 1  # rank 0 speaks for the job
    result = json.loads(lines[0])
    assert result["tokens"] == single["tokens"]
    assert result["loss_nats"] == pytest.approx(single["loss_nats"], rel=1e-6)


# -- bad input: one line, exit 2, nothing written -------------------------------------------------
def test_a_batch_that_does_not_divide_into_the_processes(data, tmp_path):
    results = job(train_argv(data, tmp_path / "run", 4, "--train.batch_size", "3"))
    assert [code for code, _ in results] == [2, 2]
    assert "--train.batch_size 3 does not divide into 2 processes" in results[0][1]
    assert results[1][1].strip() == ""  # rank 0 reports for the job
    assert not (tmp_path / "run" / train.LAST).exists()
    results = job(train_argv(data, tmp_path / "split", 4, "--train.batch_split", "4"))
    assert [code for code, _ in results] == [2, 2]
    assert "--train.batch_split 4 does not divide the 2 streams of each of 2" in results[0][1]


def test_a_resume_world_size_that_does_not_divide_the_batch(data, tmp_path):
    run = tmp_path / "run"
    assert main(train_argv(data, run, 3)) == 0

    def files() -> dict[str, bytes]:  # the lock holds the pid of its last holder
        return {p.name: p.read_bytes() for p in run.iterdir() if p.name != LOCK}

    before = files()
    results = job(["train", "--quiet", "--resume", "--out", str(run)], world=3)
    assert [code for code, _ in results] == [2, 2, 2]
    assert "--train.batch_size 4 does not divide into 3 processes" in results[0][1]
    assert files() == before


def test_cuda_without_gpus_is_refused(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    results = job(train_argv(data, tmp_path / "run", 2, "--runtime.device", "cuda"))
    assert [code for code, _ in results] == [2, 2]
    assert "--runtime.device cuda: CUDA is not available" in results[0][1]


def test_an_unreachable_rendezvous_fails_in_one_line(data, tmp_path):
    """A fresh interpreter (the launch users make): the error is the only line on stderr."""
    env = {**os.environ, **launch_env(1, 2, free_port())}
    argv = train_argv(data, tmp_path / "run", 2, "--runtime.dist_timeout_s", "2")
    done = subprocess.run(
        [sys.executable, "-m", "allattn", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not join the job's rendezvous at 127.0.0.1:" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, "inconsistent launch environment"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT is not set"),
    ],
)
def test_a_bad_launch_environment(env, message):
    with pytest.raises(distributed.LaunchError, match=message):
        distributed.detect(env)


def test_one_process_is_the_identity():
    world = distributed.detect({})
    assert world == distributed.World() and world.main and not world.distributed
    assert distributed.mean(1.5, 2.0) == [1.5, 2.0] and distributed.largest(3) == 3
    t = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(distributed.gather_rows(t), t) and distributed.gather_objects(1) == [1]
    assert distributed.World(1, 2).shard(8, "x") == slice(4, 8)
    with pytest.raises(ConfigError, match="x 6 does not divide into 4 processes"):
        distributed.World(0, 4).shard(6, "x")


# -- faults ---------------------------------------------------------------------------------------
def wait_for_records(run: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / train.METRICS
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert time.monotonic() < deadline, "the job wrote no metrics"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_torchrun_saves_the_last_step_and_stops(signum, data, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(data, run, 100_000, *NO_DROPOUT)
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", port, "-m", "allattn", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as job:
        wait_for_records(run, 2)
        job.send_signal(signum)
        _, err = job.communicate(timeout=120)
    stops = [line for line in err.decode().splitlines() if line.startswith("allattn:")]
    assert len(stops) == 1, err.decode()[-2000:]  # both ranks stopped; rank 0 speaks
    step = int(stops[0].split("after step ")[1].split(";")[0])
    saved = checkpoint.load(run / train.LAST)
    assert saved.meta["step"] == step and saved.state["world_size"] == 2
    # The stopped run continues as if it had never stopped (to within float rounding of the
    # data-parallel sum): one process, two more steps, against a straight single run.
    resume = ["train", "--quiet", "--resume", "--out", str(run), "--train.steps", str(step + 2)]
    assert main(resume) == 0
    straight = tmp_path / "straight"
    assert main(train_argv(data, straight, step + 2, *NO_DROPOUT)) == 0
    assert relative(weights(run), weights(straight)) <= 1e-5


def test_a_dead_rank_stops_the_others_with_a_message(data, tmp_path):
    run = tmp_path / "run"
    ranks = start_job(train_argv(data, run, 100_000, *NO_DROPOUT))
    wait_for_records(run, 1)
    os.kill(ranks[1][0], signal.SIGKILL)
    (code0, err0), (code1, _) = finish(ranks, timeout=60)
    assert code1 == -signal.SIGKILL
    assert code0 == 1 and "rank 0 lost contact with the other processes" in err0, err0
    assert checkpoint.load(run / train.LAST).meta["step"] >= 3  # intact


def test_a_hung_rank_times_out(data, tmp_path):
    run = tmp_path / "run"
    argv = train_argv(data, run, 100_000, *NO_DROPOUT, "--runtime.dist_timeout_s", "3")
    ranks = start_job(argv)
    wait_for_records(run, 1)
    os.kill(ranks[1][0], signal.SIGSTOP)
    try:
        code0, err0 = wait(*ranks[0], timeout=60)
    finally:
        os.kill(ranks[1][0], signal.SIGKILL)
        wait(*ranks[1], timeout=60)
    assert code0 == 1 and "lost contact" in err0, err0
    checkpoint.load(run / train.LAST)  # intact


def test_two_nodes_simulated_train_as_one(data, tmp_path):
    """Two torchrun launches, one per "node", meeting at one rendezvous endpoint."""
    argv = train_argv(data, tmp_path / "one", 6, *NO_DROPOUT)
    assert main(argv) == 0
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def node(rank: int) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
            "1", "--node_rank", str(rank), "--rdzv-endpoint", endpoint, "-m", "allattn",
            *train_argv(data, tmp_path / "two", 6, *NO_DROPOUT),
        ]  # fmt: skip

    pipe = subprocess.PIPE
    nodes = [subprocess.Popen(node(r), env=env, stdout=pipe, stderr=pipe) for r in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err.decode()[-2000:]
    assert relative(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-6
    assert checkpoint.load(tmp_path / "two" / train.LAST).state["world_size"] == 2
