"""Faults: kill -9 at any instant, signals, corruption, non-finite training, locking, umask.

Training processes are forked from the test process (torch is already imported, so a run costs
a fraction of a second), run `allattn.cli.main` with one thread (bitwise-reproducible), and are
killed at chosen instants: the k-th "event" of a run, events being the steps, the metrics
appends, every piece of every atomic write, the renames and the copies of `last` to `best`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from processes import forked, wait

from allattn import atomic, checkpoint, lock, prepare, train
from allattn.cli import main
from allattn.data import Corpus, char_corpus
from allattn.metrics import MetricsLog

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while")
WORDS += ("seven", "wizards", "quietly", "hex", "jam")
TEXT = "".join(
    random.Random(0).choice(WORDS) + random.Random(i).choice(" \n ,") for i in range(1500)
)
MODEL = [
    "--model.d_model", "16", "--model.n_heads", "2", "--model.n_layers", "2",
    "--model.n_persistent", "4", "--model.attn_span", "24", "--model.span_ramp", "4",
    "--model.span_init", "0.3", "--model.dropout", "0.1", "--model.span_loss_coef", "0.01",
]  # fmt: skip
TRAIN = [
    "--train.batch_size", "2", "--train.block_size", "8", "--train.steps", "12",
    "--train.eval_interval", "3", "--train.eval_batch_size", "2", "--optim.lr", "0.3",
]  # fmt: skip
TIMING = {"tokens_per_s", "elapsed_s"}
KILLS = int(os.environ.get("ALLATTN_TEST_KILLS", "24"))
"""kill -9 instants of the default suite (the slow test takes more)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("faults") / "data"
    char_corpus(TEXT, (0.8, 0.1, 0.1), {"name": "faults"}).save(path)
    # Warm up here (lazy imports, first kernels): every forked child then starts warm.
    assert main(train_argv(str(path), path.parent / "warm-up")) == 0
    return str(path)


def train_argv(data: str, run: Path, *extra: str) -> list[str]:
    return ["train", "--quiet", "--data", data, "--out", str(run), *MODEL, *TRAIN, *extra]


def resume_argv(run: Path, *extra: str) -> list[str]:
    return ["train", "--quiet", "--resume", "--out", str(run), *extra]


# -- forked runs ---------------------------------------------------------------------------------
class Events:
    """Counts the instants of a run at which the test may kill it (in the forked child)."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        tick = self.tick
        ticking = functools.partial(_ticking, self)

        real_write = atomic.write_bytes

        def write_bytes(path, data):
            pieces = [data] if isinstance(data, bytes) else list(data)
            halves = []
            for piece in pieces:  # cut every piece in two: kills land inside the file too
                piece = memoryview(piece)
                halves += [piece[: len(piece) // 2], piece[len(piece) // 2 :]]

            def written():
                for half in halves:
                    tick()
                    yield half

            return real_write(path, written())

        monkeypatch.setattr(atomic, "write_bytes", write_bytes)
        monkeypatch.setattr(atomic.os, "replace", ticking(os.replace))
        monkeypatch.setattr(atomic, "copy_file", ticking(atomic.copy_file))
        monkeypatch.setattr(MetricsLog, "append", ticking(MetricsLog.append))
        monkeypatch.setattr(train.Trainer, "train_step", ticking(train.Trainer.train_step))


def run_child(argv, monkeypatch=None, kill_at=None) -> tuple[int, str, int]:
    """Run once (killed at event `kill_at`); returns status, stderr, events seen (by the
    child, written to a file)."""
    count_file = Path(f"/tmp/allattn-events-{os.getpid()}-{time.time_ns()}")

    def setup():
        events = Events(kill_at)
        with pytest.MonkeyPatch.context() as mp:
            events.install(mp)
            try:
                status = main(argv)
            finally:
                count_file.write_text(str(events.count))
        os._exit(status)

    pid, err = forked(argv, setup)
    code, text = wait(pid, err)
    count = int(count_file.read_text()) if count_file.exists() else -1
    count_file.unlink(missing_ok=True)
    return code, text, count


def fingerprint(run: Path) -> dict:
    """What must be equal between two runs: both checkpoints' bytes and the metrics."""
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in MetricsLog(run).records()]
    return {
        "last": (run / train.LAST).read_bytes(),
        "best": (run / train.BEST).read_bytes(),
        "metrics": records,
    }


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[dict, int]:
    """The uninterrupted run and its number of events."""
    run = tmp_path_factory.mktemp("reference") / "run"
    code, text, events = run_child(train_argv(data, run))
    assert code == 0, text
    result = fingerprint(run)
    assert [r["step"] for r in result["metrics"]] == [3, 6, 9, 12]
    return result, events


