"""Region outputs on disk: one folder of fixed-shape arrays per work unit, plus a merged index.

Why this layout: fixed-shape `.npy` arrays ([n, R, ...], zero padded) can be memory-mapped, so a
pre-training data loader reads one image's regions without loading the corpus; parts are written
atomically per unit so sharded and resumed runs merge into identical outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muvla.utils.shards import atomic_file

INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("file", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("row", pa.int32()),
    ("num_regions", pa.int32()),
    ("tags", pa.list_(pa.string())),
])
MERGED_SCHEMA = INDEX_SCHEMA.append(pa.field("part", pa.string()))


@dataclass
class ImageRegions:
    """All regions of one image (n = number of real regions, no padding)."""

    image_id: str
    file: str
    width: int
    height: int
    boxes: np.ndarray                 # [n, 4] float32 x1, y1, x2, y2 pixels
    tags: list[str]
    scores: np.ndarray                # [n] float32
    class_ids: np.ndarray             # [n] int32, -1 = unknown class
    features: np.ndarray              # [n, D] (float16 when read back)
    class_probs: np.ndarray | None = None   # [n, C] or None

    def __post_init__(self) -> None:
        n = len(self.boxes)
        shapes = {"tags": len(self.tags), "scores": len(self.scores), "class_ids": len(self.class_ids),
                  "features": len(self.features)}
        if self.class_probs is not None:
            shapes["class_probs"] = len(self.class_probs)
        bad = {k: v for k, v in shapes.items() if v != n}
        if bad:
            raise ValueError(f"image {self.image_id!r}: {n} boxes but region counts {bad}")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image {self.image_id!r}: invalid size {self.width}x{self.height}")

    @property
    def num_regions(self) -> int:
        return len(self.boxes)

    def position_features(self) -> np.ndarray:
        """[n, 5] = [x1/W, y1/H, x2/W, y2/H, area fraction] (METHOD.md §1), float32."""
        b = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        w, h = float(self.width), float(self.height)
        pos = np.empty((len(b), 5), dtype=np.float32)
        pos[:, 0] = b[:, 0] / w
        pos[:, 1] = b[:, 1] / h
        pos[:, 2] = b[:, 2] / w
        pos[:, 3] = b[:, 3] / h
        pos[:, 4] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
        return pos


@dataclass
class RegionGeometry:
    """What retrieval needs of an image's regions: tags, boxes [n, 4] and scores [n] (no features)."""

    image_id: str
    width: int
    height: int
    tags: list[str]
    boxes: np.ndarray
    scores: np.ndarray

    def areas(self) -> np.ndarray:
        """[n] each box's area as a fraction of the image."""
        b = self.boxes.reshape(-1, 4)
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / float(self.width * self.height)


@dataclass
class RejectRecord:
    """One skipped input, as written to rejected.jsonl."""

    file: str
    reason: str
    image_id: str | None = None

    def to_json(self) -> str:
        return json.dumps({"file": self.file, "reason": self.reason, "image_id": self.image_id},
                          ensure_ascii=False)


