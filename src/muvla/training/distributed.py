"""Process-group helpers for torchrun (DDP) and single-process runs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. With WORLD_SIZE > 1 we join
the default process group: NCCL when CUDA is available (one GPU per local rank), gloo on CPU. A
plain ``python`` run is rank 0 of 1 and never creates a process group, so every helper below is a
cheap no-op there and the same training code runs unchanged on a laptop.

Leaving no work behind (gloo). Gloo runs each collective on one of its worker threads, and that thread
drops the work (with its references to the collective's tensors) a little after the caller has been
told the collective is done; a ``barrier`` issued meanwhile even keeps the earlier work alive until the
barrier's own work is dropped, again on a worker thread, after ``barrier()`` has returned. A tensor
Python has seen has a PyObject, and in the torch we pin (2.13) dropping the last extra C++ reference to
it decrefs that PyObject, which takes the GIL. If that happens once the interpreter is finalising,
CPython ends the worker thread with ``pthread_exit`` inside a ``noexcept`` destructor and the process
dies with "terminate called without an active exception" (SIGABRT), on the rank that exits first. So
after each collective below, ``_run_collective`` waits until the gloo worker has let go of its
tensors; with DDP's own collectives on C++-only tensors, no worker then touches a Python object once
a script has finished. ``cleanup_distributed`` ends a job: barrier, then destroy the group.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from muvla.utils.device import pick_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it drives."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group exists (world == 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (idempotent) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(rank=0, world=1, local_rank=0, device=dev, backend=None)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this GPU and avoids a lazy init
        dist.init_process_group(**kwargs)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                    device=dev, backend=dist.get_backend())


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Rank 0 writes files and shows progress; the others only compute."""
    return get_rank() == 0


# How long a collective waits for gloo's worker thread to drop its tensors (normally microseconds;
# longer only on a starved CPU) before it gives up, warns once and returns.
RELEASE_TIMEOUT_S = 30.0
_warned_release = False


def _refs(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """(C++ references, Python references) of each tensor: back to these once no worker holds them."""
    return [(t._use_count(), sys.getrefcount(t)) for t in tensors]


def _still_held(tensors: Sequence[torch.Tensor], before: list[tuple[int, int]]) -> bool:
    return any(cpp > cpp0 or py > py0 for (cpp, py), (cpp0, py0) in zip(_refs(tensors), before))


def _run_collective(op: Callable[[], Any], tensors: Sequence[torch.Tensor]) -> None:
    """Run the blocking collective ``op`` on ``tensors`` and return once no gloo worker refers to them.

    The worker thread releases a finished work (and with it its references, each release of the
    last one touching the tensor's PyObject under the GIL) a little after ``op`` returns; sleeping
    here hands it the GIL. After this returns no worker thread will touch these tensors' PyObjects
    again, so a rank may exit right after its last collective (see the module docstring).
    """
    global _warned_release
    before = _refs(tensors)
    op()
    if dist.get_backend() != "gloo":  # only gloo's worker threads are known to do this (and testable here)
        return
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    pause = 1e-5
    while _still_held(tensors, before):
        if time.monotonic() > deadline:
            if not _warned_release:
                warnings.warn(f"a gloo worker thread still held a collective's tensors after {RELEASE_TIMEOUT_S:.0f} s; "
                              "exiting now could abort the process", RuntimeWarning, stacklevel=3)
                _warned_release = True
            return
        time.sleep(pause)  # releases the GIL, which the worker may need for the release
        pause = min(pause * 2, 1e-3)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, also returned); identity on one process."""
    if is_dist():
        _run_collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM), [tensor])
    return tensor


def _to_bytes_tensor(obj: Any) -> torch.Tensor:
    """``obj`` pickled into a uint8 tensor whose memory torch owns (no Python buffer behind it)."""
    return torch.tensor(np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8))


def _from_bytes_tensor(t: torch.Tensor, size: int) -> Any:
    return pickle.loads(t[:size].numpy().tobytes())


def _device() -> torch.device:
    """Where object collectives put their tensors: this rank's GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable) in rank order (a list of one on a single process)."""
    if not is_dist():
        return [obj]
    world, dev = dist.get_world_size(), _device()
    data = _to_bytes_tensor(obj)
    size = torch.tensor([data.numel()], dtype=torch.long, device=dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    _run_collective(lambda: dist.all_gather(sizes, size), [size, *sizes])
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=dev)
    padded[:data.numel()] = data.to(dev)
    outs = [torch.empty(max(lengths), dtype=torch.uint8, device=dev) for _ in range(world)]
    _run_collective(lambda: dist.all_gather(outs, padded), [padded, *outs])
    return [_from_bytes_tensor(o.cpu(), n) for o, n in zip(outs, lengths)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank (so all ranks act on one decision, e.g. which checkpoint)."""
    if not is_dist():
        return obj
    dev = _device()
    data = _to_bytes_tensor(obj) if dist.get_rank() == src else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.long, device=dev)
    _run_collective(lambda: dist.broadcast(size, src=src), [size])
    payload = data.to(dev) if data is not None else torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    _run_collective(lambda: dist.broadcast(payload, src=src), [payload])
    return obj if dist.get_rank() == src else _from_bytes_tensor(payload.cpu(), int(size.item()))


def cleanup_distributed(wait_for_all: bool = True) -> None:
    """End this process's part of the job: wait for every rank (``wait_for_all``), then leave the group.

    Call it once at the end of a torchrun script on every rank (``muvla``'s commands do). Pass
    ``wait_for_all=False`` on a failure path, where the other ranks may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_all and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
