"""Minimal readers of the stage outputs described in docs/DESIGN.md, for the report only.

The report reads the files directly (not through the stage packages) so that it can show a run whose
later stages are missing or half broken, and so that it only loads the rows it displays: a corpus run
may hold millions of sentences, and the report filters every parquet file to the shown images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class ReportError(ValueError):
    """A stage output exists but does not follow the DESIGN.md contract."""


@dataclass
class ImageEntry:
    """One row of the merged region index (``<regions>/index.parquet``)."""

    image_id: str
    file: str
    width: int
    height: int
    part: str
    row: int
    num_regions: int
    tags: list[str]


@dataclass
class RegionBoxes:
    """Boxes and detector scores of one image, cut to its real (unpadded) regions."""

    boxes: np.ndarray  # [n, 4] float32, x1 y1 x2 y2 in pixels
    scores: np.ndarray  # [n] float32


@dataclass
class MatchRow:
    """Region-phrase alignment of one retrieved sentence (one row of ``matches.parquet``)."""

    sentence_id: int
    region_phrase: list[int]
    region_sim: list[float]


@dataclass
class SentencePhrases:
    phrases: list[str]
    char_spans: list[tuple[int, int]]


@dataclass
class Metrics:
    """Parsed ``metrics.jsonl``: numeric series per key, plus the count of lines that were skipped."""

    steps: list[float] = field(default_factory=list)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    bad_lines: int = 0


def _read_table(path: Path, required: list[str], filters: list[tuple[str, str, Any]] | None = None,
                columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file and check its columns, so a wrong file fails with its name and the gap."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{path}: not a readable parquet file ({err})") from err
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ReportError(f"{path}: missing column(s) {missing}; found {schema.names}")
    try:
        return pq.read_table(path, columns=columns or required, filters=filters)
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{path}: could not read ({err})") from err


def count_rows(path: Path) -> int:
    """Row count from the parquet footer (cheap even for a huge sentence table)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{path}: not a readable parquet file ({err})") from err


def read_region_index(regions_dir: Path) -> list[ImageEntry]:
    """All rows of the merged region index, in file order."""
    cols = ["image_id", "file", "width", "height", "row", "num_regions", "tags", "part"]
    rows = _read_table(regions_dir / "index.parquet", cols).to_pylist()
    return [
        ImageEntry(image_id=str(r["image_id"]), file=str(r["file"]), width=int(r["width"]),
                   height=int(r["height"]), part=str(r["part"]), row=int(r["row"]),
                   num_regions=int(r["num_regions"]), tags=[str(t) for t in (r["tags"] or [])])
        for r in rows
    ]


