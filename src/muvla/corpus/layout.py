"""The on-disk corpus format: file names, Arrow schemas, readers and writers of every stage output.

A corpus folder holds one folder per stage::

    <corpus>/regions/    RegionsOutput   index.parquet, classes.json, parts/part-XXXXX/*.npy (muvla.corpus.region_store)
    <corpus>/text/       TextOutput      sentences.parquet
    <corpus>/retrieval/  RetrievalOutput topk.parquet, queries.parquet, embeddings/, index.faiss
    <corpus>/phrases/    PhrasesOutput   sentence_phrases.parquet, matches.parquet

Each stage folder also holds ``build.json`` (``muvla.corpus.provenance``): what it was built from.
Every stage, pre-training, the report and the baseline pairings go through these classes, so a file
name or a column exists in exactly one place. ``CorpusLayout.verify()`` checks that the parts of a
corpus belong to one generation before anything trains on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muvla.corpus.provenance import BuildRecord, finished_digest
from muvla.corpus.region_store import RegionStore
from muvla.utils.config import ConfigError
from muvla.utils.shards import atomic_file

SENTENCES_SCHEMA = pa.schema([("sentence_id", pa.int64()), ("text", pa.string()), ("source", pa.string())])
TOPK_SCHEMA = pa.schema([("image_id", pa.string()), ("rank", pa.int32()), ("sentence_id", pa.int64()),
                         ("score", pa.float32()), ("cosine", pa.float32())])
QUERIES_SCHEMA = pa.schema([("image_id", pa.string()), ("query", pa.string())])
PHRASES_SCHEMA = pa.schema([
    ("sentence_id", pa.int64()),
    ("phrases", pa.list_(pa.string())),
    ("char_spans", pa.list_(pa.list_(pa.int32(), 2))),
    ("token_spans", pa.list_(pa.list_(pa.int32(), 2))),
])
MATCHES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("rank", pa.int32()),
    ("sentence_id", pa.int64()),
    ("region_phrase", pa.list_(pa.int32())),
    ("region_sim", pa.list_(pa.float32())),
])


def write_parquet(path: Path, table: pa.Table) -> Path:
    """Write a table atomically (a killed writer never leaves a half file under the final name)."""
    with atomic_file(Path(path)) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


class TableWriter:
    """Appends tables to one parquet file, in row groups of at least ``group_rows`` rows; the file
    appears under its final name only on a clean exit. WHY: a stage merging its units this way holds
    one group in memory, not the whole output (15M pairs with their region lists at CC3M size)."""

    def __init__(self, path: Path, schema: pa.Schema, group_rows: int = 131_072) -> None:
        self.path, self.schema, self.group_rows = Path(path), schema, group_rows
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._writer = pq.ParquetWriter(self._tmp, schema)

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.cast(self.schema))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._flush()
        self._writer.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


_BATCH_ROWS = 65_536  # rows converted to Python objects at a time (bounds the transient copies)


def _read(path: Path, schema: pa.Schema, columns: Sequence[str] | None = None,
          filters: Any = None) -> pa.Table:
    """Read a stage table, checking the columns it must have (one clear line when it is not one)."""
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    names = pq.read_schema(path).names
    wanted = list(columns) if columns is not None else schema.names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing} (has {names}); not a muvla stage output")
    return pq.read_table(path, columns=wanted, filters=filters)


def _row_groups_with(parquet: pq.ParquetFile, column: str, values: np.ndarray) -> list[int]:
    """Row groups whose [min, max] statistics of ``column`` contain one of the sorted ``values`` (a
    group without statistics is always kept). WHY: the phrases stage asks for a few hundred ids at a
    time; reading every row group for each such call costs O(calls x corpus) (measured 0.22 s a call
    at 1M sentences, so up to an hour of a CC3M parse phase)."""
    col = parquet.schema_arrow.get_field_index(column)
    groups = []
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(col).statistics
        unknown = stats is None or not stats.has_min_max
        if unknown or np.searchsorted(values, stats.min, "left") < np.searchsorted(values, stats.max, "right"):
            groups.append(g)
    return groups


# ---------------------------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class RegionsOutput:
    """A regions stage folder (a region store)."""

    root: Path
    stage = "regions"

    @property
    def index(self) -> Path:
        return Path(self.root) / "index.parquet"

    @property
    def classes(self) -> Path:
        return Path(self.root) / "classes.json"

    @property
    def rejected(self) -> Path:
        return Path(self.root) / "rejected.jsonl"

    @property
    def parts(self) -> Path:
        return Path(self.root) / "parts"

    def outputs(self) -> list[Path]:
        return [self.index, self.classes]

    def digest(self) -> str:
        return finished_digest(self.root, self.stage, self.outputs())

    def store(self) -> RegionStore:
        return RegionStore(self.root)

    def write_classes(self, names: Sequence[str]) -> None:
        with atomic_file(self.classes) as tmp:
            tmp.write_text(json.dumps({"names": list(names)}, ensure_ascii=False), encoding="utf-8")

    def image_tags(self) -> tuple[list[str], list[list[str]]]:
        """(image ids, per-image region tags in region order) from the merged index.

        Tags are converted a batch at a time and every occurrence of a tag is one shared string:
        a CC3M index holds ~10^8 tags of ~1,600 classes, several GB as separate Python strings."""
        table = _read(self.index, pa.schema([("image_id", pa.string()), ("tags", pa.list_(pa.string()))]))
        ids = [str(i) for i in table.column("image_id").to_pylist()]
        vocab: dict[str, str] = {}
        tags = [[vocab.setdefault(t, t) if t is not None else "" for t in (row or [])]
                for batch in table.select(["tags"]).to_batches(max_chunksize=_BATCH_ROWS)
                for row in batch.column(0).to_pylist()]
        return ids, tags


# ---------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextOutput:
    """A text stage folder: ``sentences.parquet`` (sentence_id = row number, text, source)."""

    root: Path
    stage = "text"

    @property
    def sentences(self) -> Path:
        return Path(self.root) / "sentences.parquet"

    @property
    def rejected(self) -> Path:
        return Path(self.root) / "rejected.jsonl"

    def outputs(self) -> list[Path]:
        return [self.sentences]

    def digest(self) -> str:
        return finished_digest(self.root, self.stage, self.outputs())

    def count(self) -> int:
        if not self.sentences.is_file():
            raise ConfigError(f"{self.sentences} not found: run the text stage first (muvla text ...)")
        return pq.ParquetFile(self.sentences).metadata.num_rows

    def all_texts(self) -> list[str]:
        """Every sentence, in sentence-id order, all in memory (small stores; the stages read by id)."""
        return _read(self.sentences, SENTENCES_SCHEMA, ["text"]).column("text").to_pylist()

    def texts(self, sentence_ids: Sequence[int], with_source: bool = False) -> dict[int, Any]:
        """id -> text (or (text, source)) for the wanted ids only, read in row batches so a huge
        text store is never all in memory."""
        out: dict[int, Any] = {}
        wanted = sorted({int(s) for s in sentence_ids})
        if not wanted:
            return out
        if not self.sentences.is_file():
            raise ConfigError(f"{self.sentences} not found: run the text stage first (muvla text ...)")
        value_set = pa.array(wanted, type=pa.int64())
        columns = ["sentence_id", "text", "source"] if with_source else ["sentence_id", "text"]
        parquet = pq.ParquetFile(self.sentences)
        groups = _row_groups_with(parquet, "sentence_id", np.asarray(wanted, dtype=np.int64))
        for batch in parquet.iter_batches(row_groups=groups, columns=columns, batch_size=65536):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_in(table.column("sentence_id"), value_set=value_set))
            rows = zip(*(table.column(c).to_pylist() for c in columns))
            for row in rows:
                out[int(row[0])] = (str(row[1]), str(row[2])) if with_source else str(row[1])
        return out

    def writer(self) -> SentenceWriter:
        return SentenceWriter(self.sentences)


class SentenceWriter:
    """Appends sentences with contiguous ids; the file appears under its final name only on close."""

    FLUSH_ROWS = 100_000

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._text: list[str] = []
        self._source: list[str] = []
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._writer = pq.ParquetWriter(self._tmp, SENTENCES_SCHEMA)

    def add(self, text: str, source: str) -> None:
        self._text.append(text)
        self._source.append(source)
        if len(self._text) >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._text:
            return
        ids = pa.array(range(self.count, self.count + len(self._text)), type=pa.int64())
        self._writer.write_table(pa.Table.from_arrays(
            [ids, pa.array(self._text, pa.string()), pa.array(self._source, pa.string())], schema=SENTENCES_SCHEMA))
        self.count += len(self._text)
        self._text.clear()
        self._source.clear()

    def close(self, ok: bool = True) -> None:
        """Publish the file (``ok``) or throw the partial one away."""
        if ok:
            self._flush()
        self._writer.close()
        if ok:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SentenceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(ok=exc_type is None)


# ---------------------------------------------------------------------------------------------- retrieval


@dataclass
class TopK:
    """Retrieved (image, sentence) pairs, one row each, in the region index's image order."""

    image_id: list[str]
    rank: np.ndarray  # [n] int32, 0..K-1 within an image
    sentence_id: np.ndarray  # [n] int64
    score: np.ndarray  # [n] float32, what the ranking sorted by (NaN for baseline pairings)
    cosine: np.ndarray | None = None  # [n] float32, the plain query-sentence cosine (NaN for baselines)

    def __len__(self) -> int:
        return len(self.image_id)

    def by_image(self) -> dict[str, list[tuple[int, int]]]:
        """image id -> [(rank, sentence id)] in rank order."""
        out: dict[str, list[tuple[int, int]]] = {}
        for image, rank, sid in zip(self.image_id, self.rank.tolist(), self.sentence_id.tolist()):
            out.setdefault(image, []).append((int(rank), int(sid)))
        for pairs in out.values():
            pairs.sort()
        return out

    def to_table(self) -> pa.Table:
        return pa.table({"image_id": pa.array(self.image_id, pa.string()),
                         "rank": pa.array(np.asarray(self.rank, dtype=np.int32), pa.int32()),
                         "sentence_id": pa.array(np.asarray(self.sentence_id, dtype=np.int64), pa.int64()),
                         "score": pa.array(np.asarray(self.score, dtype=np.float32), pa.float32()),
                         "cosine": pa.array(np.asarray(self.score if self.cosine is None else self.cosine,
                                                       dtype=np.float32), pa.float32())},
                        schema=TOPK_SCHEMA)


