"""The step protocol: what every output was built from, so a rerun never reuses what other settings made.

Every step (the corpus stages, ``pairs``, ``pretrain``, ``finetune``, ``evaluate``, each step of
``experiment`` and ``demo``) runs through one driver, :func:`run_step`. A step supplies only what is
its own (a :class:`Step`: its output-changing settings, the digests of its inputs, its final files,
and a body that does the work); the driver owns the rest. Each step folder holds ``build.json``: the stage's output-changing settings, the digest of every
input it read (upstream stage outputs, input files) and, once the stage has finished, the digest of
its own outputs. Before doing any work a stage compares that record with what it is asked to do:

- no folder yet (or an empty one): start fresh;
- same settings, same inputs: resume (finished units are kept) or, when complete, reuse;
- same settings, an input changed (e.g. retrieval was redone): the old outputs are stale and are
  removed, the stage is redone, and one line says so;
- different settings: refuse with one line naming the difference, unless ``overwrite`` is set.

The rule is the same for every step: a changed input redoes the step, a changed own setting is
refused (one line naming it) unless ``overwrite``. Two documented exceptions: the regions stage
refuses on changed inputs too (its work is expensive and its inputs are the user's images), and a
training step asked to ``resume`` may continue its checkpoints with a longer schedule
(``Step.resume_may_change``), which is logged.

A consumer (the next stage, pre-training, fine-tuning) reads an upstream record with
:func:`finished_digest`, which also checks the files still match it, and the upstream's own inputs
from its ``sources`` (never from another step's ``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from muvla.utils.config import ConfigError, save_config, setting
from muvla.utils.shards import ShardSpec, atomic_file, resolve_shard

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
# Files up to this size are hashed whole; bigger ones (VinVL TSVs of many GB) by size + head + tail.
FULL_HASH_LIMIT = 64 << 20
EDGE_BYTES = 4 << 20


def digest_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()[:20]


def digest_json(obj: Any) -> str:
    return digest_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))


def digest_file(path: Path) -> str:
    """Content digest of an input file (size + head + tail for files above ``FULL_HASH_LIMIT``)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()[:20]


def digest_files(paths: Iterable[Path]) -> str:
    """One digest over several output files (names and contents, in the given order)."""
    return digest_json([[Path(p).name, digest_file(p)] for p in paths])


@dataclass(kw_only=True)
class OutputPolicy:
    """Whether a stage may replace an existing output that was built differently (every stage has it)."""

    overwrite: bool = setting(False, help="replace an existing output that was built with other settings",
                              runtime=True)


@dataclass(kw_only=True)
class StageRun(OutputPolicy):
    """How a sharded stage process runs: its shard, and the output policy. Changes nothing it writes."""

    shard: int | None = setting(None, help="this process's shard (default: RANK from torchrun, else 0)",
                                runtime=True)
    num_shards: int | None = setting(None, help="number of shards (default: WORLD_SIZE from torchrun, else 1)",
                                     runtime=True)

    def shard_spec(self) -> ShardSpec:
        try:
            return resolve_shard(self.shard, self.num_shards)
        except ValueError as err:
            raise ConfigError(str(err)) from err


@dataclass
class BuildRecord:
    """``build.json`` of one stage output folder."""

    stage: str
    settings: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> digest
    complete: bool = False
    digest: str | None = None  # digest of the outputs, set when complete
    sources: dict[str, str] = field(default_factory=dict)  # input name -> path it was read from (not compared)
    as_written: BuildRecord | None = field(default=None, repr=False, compare=False)  # before renaming aliases

    def recipe(self) -> dict[str, Any]:
        return {"stage": self.stage, "settings": self.settings, "inputs": self.inputs}

    @classmethod
    def read(cls, folder: Path) -> BuildRecord | None:
        path = Path(folder) / BUILD_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(stage=str(data["stage"]), settings=dict(data["settings"]), inputs=dict(data["inputs"]),
                       complete=bool(data.get("complete", False)), digest=data.get("digest"),
                       sources={str(k): str(v) for k, v in dict(data.get("sources") or {}).items()})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({err}); delete the folder or pass --overwrite") from err

    def write(self, folder: Path) -> None:
        import muvla

        data = {k: v for k, v in asdict(self).items() if k != "as_written"}
        with atomic_file(Path(folder) / BUILD_FILE) as tmp:
            tmp.write_text(json.dumps({**data, "muvla_version": muvla.__version__}, indent=1,
                                      sort_keys=True, default=str) + "\n", encoding="utf-8")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}={old.get(k)!r} (this run: {new.get(k)!r})" for k in keys if old.get(k) != new.get(k)]


