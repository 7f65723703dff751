"""Reading the benchmarks' files: the load report every reader returns, and small file helpers.

Every task reader returns ``(examples, LoadReport)``. Bad items never crash deep inside: each is
either skipped with a record (file, line, reason) or counted as a note when the item is still
usable (e.g. a VQA answer outside the vocabulary is dropped from the targets only).
``LoadReport.write_rejected(path)`` writes the records as ``rejected.jsonl``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from muvla.utils.shards import atomic_file

T = TypeVar("T")

NO_REGIONS = "image has no regions"

# Loader callback: True when the region store holds regions for an image id (as the file gives it).
HasRegions = Callable[[Any], bool]


@dataclass
class Record:
    """One rejected item: where it is and why. ``line`` is 1-based for line files, the 0-based
    list index for JSON arrays, None when unknown; ``key`` names the item (e.g. question_id=5)."""

    file: str
    line: int | None
    reason: str
    key: str = ""


@dataclass
class LoadReport:
    """What a loader kept, skipped (with records) and merely noted (counts only)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    records: list[Record] = field(default_factory=list)

    def skip(self, file: str | Path, line: int | None, reason: str, key: str = "") -> None:
        self.skipped[reason] += 1
        self.records.append(Record(str(file), line, reason, key))

    def note(self, reason: str, n: int = 1) -> None:
        self.notes[reason] += n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "n_skipped": self.n_skipped,
                "notes": dict(self.notes)}

    def write_rejected(self, path: str | Path) -> Path:
        """Write records as rejected.jsonl ({"file", "line", "reason", "key"} per line)."""
        path = Path(path)
        with atomic_file(path) as tmp:
            tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records), encoding="utf-8")
        return path

    def summary(self) -> str:
        parts = [f"kept {self.kept}"]
        parts += [f"skipped {n} ({reason})" for reason, n in sorted(self.skipped.items())]
        parts += [f"noted {n} ({reason})" for reason, n in sorted(self.notes.items())]
        return ", ".join(parts)


def merge_reports(reports: Sequence[LoadReport]) -> LoadReport:
    """One LoadReport over several files (counts summed, records concatenated)."""
    out = LoadReport()
    for r in reports:
        out.kept += r.kept
        out.skipped.update(r.skipped)
        out.notes.update(r.notes)
        out.records.extend(r.records)
    return out


def load_each(results: Iterable[tuple[list[T], LoadReport]]) -> tuple[list[T], LoadReport]:
    """The examples of several files' ``(examples, report)`` results, in file order, and one merged report."""
    results = list(results)
    return [ex for exs, _ in results for ex in exs], merge_reports([rep for _, rep in results])


def read_json(path: str | Path) -> Any:
    """A whole JSON file; a missing file or invalid JSON is one clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def iter_lines(path: str | Path, report: LoadReport) -> Iterator[tuple[int, str]]:
    """Yield (1-based line, text) of non-blank lines; a line that is not UTF-8 is recorded as skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.skip(path, lineno, "invalid UTF-8")
                continue
            if line.strip():
                yield lineno, line


def iter_jsonl(path: str | Path, report: LoadReport) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line, object); bad lines are recorded as skipped, blank lines ignored."""
    for lineno, line in iter_lines(path, report):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            report.skip(path, lineno, "invalid JSON line")
            continue
        if not isinstance(obj, dict):
            report.skip(path, lineno, "line is not a JSON object")
            continue
        yield lineno, obj


def missing_field(obj: dict, keys: Sequence[str], int_keys: Sequence[str] = ()) -> str | None:
    """Reason why ``obj`` lacks a field (or an integer id field), or None when it is complete."""
    for k in keys:
        if k not in obj or obj[k] is None:
            return f"missing field '{k}'"
    for k in int_keys:
        v = obj[k]
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())):
            return f"field '{k}' is not an integer id ({v!r})"
    return None


def int_or(value: Any, default: int) -> int:
    """Optional integer field: its value when it is one, else ``default``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return default