@dataclass(frozen=True)
class RetrievalOutput:
    """A retrieval folder (``muvla retrieve``) or a baseline pairing in the same format (``muvla pairs``)."""

    root: Path
    stages = ("retrieval", "pairs")

    @property
    def topk(self) -> Path:
        return Path(self.root) / "topk.parquet"

    @property
    def queries(self) -> Path:
        return Path(self.root) / "queries.parquet"

    @property
    def skipped(self) -> Path:
        return Path(self.root) / "skipped.jsonl"

    @property
    def embeddings(self) -> Path:
        return Path(self.root) / "embeddings"

    @property
    def index(self) -> Path:
        return Path(self.root) / "index.faiss"

    @property
    def index_meta(self) -> Path:
        return Path(self.root) / "index.json"

    @property
    def index_ids(self) -> Path:
        return Path(self.root) / "index_ids.npy"

    def outputs(self) -> list[Path]:
        return [self.topk]

    def digest(self) -> str:
        return finished_digest(self.root, self.stages, self.outputs())

    def record(self) -> BuildRecord:
        record = BuildRecord.read(Path(self.root))
        if record is None:
            raise ConfigError(f"{self.root} is not a retrieval output (no build.json)")
        return record

    def k(self) -> int:
        """The number of sentences retrieved per image (K) that this output was built with."""
        return int(self.record().settings["k"])

    def count_pairs(self) -> int:
        return pq.ParquetFile(self.topk).metadata.num_rows

    def write_topk(self, topk: TopK) -> None:
        write_parquet(self.topk, topk.to_table())

    def read_topk(self, image_ids: Sequence[str] | None = None) -> TopK:
        filters = [("image_id", "in", list(image_ids))] if image_ids is not None else None
        if image_ids is not None and not image_ids:
            return TopK([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))
        t = _read(self.topk, TOPK_SCHEMA, columns=["image_id", "rank", "sentence_id", "score"], filters=filters)
        vocab: dict[str, str] = {}  # an image id repeats K times: one shared string, not K
        image_id = [vocab.setdefault(i, i) for batch in t.select(["image_id"]).to_batches(max_chunksize=_BATCH_ROWS)
                    for i in batch.column(0).to_pylist()]
        return TopK(image_id=image_id,
                    rank=t.column("rank").to_numpy().astype(np.int32),
                    sentence_id=t.column("sentence_id").to_numpy().astype(np.int64),
                    score=t.column("score").to_numpy(zero_copy_only=False).astype(np.float32))

    def write_queries(self, image_ids: Sequence[str], queries: Sequence[str]) -> None:
        write_parquet(self.queries, pa.table({"image_id": pa.array(list(image_ids), pa.string()),
                                              "query": pa.array(list(queries), pa.string())},
                                             schema=QUERIES_SCHEMA))