@dataclass
class RegionPartWriter:
    """Collects up to ``capacity`` images into preallocated arrays and writes one part folder."""

    max_regions: int
    feature_dim: int
    capacity: int
    num_classes: int = 0
    store_class_probs: bool = False
    rows: list[dict] = field(default_factory=list)
    rejected: list[RejectRecord] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.store_class_probs and self.num_classes < 1:
            raise ValueError("store_class_probs needs num_classes >= 1")
        r, n = self.max_regions, self.capacity
        self.features = np.zeros((n, r, self.feature_dim), dtype=np.float16)
        self.boxes = np.zeros((n, r, 4), dtype=np.float32)
        self.scores = np.zeros((n, r), dtype=np.float32)
        self.class_ids = np.full((n, r), -1, dtype=np.int32)
        self.class_probs = (np.zeros((n, r, self.num_classes), dtype=np.float16)
                            if self.store_class_probs else None)

    def add(self, item: ImageRegions) -> None:
        i = len(self.rows)
        if i >= self.capacity:
            raise ValueError(f"part is full ({self.capacity} images)")
        n = item.num_regions
        if n > self.max_regions:
            raise ValueError(f"image {item.image_id!r}: {n} regions > max_regions={self.max_regions}")
        if n and item.features.shape[1] != self.feature_dim:
            raise ValueError(f"image {item.image_id!r}: feature dim {item.features.shape[1]}, "
                             f"expected {self.feature_dim}")
        self.features[i, :n] = item.features
        self.boxes[i, :n] = item.boxes
        self.scores[i, :n] = item.scores
        self.class_ids[i, :n] = item.class_ids
        if self.class_probs is not None:
            if item.class_probs is None:
                raise ValueError(f"image {item.image_id!r}: class probs requested but missing")
            self.class_probs[i, :n] = item.class_probs
        self.rows.append({"image_id": item.image_id, "file": item.file, "width": int(item.width),
                          "height": int(item.height), "row": i, "num_regions": n,
                          "tags": [str(t) for t in item.tags]})

    def reject(self, file: str, reason: str, image_id: str | None = None) -> None:
        self.rejected.append(RejectRecord(file=file, reason=reason, image_id=image_id))

    def count(self, key: str, amount: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + amount

    def write(self, folder: Path) -> None:
        """Write arrays (trimmed to the images added), index.parquet, rejected.jsonl, stats.json."""
        folder = Path(folder)
        n = len(self.rows)
        np.save(folder / "features.npy", self.features[:n])
        np.save(folder / "boxes.npy", self.boxes[:n])
        np.save(folder / "scores.npy", self.scores[:n])
        np.save(folder / "class_ids.npy", self.class_ids[:n])
        if self.class_probs is not None:
            np.save(folder / "class_probs.npy", self.class_probs[:n])
        table = pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA)
        pq.write_table(table, folder / "index.parquet")
        with open(folder / "rejected.jsonl", "w", encoding="utf-8") as f:
            for rec in self.rejected:
                f.write(rec.to_json() + "\n")
        (folder / "stats.json").write_text(json.dumps(self.stats, sort_keys=True), encoding="utf-8")


def list_parts(root: Path) -> list[Path]:
    """Complete part folders under ``root/parts`` in part order (temporary folders excluded)."""
    parts_dir = Path(root) / "parts"
    if not parts_dir.is_dir():
        return []
    return sorted(p for p in parts_dir.iterdir() if p.is_dir() and p.name.startswith("part-"))