@dataclass
class StageStart:
    """What :func:`prepare_output` decided: ``fresh``, ``resume`` or ``reuse`` (complete, same recipe)."""

    status: str
    note: str | None = None


def prepare_output(folder: Path, record: BuildRecord, *, overwrite: bool, is_main: bool,
                   clear: Callable[[BuildRecord | None], None], outputs: Sequence[Path] = (),
                   work: Sequence[Path] = (), redo_on_input_change: bool = True,
                   resume_may_change: frozenset[str] = frozenset(), resume_requested: bool = False,
                   aliases: dict[str, dict[Any, Any]] | None = None,
                   wait_timeout_s: float = 600.0, poll_s: float = 1.0) -> StageStart:
    """Compare the folder's ``build.json`` with this run's recipe and act as the module docstring says.

    ``clear(old_record)`` removes the stage's old outputs (it may keep parts that do not depend on
    what changed, e.g. sentence embeddings when only the regions changed); only the main process
    calls it, the others wait until the main process has written this run's record. ``outputs`` are
    the final files whose digest the record holds (checked before a complete output is reused);
    ``work`` the folders of unit parts (a folder without a record but with parts holds work of an
    unknown generation: only the main process may decide to remove it).
    ``redo_on_input_change=False`` refuses instead of redoing (for stages whose work is expensive and
    whose inputs are the user's raw files, e.g. detecting regions). ``resume_requested`` with only
    ``resume_may_change`` settings changed continues the unfinished work (a training schedule made
    longer) instead of refusing. ``aliases`` (setting -> {deprecated value: current value}) make a
    record written under an old name of a value the same as this run's.
    """
    folder = Path(folder)
    old = BuildRecord.read(folder) if folder.is_dir() else None
    if old is not None and aliases:
        old = _with_current_names(old, aliases)
    if not is_main:
        if old is None and not _has_work(outputs, work):  # a fresh folder: any process may start it
            folder.mkdir(parents=True, exist_ok=True)
            record.write(folder)
            return StageStart("fresh")
        return _wait_for_record(folder, record, overwrite, wait_timeout_s, poll_s)
    folder.mkdir(parents=True, exist_ok=True)
    start = StageStart("fresh")
    if old is None:
        leftovers = [Path(p).name for p in outputs if Path(p).exists()]
        if leftovers and not overwrite:
            raise ConfigError(f"{folder} already holds {', '.join(leftovers)} but no {BUILD_FILE}, so nothing says "
                              "what it was built from; choose another output folder or pass --overwrite to "
                              "replace it")
        if _has_work(outputs, work):
            clear(None)  # unit parts of an unknown generation must not be mixed in
    elif old.stage != record.stage or old.settings != record.settings:
        what = ([f"stage={old.stage!r} (this run: {record.stage!r})"] if old.stage != record.stage
                else _differences(old.settings, record.settings))
        changed = {k for k in set(old.settings) | set(record.settings) if old.settings.get(k) != record.settings.get(k)}
        if resume_requested and old.stage == record.stage and changed <= resume_may_change \
                and old.inputs == record.inputs and _has_work((), work):
            logger.warning("%s: continuing its unfinished work with %s", folder, "; ".join(what[:4]))
            record.complete, record.digest = False, None
            record.write(folder)
            return StageStart("resume", f"continuing with {'; '.join(what[:4])}")
        if not overwrite:
            raise ConfigError(f"{folder} was built with other settings: {'; '.join(what[:4])}; pass --overwrite "
                              "to rebuild it (later steps are then redone), or choose another output folder")
        clear(old)
        start = StageStart("fresh", f"{folder}: settings changed ({'; '.join(what[:4])}); the old output was "
                                    "removed and is being rebuilt")
    elif old.inputs != record.inputs:
        changed = sorted(k for k in set(old.inputs) | set(record.inputs) if old.inputs.get(k) != record.inputs.get(k))
        if not redo_on_input_change and not overwrite:
            raise ConfigError(f"{folder} was built from other inputs ({', '.join(changed)} changed); pass "
                              "--overwrite to rebuild it, or choose another output folder")
        clear(old)
        start = StageStart("fresh", f"{folder}: its input(s) {', '.join(changed)} changed since it was built; "
                                    "the old output was removed and is being redone")
    elif old.complete and old.digest and all(Path(p).is_file() for p in outputs) \
            and _output_digest(old.as_written or old, outputs) == old.digest:
        return StageStart("reuse")
    else:
        start = StageStart("resume")
    if start.note:
        logger.warning(start.note)
    record.complete, record.digest = False, None
    record.write(folder)
    return start


