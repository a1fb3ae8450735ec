"""Data parallelism (DESIGN §3.0a): the launch environment, the process group, the collectives
training and evaluation need, and DistributedDataParallel.

A process that torchrun starts (or any launcher that exports RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT, as a SLURM script can) is one rank of a job of WORLD_SIZE
processes. `session` joins the job's process group (NCCL with one GPU per local rank on CUDA,
gloo on the CPU) and leaves it at the end. Without those variables the world is one process and
every function here is the identity, so the trainer and evaluation call the same code either way
and never touch `torch.distributed` or DDP themselves.

Failures never leave a process waiting for ever: every collective and the rendezvous time out
after `--runtime.dist_timeout_s`; `agreement()` lets all ranks learn that one of them failed
(bad data on one node, a lock held, a full disk on rank 0) and stop with that rank's message;
a rank that dies makes the others stop with `DistributedError`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import runtime
from .config import ConfigError, RuntimeConfig

log = logging.getLogger(__name__)

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun exports to each process (and a hand-written launcher must)."""


LOST_PEER = (
    "Connection reset by peer",
    "Connection closed by peer",
    "gloo/transport",
    "NCCL communicator was aborted",
    "Timed out",
    "timed out",
)
"""How gloo and NCCL word a vanished peer or a timed-out collective in the RuntimeErrors that
DDP's gradient reduction raises (other failures arrive as `torch.distributed.DistError`)."""

_SETTLE_S = 0.05
"""How long a closing session lets the backend's threads finish (`session`)."""


class LaunchError(ConfigError):
    """The launch environment is inconsistent, or the rendezvous cannot be reached."""


class PeerError(ValueError):
    """Another rank of the job failed on its input (its one-line message is carried over)."""


class DistributedError(RuntimeError):
    """The job lost a process, or a collective timed out: the run cannot go on."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: its rank among `size` processes, and on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints, logs and output (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def gpu_slot(self) -> int | None:
        """The local rank, whose GPU this process uses in a data-parallel job (None: one
        process, any device)."""
        return self.local_rank if self.distributed else None

    def shard(self, streams: int, what: str) -> slice:
        """The rows of `streams` parallel streams this rank owns: [r·B/W, (r+1)·B/W)."""
        if streams % self.size:
            raise ConfigError(
                f"{what} {streams} does not divide into {self.size} processes "
                f"(each process owns an equal share of the streams)"
            )
        share = streams // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def detect(environ: Mapping[str, str] | None = None) -> World:
    """The world the launcher describes in the environment (one process when it says nothing)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return World()
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = env.get(name, "0" if name == "LOCAL_RANK" else "")
        try:
            values[name] = int(text)
        except ValueError:
            raise LaunchError(f"environment variable {name}={text!r} is not an integer") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise LaunchError(
            f"inconsistent launch environment: RANK {world.rank}, WORLD_SIZE {world.size}, "
            f"LOCAL_RANK {world.local_rank}"
        )
    if world.distributed:
        missing = [name for name in ENVIRONMENT if not env.get(name)]
        if missing:
            raise LaunchError(
                f"WORLD_SIZE is {world.size} but {', '.join(missing)} is not set "
                "(launch with torchrun, or export all of " + ", ".join(ENVIRONMENT) + ")"
            )
    return world


_world = World()
_device = torch.device("cpu")
"""Where this rank's collectives run: its GPU under NCCL, the CPU under gloo."""


def current() -> World:
    """The world of the running session (one process outside `session`)."""
    return _world


@contextlib.contextmanager
def session(config: RuntimeConfig) -> Iterator[World]:
    """Join the launcher's process group for the block (a no-op for one process, or when a
    session is already open); a peer lost inside it becomes a `DistributedError`."""
    global _world, _device
    world = detect()
    if not world.distributed or dist.is_initialized():
        yield _world
        return
    device = runtime.resolve_device(config.device, world.local_rank)
    timeout_s = config.dist_timeout_s
    env = os.environ
    where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend,
            rank=world.rank,
            world_size=world.size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as error:  # DistNetworkError, DistStoreError, timeouts
        raise LaunchError(
            f"rank {world.rank} could not join the job's rendezvous at {where} within "
            f"{timeout_s:g} s ({_first_line(error)}); is every process started and the "
            "address reachable? (--runtime.dist_timeout_s)"
        ) from None
    _world, _device = world, device
    log.info(
        "data parallel: rank %d of %d (local rank %d), %s on %s, rendezvous %s",
        world.rank,
        world.size,
        world.local_rank,
        backend,
        device,
        where,
    )
    try:
        yield world
    except dist.DistError as error:  # a peer vanished (gloo, NCCL) or a collective timed out
        raise DistributedError(_lost(error)) from None
    except RuntimeError as error:  # the same from DDP's reducer, as a plain RuntimeError
        if not any(marker in str(error) for marker in LOST_PEER):
            raise
        raise DistributedError(_lost(error)) from None
    finally:
        _world, _device = World(), torch.device("cpu")
        # A gloo worker thread frees each finished collective's tensors, which takes the GIL,
        # a moment after the caller saw it complete; the process group's destructor (run
        # with the GIL held when DDP's reducer drops the last reference) joins those threads.
        # Idle first, so the two cannot deadlock (pytorch/pytorch#56297).
        time.sleep(_SETTLE_S)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _lost(error: BaseException) -> str:
    return (
        f"rank {_world.rank} lost contact with the other processes of the job "
        f"({_first_line(error)}); another rank has probably died (see its message): the run "
        "stops here, its last checkpoint is intact (continue with --resume)"
    )