def test_kill_9_at_random_instants_then_resume_ends_bitwise_equal(data, reference, tmp_path):
    expected, events = reference
    rng = random.Random(1907)
    run = tmp_path / "run"
    kills = chains = 0
    fresh = True
    while True:
        argv = train_argv(data, run, "--force") if fresh else resume_argv(run)
        kill_at = rng.randint(1, events) if kills < KILLS else None
        code, text, _ = run_child(argv, kill_at=kill_at)
        if code == 0:  # the chain of resumed runs reached the end
            assert fingerprint(run) == expected  # checkpoints bitwise, each record once
            assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
            chains += 1
            if kills >= KILLS:
                break
            fresh = True
            continue
        assert code == -signal.SIGKILL, text
        kills += 1
        fresh = not (run / train.LAST).exists()  # killed before the first checkpoint
    assert kills >= KILLS and chains >= 1


@pytest.mark.slow
def test_kill_9_at_random_times_many_times(data, reference, tmp_path):
    """More kills than the default suite, and at random wall-clock times (wherever the process
    happens to be, torch kernels included) rather than at counted events."""
    expected, _ = reference
    rng = random.Random(2019)
    run = tmp_path / "run"
    kills, fresh = 0, True
    while kills < 200:
        pid, err = forked(train_argv(data, run, "--force") if fresh else resume_argv(run))
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(pid, signal.SIGKILL)
        code, text = wait(pid, err)
        assert code in (0, -signal.SIGKILL) and "Traceback" not in text, text
        if code == 0:
            assert fingerprint(run) == expected
        kills += code != 0
        fresh = code == 0 or not (run / train.LAST).exists()
    code, text, _ = run_child(train_argv(data, run, "--force") if fresh else resume_argv(run))
    assert code == 0, text
    assert fingerprint(run) == expected


def test_a_kill_between_last_and_best_is_repaired(data, reference, tmp_path, capsys):
    expected, _ = reference
    run = tmp_path / "run"
    improvements = sum(
        1
        for i, r in enumerate(expected["metrics"])
        if r["valid_loss"] < min([x["valid_loss"] for x in expected["metrics"][:i]] + [1e9])
    )
    assert improvements >= 2  # so that `best` already held an older step
    state = {"copies": 0}

    def setup_kill_at_second_copy():
        real = atomic.copy_file

        def copy_file(source, target):
            state["copies"] += 1
            if state["copies"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(source, target)

        atomic.copy_file = copy_file  # type: ignore[attr-defined]

    pid, err = forked(train_argv(data, run), setup_kill_at_second_copy)
    code, _ = wait(pid, err)
    assert code == -signal.SIGKILL
    meta_last = checkpoint.load_meta(run / train.LAST)
    assert meta_last["best_step"] == meta_last["step"]
    assert checkpoint.load_meta(run / train.BEST)["step"] < meta_last["step"]  # not copied yet
    assert checkpoint.resolve(run) == run / train.LAST  # eval picks the real best
    code, text, _ = run_child(resume_argv(run))
    assert code == 0, text
    assert fingerprint(run) == expected


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_signals_at_random_instants_save_and_resume_exactly(how, data, reference, tmp_path):
    expected, _ = reference
    rng = random.Random(how)
    run = tmp_path / "run"
    for _ in range(6):
        argv = resume_argv(run) if (run / train.LAST).exists() else train_argv(data, run)
        pid, err = forked(argv)
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, how)
        code, text = wait(pid, err)
        assert "Traceback" not in text, text
        if code == 0:
            break
        assert code == 128 + how, text
        assert len(text.strip().splitlines()) == 1 and text.startswith("allattn:"), text
    if code != 0:
        fresh = not (run / train.LAST).exists()
        code, text, _ = run_child(train_argv(data, run, "--force") if fresh else resume_argv(run))
        assert code == 0, text
    assert fingerprint(run) == expected


def test_a_signal_in_a_step_saves_that_step(data, tmp_path):
    run = tmp_path / "run"

    def setup():
        real = train.Trainer.train_step

        def step(self):
            result = real(self)
            if self.step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        train.Trainer.train_step = step  # type: ignore[method-assign]

    pid, err = forked(train_argv(data, run), setup)
    code, text = wait(pid, err)
    assert code == 143 and "after step 5" in text and "--resume" in text, text
    assert checkpoint.load_meta(run / train.LAST)["step"] == 5
    assert [r["step"] for r in MetricsLog(run).records()] == [3]


