"""Where and how the computation runs: device, precision (autocast), attention kernel, allocator.

`resolve(RuntimeConfig)` turns the settings into a `Runtime`: the device (auto = CUDA when
available), the autocast context of the precision, the kernel `auto` stands for, logged with
the reason, and on the CPU whether subnormal floats are flushed to zero (`flush_denormal`).
None of these change a result beyond rounding, so training, resuming, evaluation and generation
each choose their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from . import attention
from .config import ConfigError, RuntimeConfig

ModuleT = TypeVar("ModuleT", bound=nn.Module)

log = logging.getLogger(__name__)

# glibc mallopt parameters: keep freed memory instead of returning big blocks to the OS
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


def keep_allocations() -> bool:
    """Tell glibc to reuse freed memory (no mmap per large tensor, no trimming).

    Large tensors are otherwise mmapped fresh and returned on free, so every step pays for
    zeroed pages again; this alone made one CPU implementation 3.7x slower. The `allattn`
    command applies it at start-up. Returns whether the settings were applied (only glibc has
    mallopt).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        return bool(ok and libc.mallopt(M_TOP_PAD, 64 << 20))
    except (OSError, AttributeError):
        return False


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for CUDA without it is an error.

    In a data-parallel job (`local_rank` given) each process takes the GPU of its local rank:
    `auto` and `cuda` mean cuda:LOCAL_RANK, and a fixed cuda:N is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--runtime.device {name}: CUDA is not available")
    if local_rank is None or name == "cpu":
        return torch.device(name)
    if name != "cuda":
        raise ConfigError(
            f"--runtime.device {name}: in a data-parallel job each process uses the GPU of its "
            "local rank; pass --runtime.device cuda (or auto)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} needs GPU {local_rank}, and this node has {count}: "
            f"start at most {count} processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def memory_of(device: torch.device) -> int | None:
    """Bytes of memory `device` has (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def require_memory(nbytes: int, device_name: str, what: str = "the run") -> None:
    """Refuse work that needs more than the device's memory before allocating any of it."""
    device = resolve_device(device_name)
    total = memory_of(device)
    if total is not None and nbytes > total:
        raise ConfigError(
            f"{what} needs at least {nbytes / 2**30:,.1f} GiB (weights, gradients, optimiser "
            f"state, caches); {device} has {total / 2**30:,.1f} GiB"
        )


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The precisions that run under autocast (over float32 weights), and its dtype."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of `precision` on `device` (bf16, fp16), or nothing (fp32, fp64)."""
    if precision in AUTOCAST:
        return torch.autocast(device.type, dtype=AUTOCAST[precision])
    return contextlib.nullcontext()


def require_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device does not run: fp16 is CUDA's (on the CPU, float16 matrix
    products are not faster than float32, and bf16 is the reduced precision that is)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "--runtime.precision fp16 needs a CUDA device (float16 autocast with loss "
            f"scaling); on {device.type} use bf16"
        )


def require_compiler(device: torch.device) -> None:
    """Refuse `--runtime.compile` where inductor cannot generate code: on the CPU it needs a C++
    compiler ($CXX or g++), on CUDA the triton package."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--runtime.compile on CUDA needs the triton package; it is missing")
        return
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:  # inductor's InvalidCxxCompiler, or a failure to run one
        raise ConfigError(
            "--runtime.compile on the CPU needs a C++ compiler ($CXX or g++); none runs here"
        ) from error


def compile_model(model: nn.Module) -> None:
    """torch.compile `model` in place (`nn.Module.compile`: its state dict and parameters keep
    their names, so checkpoints and data parallelism see the same model), and the chunked
    kernel's elementwise work on each chunk (`attention.fuse_elementwise`)."""
    model.compile()
    attention.fuse_elementwise()


def choose_attn_impl(requested: str, precision: str) -> tuple[str, str]:
    """The kernel to run and why: `auto` is the chunked kernel at every precision (under
    autocast its matrix products run in the autocast dtype, its softmax normaliser, span-mask
    sums and gradient accumulators in float32)."""
    if requested != "auto":
        return requested, "asked for"
    return "chunked", f"auto in {precision}"


@dataclass(frozen=True)
class Runtime:
    """Resolved runtime settings."""

    device: torch.device
    precision: str
    """fp32, bf16, fp16 or fp64 (`RuntimeConfig.precision`)."""
    attn_impl: str
    reason: str
    """Why this kernel: asked for, or what `auto` means here."""
    flush_denormal: bool = False
    """Subnormal floats are flushed to zero (CPU only, process-wide)."""
    compile: bool = False
    """The model runs under torch.compile (`prepare` applies it)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def prepare(self, model: ModuleT) -> ModuleT:
        """`model` on this device in the weight dtype, compiled if asked for."""
        model = model.to(self.device, self.weight_dtype)
        if self.compile:
            compile_model(model)
        return model

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the weights: float64 in an fp64 run, else float32 (bf16 and fp16 are
        autocasts over float32 weights)."""
        return torch.float64 if self.precision == "fp64" else torch.float32

    @property
    def loss_scaling(self) -> bool:
        """Whether the loss is scaled for backward (fp16: its gradients would underflow)."""
        return self.precision == "fp16"

    def log(self) -> None:
        """Say which kernel runs and why (once the command's input is known to be good)."""
        log.info(
            "attention kernel: %s (%s); %s on %s%s%s",
            self.attn_impl,
            self.reason,
            self.precision,
            self.device,
            ", subnormals flushed to zero" if self.flush_denormal else "",
            ", compiled (the first steps include compilation)" if self.compile else "",
        )


def check(config: RuntimeConfig, local_rank: int | None = None) -> torch.device:
    """Refuse what this machine cannot run (the device, fp16 off CUDA, compiling without a
    compiler) before a command touches any file; returns the device."""
    device = resolve_device(config.device, local_rank)
    require_precision(config.precision, device)
    if config.compile:
        require_compiler(device)
    return device


def resolve(config: RuntimeConfig, local_rank: int | None = None) -> Runtime:
    """The device, precision and kernel of `config` (for the process of `local_rank` in a
    data-parallel job)."""
    device = check(config, local_rank)
    impl, reason = choose_attn_impl(config.attn_impl, config.precision)
    flush = False
    if device.type == "cpu":
        supported = torch.set_flush_denormal(config.flush_denormal)
        flush = config.flush_denormal and supported
    return Runtime(
        device=device,
        precision=config.precision,
        attn_impl=impl,
        reason=reason,
        flush_denormal=flush,
        compile=config.compile,
    )