def _first_line(error: BaseException) -> str:
    """The error's first line, without the source location and advice gloo adds."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return line.split(". This is typically")[0]


# -- collectives (each the identity for one process) -------------------------------------------
def all_reduce_sum(values: Tensor) -> Tensor:
    """The sum over ranks of `values` (a new tensor on the input's device)."""
    if not _world.distributed:
        return values
    out = values.detach().to(_device, copy=True)
    dist.all_reduce(out)
    return out.to(values.device)


def mean(*values: float) -> list[float]:
    """The mean over ranks of each number (in float64)."""
    if not _world.distributed:
        return list(values)
    total = all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    return (total / _world.size).tolist()


def largest(value: int) -> int:
    """The largest of the ranks' integers (a stop request: 0, or the signal received)."""
    if not _world.distributed:
        return value
    out = torch.tensor([value], dtype=torch.int64, device=_device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())


def gather_rows(tensor: Tensor) -> Tensor | None:
    """The ranks' tensors of equal shape concatenated along dim 0, in rank order, on the CPU
    of the main rank (None on the others)."""
    if not _world.distributed:
        return tensor.cpu()
    local = tensor.detach().to(_device).contiguous()
    parts = [torch.empty_like(local) for _ in range(_world.size)] if _world.main else None
    dist.gather(local, parts, dst=0)
    return torch.cat(parts).cpu() if parts is not None else None


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable), in rank order, on the main rank (None on the others)."""
    if not _world.distributed:
        return [obj]
    objects: list[Any] | None = [None] * _world.size if _world.main else None
    dist.gather_object(obj, objects, dst=0)
    return objects


@contextlib.contextmanager
def agreement() -> Iterator[None]:
    """Run the block on every rank, then let all ranks know whether each succeeded: a rank
    whose block raised re-raises its error, the others raise `PeerError` with the first
    failed rank's message. So a failure on one rank stops all of them at the same point,
    instead of leaving the others waiting in their next collective."""
    if not _world.distributed:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except BaseException as error:
        failure = error
    message = None if failure is None else f"{type(failure).__name__}: {_first_line(failure)}"
    messages: list[str | None] = [None] * _world.size
    try:
        dist.all_gather_object(messages, message)
    except (RuntimeError, dist.DistError):
        if failure is not None:
            raise failure from None
        raise
    if failure is not None:
        raise leave_report_to_main(failure) if messages[0] is not None else failure
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if failed:
        rank, text = failed[0]
        raise PeerError(f"rank {rank} failed: {text.partition(': ')[2]}")


def leave_report_to_main(error: BaseException) -> BaseException:
    """`error`, marked (on ranks other than 0) as one that rank 0 reports for the whole job,
    because every rank raises it at the same point."""
    if not _world.main:
        error.reported_by_main = True  # type: ignore[attr-defined]
    return error


def reported_by_main(error: BaseException) -> bool:
    """Whether rank 0 failed at the same point, so it reports for the job and this rank can
    stay silent (one message per job, not one per process)."""
    return bool(getattr(error, "reported_by_main", False))


# -- the model -------------------------------------------------------------------------------
def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` under DDP (its weights broadcast from rank 0, gradients averaged over ranks in
    backward); `model` itself for one process."""
    if not _world.distributed:
        return model
    return DistributedDataParallel(  # (the model has no buffers to keep in sync)
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside `wrap`'s result."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """Accumulate gradients locally in the block (a `batch_split` slice before the last)."""
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """The seed of rank `rank`'s dropout (and other per-rank) randomness in a run seeded
    `seed` (and `more`, such as the step of a resume on another world size): independent
    streams for different ranks, reproducible from the numbers."""
    entropy = [seed, rank, *more]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