def _with_current_names(old: BuildRecord, aliases: dict[str, dict[Any, Any]]) -> BuildRecord:
    """``old`` with deprecated setting values renamed; ``as_written`` keeps the record its digest was
    computed from."""
    renamed = {k: aliases.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in old.settings.items()}
    if renamed == old.settings:
        return old
    return dataclasses.replace(old, settings=renamed, as_written=old)


def _has_work(outputs: Sequence[Path], work: Sequence[Path]) -> bool:
    return any(Path(p).exists() for p in outputs) or any(Path(w).is_dir() and any(Path(w).iterdir()) for w in work)


def _wait_for_record(folder: Path, record: BuildRecord, overwrite: bool, timeout_s: float,
                     poll_s: float) -> StageStart:
    """Non-main process: wait until the main process has prepared the folder for this recipe."""
    deadline = time.monotonic() + timeout_s
    while True:
        old = BuildRecord.read(folder) if folder.is_dir() else None
        if old is not None and old.recipe() == record.recipe():
            return StageStart("reuse" if old.complete else "resume")
        if old is not None and old.settings != record.settings and not overwrite:
            raise ConfigError(f"{folder} was built with other settings: "
                              f"{'; '.join(_differences(old.settings, record.settings)[:4])}; pass --overwrite")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for the main process to prepare {folder}")
        time.sleep(poll_s)


def _output_digest(record: BuildRecord, outputs: Sequence[Path]) -> str:
    return digest_json({"recipe": record.recipe(), "files": digest_files(outputs)})


def finish_output(folder: Path, record: BuildRecord, outputs: Sequence[Path]) -> str:
    """Mark the stage complete: record the digest of its final outputs. Returns the digest."""
    record.complete = True
    record.digest = _output_digest(record, outputs)
    record.write(folder)
    return record.digest


def finished_digest(folder: Path, stage: str | Sequence[str], outputs: Sequence[Path]) -> str:
    """The digest of a finished upstream output; one clear line when it is missing, unfinished,
    of another kind, or modified since its stage finished."""
    folder = Path(folder)
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    record = BuildRecord.read(folder) if folder.is_dir() else None
    wanted = " or ".join(stages)
    if record is None:
        raise ConfigError(f"{folder} is not a finished {wanted} output (no {BUILD_FILE}): run the {wanted} "
                          "stage first")
    if record.stage not in stages:
        raise ConfigError(f"{folder} holds a {record.stage} output, expected {wanted}")
    if not record.complete:
        raise ConfigError(f"{folder}: the {record.stage} stage has not finished (rerun it to complete it)")
    missing = [Path(p).name for p in outputs if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"{folder}: {', '.join(missing)} missing although {BUILD_FILE} says the stage finished; "
                          "rerun the stage")
    if _output_digest(record, outputs) != record.digest:
        raise ConfigError(f"{folder}: the files changed after the {record.stage} stage finished "
                          f"({BUILD_FILE} digest differs); rerun the stage with --overwrite")
    return str(record.digest)


def reused_summary(folder: Path) -> dict[str, Any]:
    """The stored ``summary.json`` of an up-to-date output, saying nothing was done this time."""
    path = Path(folder) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    return {**{k: (0 if k.endswith("_now") else v) for k, v in summary.items()}, "reused": True}


# ---------------------------------------------------------------------------------------------- the driver


def summary_path(folder: Path, rank: int = 0) -> Path:
    """``summary.json`` of the main process; ``summary.rank-00001.json`` etc. of the others."""
    return Path(folder) / ("summary.json" if rank == 0 else f"summary.rank-{rank:05d}.json")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")