def read_rejected(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def merge_region_parts(root: str | Path) -> dict:
    """Join all parts into ``root/index.parquet`` (+ part column) and ``root/rejected.jsonl``.

    Order is part order then row order, so the result does not depend on how parts were produced.
    Returns counters summed over the parts' stats.json.
    """
    root = Path(root)
    parts = list_parts(root)
    if not parts:
        raise FileNotFoundError(f"no region parts under {root / 'parts'}")
    tables = []
    rejected: list[dict] = []
    stats: dict[str, int] = {}
    for part in parts:
        t = pq.read_table(part / "index.parquet").cast(INDEX_SCHEMA)
        tables.append(t.append_column("part", pa.array([part.name] * t.num_rows, type=pa.string())))
        rejected.extend(read_rejected(part / "rejected.jsonl"))
        stats_path = part / "stats.json"
        if stats_path.exists():
            for k, v in json.loads(stats_path.read_text(encoding="utf-8")).items():
                stats[k] = stats.get(k, 0) + int(v)
    merged = pa.concat_tables(tables).cast(MERGED_SCHEMA)
    ids = merged.column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate image id {dup!r} across region parts under {root}")
    with atomic_file(root / "index.parquet") as tmp:
        pq.write_table(merged, tmp)
    with atomic_file(root / "rejected.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in rejected:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return stats


class RegionStore:
    """Read-only view of a regions output folder (memory-mapped arrays, random access by image id)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / "index.parquet"
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found: run the regions stage (and its merge) first")
        table = pq.read_table(index_path)
        missing = set(MERGED_SCHEMA.names) - set(table.column_names)
        if missing:
            raise ValueError(f"{index_path}: missing columns {sorted(missing)}")
        self._index = table.to_pydict()
        self.image_ids: list[str] = list(self._index["image_id"])
        self._pos = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._int_ids: dict[int, str] = {}
        for image_id in self.image_ids:
            if image_id.isdigit():
                self._int_ids.setdefault(int(image_id), image_id)
        classes_path = self.root / "classes.json"
        self.classes: list[str] = (json.loads(classes_path.read_text(encoding="utf-8"))["names"]
                                   if classes_path.exists() else [])
        self._arrays: dict[str, dict[str, np.ndarray | None]] = {}
        part_names = sorted(set(self._index["part"]))
        first = part_names[0] if part_names else (list_parts(self.root)[0].name
                                                  if list_parts(self.root) else None)
        if first is None:
            raise FileNotFoundError(f"no region parts under {self.root / 'parts'}")
        feats = self._part(first)["features"]
        self.max_regions = int(feats.shape[1])
        self.feature_dim = int(feats.shape[2])

    def _part(self, name: str) -> dict[str, np.ndarray | None]:
        if name not in self._arrays:
            folder = self.root / "parts" / name
            try:
                arrays: dict[str, np.ndarray | None] = {
                    key: np.load(folder / f"{key}.npy", mmap_mode="r")
                    for key in ("features", "boxes", "scores", "class_ids")
                }
            except (OSError, ValueError) as err:
                raise ValueError(f"{folder}: cannot read the region arrays ({err})") from err
            probs = folder / "class_probs.npy"
            arrays["class_probs"] = np.load(probs, mmap_mode="r") if probs.exists() else None
            self._arrays[name] = arrays
        return self._arrays[name]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return self._resolve(image_id) is not None

    def _resolve(self, image_id: object) -> str | None:
        if isinstance(image_id, str) and image_id in self._pos:
            return image_id
        if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
            if str(image_id) in self._pos:
                return str(image_id)
            return self._int_ids.get(int(image_id))
        return None

    def num_regions(self, image_id: str | int) -> int:
        """Real region count from the index, without touching the arrays (0 for an unknown image)."""
        key = self._resolve(image_id)
        return 0 if key is None else int(self._index["num_regions"][self._pos[key]])

    def find(self, image_id: str | int) -> ImageRegions | None:
        """Regions of ``image_id`` (str, or int COCO id matching a zero-padded digit stem), else None."""
        key = self._resolve(image_id)
        return None if key is None else self._load(self._pos[key])

    def __getitem__(self, image_id: str | int) -> ImageRegions:
        found = self.find(image_id)
        if found is None:
            raise KeyError(f"image id {image_id!r} not in region store {self.root}")
        return found

    def _load(self, i: int) -> ImageRegions:
        idx = self._index
        arrays = self._part(idx["part"][i])
        row, n = int(idx["row"][i]), int(idx["num_regions"][i])
        rows, max_regions = arrays["boxes"].shape[:2]
        if not 0 <= row < rows:
            raise ValueError(f"image {idx['image_id'][i]!r}: row {row} outside part {idx['part'][i]} ({rows} rows)")
        if not 0 <= n <= max_regions:
            raise ValueError(f"image {idx['image_id'][i]!r}: num_regions {n} outside 0..{max_regions}")
        probs = arrays["class_probs"]
        return ImageRegions(
            image_id=idx["image_id"][i], file=idx["file"][i],
            width=int(idx["width"][i]), height=int(idx["height"][i]),
            boxes=np.array(arrays["boxes"][row, :n]), tags=list(idx["tags"][i]),
            scores=np.array(arrays["scores"][row, :n]), class_ids=np.array(arrays["class_ids"][row, :n]),
            features=np.array(arrays["features"][row, :n]),
            class_probs=None if probs is None else np.array(probs[row, :n]),
        )

    def geometry(self, i: int) -> RegionGeometry:
        """Tags, boxes and scores of the i-th image without touching its features (cheap at scale)."""
        idx = self._index
        arrays = self._part(idx["part"][i])
        row, n = int(idx["row"][i]), int(idx["num_regions"][i])
        return RegionGeometry(image_id=idx["image_id"][i], width=int(idx["width"][i]), height=int(idx["height"][i]),
                              tags=[str(t) if t is not None else "" for t in idx["tags"][i]],
                              boxes=np.array(arrays["boxes"][row, :n], dtype=np.float32),
                              scores=np.array(arrays["scores"][row, :n], dtype=np.float32))

    def iter_geometry(self) -> Iterator[RegionGeometry]:
        for i in range(len(self.image_ids)):
            yield self.geometry(i)

    def __iter__(self) -> Iterator[ImageRegions]:
        """Stream images in index order (part by part, so one part's arrays are touched at a time)."""
        for i in range(len(self.image_ids)):
            yield self._load(i)