# -- locking ---------------------------------------------------------------------------------
def test_a_run_directory_has_one_writer(data, tmp_path, capsys):
    run = tmp_path / "run"
    with lock.hold(run):
        assert main(train_argv(data, run)) == 2
        assert "in use by another allattn process" in capsys.readouterr().err
        assert main(train_argv(data, run, "--force")) == 2
    pid = os.fork()
    if pid == 0:  # holds the lock, then dies by kill -9
        with lock.hold(run):
            time.sleep(60)
        os._exit(0)
    time.sleep(0.3)
    assert main(train_argv(data, run)) == 2
    capsys.readouterr()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert main(train_argv(data, run)) == 0  # the dead run's lock went with it


def test_concurrent_trainings_the_second_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first, err = forked(train_argv(data, run, "--train.steps", "400"))
    time.sleep(1.0)
    code, text, _ = run_child(train_argv(data, run, "--force"))
    assert code == 2 and "in use" in text, text
    os.kill(first, signal.SIGKILL)
    wait(first, err)


# -- integrity --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_argv(data, run, "--train.steps", "3")) == 0
    return run


def test_every_flipped_or_truncated_byte_is_detected(trained, tmp_path):
    good = (trained / train.LAST).read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    rng = random.Random(0)
    positions = sorted(
        set(range(0, 16))
        | set(rng.sample(range(16, header_end), 150))
        | set(rng.sample(range(header_end, len(good)), 150))
        | {header_end - 1, header_end, len(good) - 1}
    )
    path = tmp_path / "bad.safetensors"
    silent = []
    for pos in positions:
        for variant in ("flip", "truncate"):
            if variant == "flip":
                data = bytearray(good)
                data[pos] ^= 0x01 if pos % 2 else 0xFF
            else:
                data = bytearray(good[:pos])
            path.write_bytes(bytes(data))
            try:
                checkpoint.load(path)
                silent.append((variant, pos))
            except checkpoint.CheckpointError as error:
                assert str(path) in str(error) and "\n" not in str(error)
    assert silent == [], f"{len(silent)} of {2 * len(positions)} corruptions went undetected"
    path.write_bytes(good)
    checkpoint.load(path)


def _rewrite(path: Path, change: Callable[[dict, dict], None], checksum: bool = True) -> None:
    """Edit a checkpoint's tensors/metadata and write it back (with a valid checksum unless
    `checksum` is false): what a tool or an attacker could produce."""
    from safetensors.torch import load, save

    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size])["__metadata__"]
    tensors = load(data)
    change(tensors, metadata)
    if checksum:
        metadata.pop("checksum", None)
    blob = save(tensors, metadata=metadata)
    pieces = checkpoint._with_checksum(blob) if checksum else [blob]
    path.write_bytes(b"".join(bytes(p) for p in pieces))