@dataclass
class StepResult:
    """What a step's body returns: its summary, and whether its output is now complete (False: this
    process did its share and waits for other shards; a rerun continues)."""

    summary: dict[str, Any]
    complete: bool = True


@dataclass
class Step:
    """One run of a step: everything :func:`run_step` needs that is the step's own.

    ``settings`` are the output-changing settings, ``inputs`` the digests of what it reads
    (``sources``: where each was read from, recorded for the next step), ``outputs`` the final files
    whose digest the record holds, ``work`` folders of unit parts or checkpoints. ``clear`` removes
    an old generation (default: ``outputs``, ``work`` and the summaries). ``config`` is written as
    ``config.yaml`` and loads back with ``--config``.
    """

    name: str
    folder: Path
    settings: dict[str, Any]
    inputs: dict[str, str]
    outputs: Sequence[Path]
    config: Any
    sources: dict[str, Any] = field(default_factory=dict)
    work: Sequence[Path] = ()
    clear: Callable[[BuildRecord | None], None] | None = None
    redo_on_input_change: bool = True
    resume_may_change: frozenset[str] = frozenset()
    aliases: dict[str, dict[Any, Any]] = field(default_factory=dict)  # setting -> {old value name: current}

    def record(self) -> BuildRecord:
        return BuildRecord(self.name, self.settings, self.inputs,
                           sources={k: str(v) for k, v in self.sources.items() if v is not None})

    def remove_outputs(self, _old: BuildRecord | None = None) -> None:
        """The default ``clear``: the final files, the work folders and every summary."""
        import shutil

        for path in [*self.outputs, *self.work, *Path(self.folder).glob("summary*.json")]:
            path = Path(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def run_step(step: Step, body: Callable[[StageStart], StepResult], *, overwrite: bool, rank: int = 0,
             resume_requested: bool = False, wait_timeout_s: float = 600.0) -> dict[str, Any]:
    """Run one step under the protocol (module docstring): compare ``build.json`` with this run,
    reuse / resume / redo / refuse, write ``config.yaml``, call ``body`` for the work, write the
    summary and, when complete, the record's output digest. Returns the summary; a reused output's
    stored summary comes back with ``reused: True``."""
    folder = Path(step.folder)
    record = step.record()
    start = prepare_output(folder, record, overwrite=overwrite, is_main=rank == 0,
                           clear=step.clear or step.remove_outputs, outputs=step.outputs, work=step.work,
                           redo_on_input_change=step.redo_on_input_change,
                           resume_may_change=step.resume_may_change, resume_requested=resume_requested,
                           aliases=step.aliases,
                           wait_timeout_s=wait_timeout_s)
    if start.status == "reuse":
        if rank == 0:
            logger.info("%s: up to date (same settings and inputs); reusing %s", step.name, folder)
        return reused_summary(folder)
    if start.status == "resume" and rank == 0:
        logger.info("%s: resuming the unfinished output in %s", step.name, folder)
    if rank == 0:
        save_config(step.config, folder, inputs=step.sources)
    result = body(start)
    summary = {"stage": step.name, **result.summary}
    if result.complete and rank == 0:
        write_summary(summary_path(folder), summary)
        finish_output(folder, record, step.outputs)
    else:
        write_summary(summary_path(folder, rank), summary)
    return summary


def recorded_source(folder: Path, name: str) -> Path | None:
    """Where the step in ``folder`` read its input ``name`` from (its ``build.json`` sources)."""
    record = BuildRecord.read(folder) if Path(folder).is_dir() else None
    value = record.sources.get(name) if record is not None else None
    return Path(value) if value else None


def digest_folder(folder: Path) -> str:
    """One digest over the regular files directly inside ``folder`` (names and contents)."""
    return digest_files(sorted(p for p in Path(folder).iterdir() if p.is_file()))


def digest_model(model: str | Path) -> str:
    """What a model argument denotes: a folder's files (a run folder: its ``model/``), else the name
    itself (a bundled or cached checkpoint such as ``default``)."""
    path = Path(model)
    for folder in (path / "model", path):
        if (folder / "config.json").is_file():
            return digest_folder(folder)
    return digest_json({"name": str(model)})
