"""Where torch runs: the one device choice and a run's CPU thread count.

Both live here, below every stage and the training engine, so the regions stage, training,
fine-tuning and evaluation share one rule (a stage may not import ``muvla.training``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from muvla.utils.config import ConfigError

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