# ---------------------------------------------------------------------------------------------- phrases


@dataclass
class SentencePhrases:
    """Noun phrases of one sentence: text, character spans and WordPiece token spans (no specials)."""

    phrases: list[str]
    char_spans: list[list[int]]
    token_spans: list[list[int]]


@dataclass
class PairMatch:
    """Region-phrase alignment of one retrieved pair: per region its best phrase (-1 none) and cs."""

    image_id: str
    rank: int
    sentence_id: int
    region_phrase: list[int]
    region_sim: list[float]


@dataclass(frozen=True)
class PhrasesOutput:
    """A phrases stage folder."""

    root: Path
    stage = "phrases"

    @property
    def sentence_phrases(self) -> Path:
        return Path(self.root) / "sentence_phrases.parquet"

    @property
    def matches(self) -> Path:
        return Path(self.root) / "matches.parquet"

    @property
    def parts(self) -> Path:
        return Path(self.root) / "parts"

    def outputs(self) -> list[Path]:
        return [self.sentence_phrases, self.matches]

    def digest(self) -> str:
        return finished_digest(self.root, self.stage, self.outputs())

    def read_phrases(self, sentence_ids: Sequence[int] | None = None) -> dict[int, SentencePhrases]:
        filters = [("sentence_id", "in", sorted({int(s) for s in sentence_ids}))] if sentence_ids is not None else None
        if sentence_ids is not None and not sentence_ids:
            return {}
        t = _read(self.sentence_phrases, PHRASES_SCHEMA, filters=filters)
        return {int(r["sentence_id"]): SentencePhrases([str(p) for p in r["phrases"] or []],
                                                       [list(s) for s in r["char_spans"] or []],
                                                       [list(s) for s in r["token_spans"] or []])
                for r in t.to_pylist()}

    def iter_matches(self, image_ids: Sequence[str] | None = None) -> Iterator[PairMatch]:
        if image_ids is not None and not image_ids:
            return
        filters = [("image_id", "in", list(image_ids))] if image_ids is not None else None
        t = _read(self.matches, MATCHES_SCHEMA, filters=filters)
        cols = {c: t.column(c).to_pylist() for c in MATCHES_SCHEMA.names}
        for i in range(t.num_rows):
            yield PairMatch(str(cols["image_id"][i]), int(cols["rank"][i]), int(cols["sentence_id"][i]),
                            [int(p) for p in cols["region_phrase"][i] or []],
                            [float(s) for s in cols["region_sim"][i] or []])

    @staticmethod
    def phrases_table(rows: Sequence[tuple[int, SentencePhrases]]) -> pa.Table:
        return pa.Table.from_pylist([{"sentence_id": int(sid), "phrases": p.phrases, "char_spans": p.char_spans,
                                      "token_spans": p.token_spans} for sid, p in rows], schema=PHRASES_SCHEMA)

    @staticmethod
    def matches_table(rows: Sequence[PairMatch]) -> pa.Table:
        return pa.Table.from_pylist([{"image_id": m.image_id, "rank": m.rank, "sentence_id": m.sentence_id,
                                      "region_phrase": m.region_phrase, "region_sim": m.region_sim} for m in rows],
                                    schema=MATCHES_SCHEMA)