def _meta(**changes):
    def change(tensors, metadata):
        metadata["meta"] = json.dumps({**json.loads(metadata["meta"]), **changes})

    return change


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t, m: t.__setitem__("model.out.bias", t["model.out.bias"] * float("nan")), "NaN"),
        (lambda t, m: t.__setitem__("model.pos_emb", t["model.pos_emb"].int()), "int32"),
        (lambda t, m: t.__setitem__("model.pos_emb", t["model.pos_emb"].half()), "float16"),
        (lambda t, m: t.pop("model.out.bias"), "missing"),
        (lambda t, m: t.__setitem__("model.out.bias", t["model.out.bias"][:-1]), "shape"),
        (_meta(step=-3), "step -3"),
        (_meta(step=True), "step True"),
        (_meta(best_step=99), "best step after its step"),
        (lambda t, m: m.__setitem__("state", "[" * 100_000), "nested too deeply"),
        (lambda t, m: m.__setitem__("state", '{"step": 1}'), "inconsistent training state"),
    ],
)
def test_bad_contents_are_refused_by_every_reader(change, message, trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in (train.LAST, "config.toml", "metrics.jsonl"):
        (run / name).write_bytes((trained / name).read_bytes())
    _rewrite(run / train.LAST, change)
    readers = [
        ["eval", "--checkpoint", str(run), "--select", "last"],
        ["generate", "--checkpoint", str(run / train.LAST), "--max-new-tokens", "2"],
        ["info", str(run / train.LAST)],
        resume_argv(run, "--train.steps", "4"),
    ]
    for argv in readers:
        status = main(argv)
        err = capsys.readouterr().err.strip()
        if message == "inconsistent training state" and argv[0] != "train":
            assert status == 0  # the weights are fine; only resuming needs the state
            continue
        assert status == 2, (argv, err)
        assert len(err.splitlines()) == 1 and message in err and "last.safetensors" in err, err


def test_a_header_edit_is_caught_by_the_checksum(trained, tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    path.write_bytes((trained / train.LAST).read_bytes())

    def edit(tensors, metadata):
        run = json.loads(metadata["run_config"])
        run["optim"]["lr"] = 1.0
        metadata["run_config"] = json.dumps(run)

    _rewrite(path, edit, checksum=False)  # an edit that does not know the checksum
    assert main(["info", str(path)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["info", "--no-verify", str(path)]) == 0  # the escape hatch


def test_resume_falls_back_to_best_only_when_asked(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, "--train.steps", "6")) == 0
    best_step = checkpoint.load_meta(run / train.BEST)["step"]
    data_bytes = bytearray((run / train.LAST).read_bytes())
    data_bytes[-5] ^= 0xFF
    (run / train.LAST).write_bytes(bytes(data_bytes))
    capsys.readouterr()
    assert main(resume_argv(run, "--train.steps", "9")) == 2
    assert "--fallback" in capsys.readouterr().err
    assert main(["train", "--resume", "--fallback", "--out", str(run), "--train.steps", "9"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {run / train.BEST} (step {best_step})" in err
    assert checkpoint.load_meta(run / train.LAST)["step"] == 9


def test_stale_temporaries_are_removed_and_files_follow_the_umask(data, tmp_path, capsys):
    run = tmp_path / "run"
    old = os.umask(0o027)
    try:
        assert main(train_argv(data, run, "--train.steps", "3")) == 0
        assert stat.S_IMODE((run / train.LAST).stat().st_mode) == 0o640
        assert stat.S_IMODE((run / train.BEST).stat().st_mode) == 0o640
        out, source = tmp_path / "corpus", tmp_path / "text.txt"
        source.write_text(TEXT)
        assert main(["prepare", "text", "--source", str(source), "--out", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o750
        assert stat.S_IMODE((out / "train.npy").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    stale = run / ".last.safetensors.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(resume_argv(run, "--train.steps", "6")) == 0
    assert not stale.exists()


def test_a_torn_metrics_line_is_dropped_on_resume(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, "--train.steps", "3")) == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train_lo')  # killed inside the append of step 6
    assert main(resume_argv(run, "--train.steps", "6")) == 0
    assert [r["step"] for r in MetricsLog(run).records()] == [3, 6]
    (run / "metrics.jsonl").write_text('{"step": 3}\nnot json\n{"step": 6}\n')
    assert main(resume_argv(run, "--train.steps", "9")) == 2
    assert "metrics.jsonl: line 2 is not a metrics record" in capsys.readouterr().err


# -- non-finite training ----------------------------------------------------------------------
CAUSES = [
    (cause, span, dtype)
    for cause in ("lr", "poison", "span_loss")
    for span in ("adaptive", "fixed")
    for dtype in ("fp32", "bf16")
    if not (cause == "span_loss" and span == "fixed")  # a fixed span has no span loss
]


@pytest.mark.parametrize("cause,span,dtype", CAUSES)
def test_non_finite_training_stops_and_keeps_the_good_checkpoints(
    cause, span, dtype, data, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    fixed = ["--model.adapt_span", "false"] if span == "fixed" else []
    base = train_argv(data, run, "--train.steps", "3", "--runtime.precision", dtype, *fixed)
    assert main(base) == 0
    before = {name: (run / name).read_bytes() for name in (train.LAST, train.BEST)}
    extra = ["--train.steps", "9"]
    if cause == "lr":
        extra += ["--optim.lr", "1e30", "--optim.grad_clip", "0"]
    elif cause == "span_loss":
        extra += ["--model.span_loss_coef", "1e300"]
    else:
        real = train.Trainer.train_step

        def poisoned(self):
            if self.step == 4:
                with torch.no_grad():
                    self.model.layers[0].attn.q_proj.weight[0, 0] = float("inf")
            return real(self)

        monkeypatch.setattr(train.Trainer, "train_step", poisoned)
    capsys.readouterr()
    assert main(resume_argv(run, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training diverged" in err and "at step" in err, err
    assert {name: (run / name).read_bytes() for name in before} == before


# -- prepare --force --------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False])
def test_prepare_force_killed_at_any_instant_keeps_a_complete_corpus(exchange, tmp_path):
    source = tmp_path / "new.txt"
    source.write_text(TEXT[::-1])
    out = tmp_path / "corpus"
    char_corpus(TEXT, (0.8, 0.1, 0.1), {"name": "old"}).save(out)
    old = Corpus.load(out).meta["name"]
    argv = ["prepare", "text", "--source", str(source), "--out", str(out), "--force"]

    def setup(kill_at: int):
        def go():
            if not exchange:
                atomic._exchange = lambda a, b: False  # type: ignore[attr-defined]
            events = Events(kill_at)
            atomic.os.replace = _ticking(events, os.replace)  # type: ignore[attr-defined]
            atomic.shutil.rmtree = _ticking(events, atomic.shutil.rmtree)  # type: ignore
            real_exchange = atomic._exchange
            atomic._exchange = _ticking(events, real_exchange)  # type: ignore[attr-defined]
            prepare.np.save = _ticking(events, prepare.np.save)  # type: ignore[attr-defined]

        return go

    outcomes = set()
    for kill_at in range(1, 60):
        pid, err = forked(argv, setup(kill_at))
        code, _ = wait(pid, err)
        if not out.exists():  # only between the two renames of the fallback
            assert not exchange
            prepare.prepare("text", out, source=str(source), overwrite=True)  # recovers
        name = Corpus.load(out).meta["name"]  # complete: loads
        outcomes.add(name)
        if code == 0:
            break
        char_corpus(TEXT, (0.8, 0.1, 0.1), {"name": "old"}).save(out, overwrite=True)
    assert outcomes == {old, "text"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]


def _ticking(events: Events, function: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        events.tick()
        result = function(*args, **kwargs)
        events.tick()
        return result

    return wrapper


def test_interrupted_start_up_prints_no_traceback(tmp_path):
    """Ctrl-C or SIGTERM while torch is still importing: one line, the signal's status."""
    import subprocess

    for how, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with contextlib.ExitStack():
            child = subprocess.Popen(
                [sys.executable, "-m", "allattn", "info", str(tmp_path / "x")],
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.4)
            child.send_signal(how)
            _, err = child.communicate(timeout=60)
        assert "Traceback" not in err, err
        # 2: it finished first (the file is missing). -signal: the signal came while the
        # interpreter was shutting down (its handlers are back to the default then), or CPython
        # re-raised a caught KeyboardInterrupt at exit; a shell reports either as 128 + signal.
        assert child.returncode in (status, 2, -how), err


def test_resume_refuses_what_it_would_ignore(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(data, run, "--train.steps", "3")) == 0
    capsys.readouterr()
    assert main(resume_argv(run, "--force")) == 2
    assert "--force" in capsys.readouterr().err
    assert main(resume_argv(run, "--train.seed", "5")) == 2
    assert "--train.seed cannot change" in capsys.readouterr().err
    assert main(["train", "--fallback", "--out", str(run)]) == 2
    assert "--fallback only applies with --resume" in capsys.readouterr().err


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(
    data, tmp_path, capsys, monkeypatch
):
    import errno

    run = tmp_path / "run"
    assert main(train_argv(data, run, "--train.steps", "3")) == 0
    before = (run / train.LAST).read_bytes()
    real_fsync = os.fsync

    def full(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "last.safetensors" in name and name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    capsys.readouterr()
    monkeypatch.setattr(atomic.os, "fsync", full)
    argv = [a for a in resume_argv(run, "--train.steps", "6") if a != "--quiet"]
    assert main([*argv, "--progress"]) == 2  # with the progress bar and the log lines
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert lines[-1].startswith("allattn: error: cannot write"), lines[-3:]  # the bar is gone
    assert str(run / train.LAST) in lines[-1] and "No space left on device" in lines[-1]
    monkeypatch.undo()
    assert (run / train.LAST).read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_hostile_config_is_refused_before_building_its_model(trained, tmp_path, capsys):
    """A header (with a valid checksum) claiming 10^9 layers: refused at once, not built."""
    path = tmp_path / "x.safetensors"
    path.write_bytes((trained / train.LAST).read_bytes())

    def huge(tensors, metadata):
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), "n_layers": 10**9})

    _rewrite(path, huge)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "GiB" in err, err