class BoxReader:
    """Reads boxes/scores rows from the parts, memory-mapping each part's arrays once."""

    def __init__(self, regions_dir: Path) -> None:
        self.parts_dir = regions_dir / "parts"
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _part(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        if part not in self._cache:
            folder = self.parts_dir / part
            try:
                boxes = np.load(folder / "boxes.npy", mmap_mode="r")
                scores = np.load(folder / "scores.npy", mmap_mode="r")
            except (OSError, ValueError) as err:
                raise ReportError(f"{folder}: cannot read boxes.npy/scores.npy ({err})") from err
            if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.shape != boxes.shape[:2]:
                raise ReportError(f"{folder}: boxes {boxes.shape} / scores {scores.shape} are not [n, R, 4] / [n, R]")
            self._cache[part] = (boxes, scores)
        return self._cache[part]

    def read(self, entry: ImageEntry) -> RegionBoxes:
        boxes, scores = self._part(entry.part)
        if not 0 <= entry.row < boxes.shape[0]:
            raise ReportError(f"image {entry.image_id!r}: row {entry.row} outside part {entry.part} ({boxes.shape[0]} rows)")
        n = entry.num_regions
        if not 0 <= n <= boxes.shape[1]:
            raise ReportError(f"image {entry.image_id!r}: num_regions {n} outside 0..{boxes.shape[1]}")
        return RegionBoxes(boxes=np.asarray(boxes[entry.row, :n], dtype=np.float32),
                           scores=np.asarray(scores[entry.row, :n], dtype=np.float32))


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """JSON objects of a .jsonl file and the number of lines that were not JSON objects."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    return rows, bad


def read_sentences(path: Path, sentence_ids: list[int]) -> dict[int, tuple[str, str]]:
    """sentence_id -> (text, source), only for the ids asked for."""
    if not sentence_ids:
        return {}
    table = _read_table(path, ["sentence_id", "text", "source"],
                        filters=[("sentence_id", "in", sorted(set(sentence_ids)))])
    return {int(r["sentence_id"]): (str(r["text"]), str(r["source"])) for r in table.to_pylist()}


def read_topk_image_ids(path: Path) -> list[str]:
    """Sorted distinct image ids of a top-K table (used when the regions stage is missing)."""
    table = _read_table(path, ["image_id", "rank", "sentence_id", "score"], columns=["image_id"])
    return sorted({str(v) for v in table.column("image_id").unique().to_pylist()})


def read_topk(path: Path, image_ids: list[str]) -> dict[str, list[tuple[int, int, float]]]:
    """image_id -> [(rank, sentence_id, score)] sorted by rank, for the given images only."""
    if not image_ids:
        return {}
    table = _read_table(path, ["image_id", "rank", "sentence_id", "score"],
                        filters=[("image_id", "in", image_ids)])
    out: dict[str, list[tuple[int, int, float]]] = {}
    for r in table.to_pylist():
        out.setdefault(str(r["image_id"]), []).append((int(r["rank"]), int(r["sentence_id"]), float(r["score"])))
    for hits in out.values():
        hits.sort()
    return out


def read_sentence_phrases(path: Path, sentence_ids: list[int]) -> dict[int, SentencePhrases]:
    if not sentence_ids:
        return {}
    table = _read_table(path, ["sentence_id", "phrases", "char_spans"],
                        filters=[("sentence_id", "in", sorted(set(sentence_ids)))])
    out: dict[int, SentencePhrases] = {}
    for r in table.to_pylist():
        phrases = [str(p) for p in (r["phrases"] or [])]
        # keep one entry per phrase so phrase indices stay aligned; a malformed span becomes (-1, -1)
        spans = [(int(s[0]), int(s[1])) if s is not None and len(s) == 2 else (-1, -1)
                 for s in (r["char_spans"] or [])]
        out[int(r["sentence_id"])] = SentencePhrases(phrases=phrases, char_spans=spans)
    return out


def read_matches(path: Path, image_ids: list[str]) -> dict[tuple[str, int], MatchRow]:
    """(image_id, rank) -> region-phrase alignment of that retrieved sentence."""
    if not image_ids:
        return {}
    table = _read_table(path, ["image_id", "rank", "sentence_id", "region_phrase", "region_sim"],
                        filters=[("image_id", "in", image_ids)])
    out: dict[tuple[str, int], MatchRow] = {}
    for r in table.to_pylist():
        out[(str(r["image_id"]), int(r["rank"]))] = MatchRow(
            sentence_id=int(r["sentence_id"]),
            region_phrase=[int(p) for p in (r["region_phrase"] or [])],
            region_sim=[float(s) for s in (r["region_sim"] or [])],
        )
    return out


def read_metrics(path: Path) -> Metrics:
    """Numeric series of a training log; lines without a numeric ``step`` are counted as bad."""
    rows, bad = read_jsonl(path)
    metrics = Metrics(bad_lines=bad)
    for r in rows:
        step = r.get("step")
        if not _is_number(step):
            metrics.bad_lines += 1
            continue
        metrics.steps.append(float(step))
        for key, value in r.items():
            if key != "step" and _is_number(value):
                metrics.series.setdefault(str(key), []).append((float(step), float(value)))
    return metrics


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def find_summaries(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(folder relative to the run, parsed summary) for every ``summary.json`` under the run."""
    out: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(run_dir.rglob("summary.json")):
        rel = path.parent.relative_to(run_dir).as_posix() or "."
        if any(part.startswith(".") for part in Path(rel).parts):  # unfinished unit (atomic_dir tmp folder)
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            data = {"error": f"unreadable summary.json: {err}"}
        if not isinstance(data, dict):
            data = {"value": data}
        out.append((rel, data))
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Dotted key -> short text for scalar values of a nested summary (lists shown by length)."""
    items: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(flatten(value, name + "."))
        elif isinstance(value, list):
            items.append((name, f"[{len(value)} items]" if len(value) > 5 else json.dumps(value)[:200]))
        elif isinstance(value, float):
            items.append((name, f"{value:.4g}"))
        else:
            items.append((name, str(value)[:200]))
    return items
