"""Sharded, resumable outputs.

Every long stage splits its items into fixed-size *work units* (a deterministic function of the
sorted inputs). A unit is written into a temporary folder and renamed when complete, so a killed
run leaves no half-written unit and a rerun skips finished ones. Units are spread over processes by
``unit % world == rank`` (``--shard/--num-shards`` or RANK/WORLD_SIZE from torchrun); a merge step
joins them. Because units do not depend on the number of processes, two shards merged equal one
unsharded run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShardSpec:
    """Which share of the work units this process owns."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"invalid shard {self.rank} of {self.world}: need 0 <= shard < num_shards")

    def owns(self, unit: int) -> bool:
        return unit % self.world == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_shard(shard: int | None = None, num_shards: int | None = None) -> ShardSpec:
    """Explicit ``--shard i --num-shards n`` wins; otherwise RANK/WORLD_SIZE (torchrun); else 0 of 1."""
    if shard is not None or num_shards is not None:
        return ShardSpec(rank=int(shard or 0), world=int(num_shards or 1))
    return ShardSpec(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)))


def unit_ranges(n_items: int, unit_size: int) -> list[tuple[int, int]]:
    """[start, stop) item ranges of each work unit."""
    if unit_size < 1:
        raise ValueError(f"unit size must be >= 1, got {unit_size}")
    return [(s, min(s + unit_size, n_items)) for s in range(0, n_items, unit_size)]


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; rename it to ``final`` only if the block finishes without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # another process finished the same unit first: keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary file path; rename it to ``final`` when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def clean_stale_tmp(folder: Path) -> None:
    """Remove temporary leftovers of killed runs (names start with '.' and contain '.tmp-')."""
    folder = Path(folder)
    if not folder.exists():
        return
    for p in folder.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@dataclass(frozen=True)
class UnitPlan:
    """The work units of one stage phase: where each unit's output lives and who owns it.

    One helper for the unit / shard / merge protocol of every stage: a unit's output is a file
    (``suffix`` ".npy", ".parquet") or a folder (``suffix`` ""), written atomically, so "done"
    simply means "exists"; ``todo()`` is this process's share still to do, ``missing()`` every unit
    not yet written by anyone (the merge waits for none to be missing).
    """

    folder: Path
    prefix: str
    n_units: int
    shard: ShardSpec
    suffix: str = ""

    def path(self, unit: int) -> Path:
        return Path(self.folder) / f"{self.prefix}-{unit:05d}{self.suffix}"

    def done(self, unit: int) -> bool:
        return self.path(unit).exists()

    def todo(self, include_others: bool = False) -> list[int]:
        """Units still to do by this process (``include_others``: also the ones other shards own,
        after this process's own, for a main process that finishes what nobody else did)."""
        own = [u for u in range(self.n_units) if self.shard.owns(u) and not self.done(u)]
        if not include_others:
            return own
        return own + [u for u in range(self.n_units) if not self.shard.owns(u) and not self.done(u)]

    def missing(self) -> list[int]:
        return [u for u in range(self.n_units) if not self.done(u)]

    def complete(self) -> bool:
        return not self.missing()

    @contextlib.contextmanager
    def write(self, unit: int) -> Iterator[Path]:
        """A temporary path for the unit's output, renamed into place when the block succeeds."""
        final = self.path(unit)
        ctx = atomic_file(final) if self.suffix else atomic_dir(final)
        with ctx as tmp:
            yield tmp

    def waiting(self, stage: str) -> dict[str, object]:
        """The summary of a process that cannot go on before other shards finish their units."""
        missing = self.missing()
        return {"stage": stage, "status": "waiting_for_shards", "phase": self.prefix,
                "missing_units": [self.path(u).name for u in missing],
                "note": f"{len(missing)} of {self.n_units} {self.prefix} units are not written yet; rerun "
                        "this command (any shard) once the other shards have finished"}