# ---------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusCheck:
    """What :meth:`CorpusLayout.verify` established about a consistent corpus."""

    k: int  # sentences retrieved per image
    pairing: str  # "retrieval" or "pairs" (a baseline pairing)
    digests: dict[str, str]


@dataclass(frozen=True)
class CorpusLayout:
    """A corpus folder; ``retrieval`` / ``phrases`` may point elsewhere (baseline pairings)."""

    root: Path
    regions: RegionsOutput
    text: TextOutput
    retrieval: RetrievalOutput
    phrases: PhrasesOutput

    @classmethod
    def at(cls, root: str | Path, retrieval: str | Path | None = None,
           phrases: str | Path | None = None) -> CorpusLayout:
        root = Path(root)
        return cls(root=root, regions=RegionsOutput(root / "regions"), text=TextOutput(root / "text"),
                   retrieval=RetrievalOutput(Path(retrieval) if retrieval else root / "retrieval"),
                   phrases=PhrasesOutput(Path(phrases) if phrases else root / "phrases"))

    def verify(self) -> CorpusCheck:
        """Refuse (one line) a corpus whose parts are unfinished or come from different generations."""
        digests = {"regions": self.regions.digest(), "text": self.text.digest(),
                   "retrieval": self.retrieval.digest(), "phrases": self.phrases.digest()}
        retrieval = self.retrieval.record()
        phrases = BuildRecord.read(Path(self.phrases.root))
        assert phrases is not None  # digest() checked it
        expected = {
            ("retrieval", "regions"): (retrieval.inputs.get("regions"), digests["regions"]),
            ("retrieval", "text"): (retrieval.inputs.get("text"), digests["text"]),
            ("phrases", "retrieval"): (phrases.inputs.get("retrieval"), digests["retrieval"]),
            ("phrases", "regions"): (phrases.inputs.get("regions"), digests["regions"]),
            ("phrases", "text"): (phrases.inputs.get("text"), digests["text"]),
        }
        folders = {"retrieval": self.retrieval.root, "phrases": self.phrases.root, "regions": self.regions.root,
                   "text": self.text.root}
        for (stage, upstream), (recorded, actual) in expected.items():
            if recorded != actual:
                raise ConfigError(
                    f"corpus {self.root} is inconsistent: {folders[stage]} was built from another {upstream} "
                    f"output than the one in {folders[upstream]}; rerun `muvla {'retrieve' if stage == 'retrieval' else stage}` "
                    "(or `muvla corpus`) on it")
        return CorpusCheck(k=int(retrieval.settings["k"]), pairing=retrieval.stage, digests=digests)
