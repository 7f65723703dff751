"""Where and how torch runs: the one device choice, a run's CPU thread count, its precision.

Both live here, below every stage and the training engine, so the regions stage, training,
fine-tuning and evaluation share one rule (a stage may not import ``muvla.training``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from muvla.utils.config import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
NUM_THREADS_HELP = "torch CPU threads for this run (default: torch's choice)"


def pick_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' = this rank's GPU when CUDA exists, else CPU; 'cpu', 'cuda' or 'cuda:<i>' force the choice.

    The one place that decides the device, for training, evaluation and inference alike;
    ``local_rank`` (which GPU 'auto' and 'cuda' mean) defaults to torchrun's LOCAL_RANK.
    """
    name, colon, index = device.partition(":")
    if name not in DEVICES or (colon and not (name == "cuda" and index.isdigit())):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:<index>, got {device!r}")
    use_cuda = torch.cuda.is_available() if name == "auto" else name == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = int(index) if index else local_rank % torch.cuda.device_count()
    if gpu >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def check_num_threads(num_threads: int | None) -> None:
    """The ``num_threads`` rule of every config that has the setting (None = torch's default)."""
    if num_threads is not None and num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1 (or unset for torch's default), got {num_threads}")


@contextlib.contextmanager
def torch_num_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch CPU threads (None: leave torch's choice).

    Oversubscribed CPUs make torch's thread pool spin (measured 10x slower on a busy 2-core box), so
    the count is a setting; it is process-global, so the previous count is restored afterwards.
    """
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------- precision

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto: bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU "
                  "with bf16; else fp16 on CUDA, fp32 on CPU), with fp32 weights and fp32 losses; fp32; bf16; "
                  "fp16 (CUDA only)")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and
    slower than fp32, so ``auto`` keeps fp32 there."""
    if os.environ.get("MUVLA_CPU_BF16") in ("0", "1"):  # force either way (tests, odd virtual machines)
        return os.environ["MUVLA_CPU_BF16"] == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a choice means on ``device``: 'fp32', 'bf16' or 'fp16' (see ``PRECISION_HELP``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if cpu_has_native_bf16():
        return "bf16"
    _log_fp32_fallback()
    return "fp32"


@functools.lru_cache(maxsize=1)
def _log_fp32_fallback() -> None:
    logger.info("precision auto: this CPU has no native bf16 (avx512_bf16 / amx_bf16); using fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for a forward pass at a resolved ``precision`` (fp32: no autocast). Weights stay
    fp32; matrix products run in bf16/fp16; softmax, norms and losses stay fp32 (torch's autocast lists)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
