"""The data order: deterministic, rank-sharded batches that restart exactly in the middle of an epoch.

Exact resumption rests on two choices made here: the order is a pure function of (seed, epoch, rank)
and a checkpoint records how many batches of the epoch were consumed; and the random numbers used
while building a batch (masking in a collate function, a random sentence in a dataset) come from the
global ``random`` / ``numpy`` / ``torch`` RNGs re-seeded per batch from (seed, epoch, rank, batch
position), so they depend neither on DataLoader workers nor on restarts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from muvla.utils.config import ConfigError


@dataclass(frozen=True)
class BatchKey:
    """One micro-batch: its place in the data stream and the dataset indices it holds."""

    epoch: int
    position: int  # batch index within this rank's epoch
    rank: int
    indices: tuple[int, ...]


class ResumableDistributedSampler(Sampler[BatchKey]):
    """Deterministic, rank-sharded batches that can restart in the middle of an epoch.

    Each epoch shuffles all indices with ``seed + epoch``. To give every rank the same number of
    batches (DDP needs equal step counts), the permutation is padded by repeating its first
    indices until its length is a multiple of ``world``; rank r then takes every world-th index
    from position r. So with padding a few samples are seen twice per epoch; none are dropped.
    The rank's list is cut into batches of ``batch_size``; the last partial batch is kept unless
    ``drop_last``. ``set_state(epoch, consumed_batches)`` makes the next iteration start there.
    Iterating yields :class:`BatchKey` items; ``batches(epoch)`` gives the plain index lists.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 drop_last: bool = False) -> None:
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"invalid rank {rank} of world {world}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed_batches = 0
        if len(self) == 0:
            raise ValueError(f"{num_samples} samples over {world} rank(s) give fewer than batch_size="
                             f"{batch_size} per rank and drop_last is set: an epoch would be empty")

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(self.num_samples / self.world)

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on all ranks)."""
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)

    def rank_indices(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_samples, generator=gen).tolist()
        total = self.samples_per_rank * self.world
        while len(perm) < total:  # pad by repeating from the start (loops when num_samples < world)
            perm += perm[: total - len(perm)]
        return perm[self.rank::self.world]

    def batches(self, epoch: int) -> list[list[int]]:
        idx = self.rank_indices(epoch)
        return [idx[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]

    def set_state(self, epoch: int, consumed_batches: int) -> None:
        if not 0 <= consumed_batches <= len(self):
            raise ValueError(f"consumed_batches must be in [0, {len(self)}], got {consumed_batches}")
        self.epoch = epoch
        self.consumed_batches = consumed_batches

    def __iter__(self) -> Iterator[BatchKey]:
        # Snapshot the start now so that set_state during iteration only affects the next pass.
        epoch, start = self.epoch, self.consumed_batches
        keys = [BatchKey(epoch, pos, self.rank, tuple(b))
                for pos, b in enumerate(self.batches(epoch)) if pos >= start]
        return iter(keys)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed_batches": self.consumed_batches, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "world": self.world,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuse when the data order would differ (exact resume impossible)."""
        for key in ("seed", "num_samples", "batch_size", "world", "drop_last"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"cannot resume exactly: checkpoint has {key}={state[key]!r}, this run "
                                  f"has {getattr(self, key)!r} (the data order would change)")
        self.set_state(int(state["epoch"]), int(state["consumed_batches"]))


def batch_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A well-mixed 32-bit seed for one batch, so per-batch randomness is independent of restarts."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


class KeyedBatches(Dataset):
    """Turns a :class:`BatchKey` into ``(key, collated batch)``, seeding the global RNGs per batch.

    The RNG states are saved and restored around the work so that, with ``num_workers=0``, the
    main process's own random stream (dropout etc.) is not disturbed.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any], seed: int) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.seed = seed

    def __getitem__(self, key: BatchKey) -> tuple[BatchKey, Any]:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                s = batch_seed(self.seed, key.epoch, key.rank, key.position)
                random.seed(s)
                np.random.seed(s)
                torch.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also queues CUDA work
                try:
                    batch = self.collate_fn([self.dataset[i] for i in key.indices])
                except Exception as err:  # add where in the data stream it happened, then re-raise
                    shown = list(key.indices[:8]) + (["..."] if len(key.indices) > 8 else [])
                    raise RuntimeError(f"building batch {key.position} of epoch {key.epoch} on rank {key.rank} "
                                       f"(dataset indices {shown}) failed: {err!r}") from err
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return key, batch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def passthrough(x: Any) -> Any:
    """DataLoader collate for pre-collated items (module level so spawn workers can pickle it)."""
    return x
