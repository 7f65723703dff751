"""Retrieval stage: build the weakly-aligned corpus R = top-K sentences per image (METHOD.md section 2).

Steps:
1. encode every sentence of the text stage in fixed units (``embeddings/part-XXXXX.npy``, float16,
   L2-normalised). Units are resumable (a finished part is skipped) and shardable
   (``unit % num_shards == shard``); every rank encodes its own units.
2. rank 0 (the main process) continues only when ALL units exist; otherwise it writes a summary with
   ``status: waiting_for_shards`` and the missing units, and a rerun of rank 0 after the other
   shards finished does the rest (its own units are already done, so it only merges).
3. build an inner-product faiss index over the non-excluded sentences (``Flat`` = exact search, or
   any index-factory string, trained on a sample when the index needs training). Excluded
   sentences are left out of the index, so exclusion is exact for every index type.
4. build one query per image from its region tags (``queries.py``), encode each distinct query
   once, search in batches, write ``queries.parquet`` and ``topk.parquet``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muvla import encoders
from muvla.retrieval.queries import QUERY_MODES, make_query
from muvla.text.stage import read_sentences
from muvla.utils.config import ConfigError, save_config
from muvla.utils.progress import progress
from muvla.utils.shards import atomic_file, clean_stale_tmp, resolve_shard, unit_name, unit_ranges


@dataclass
class RetrievalConfig:
    """Where to read regions/sentences, how to query and which index to build."""

    out: Path
    regions: Path
    text: Path
    model: str = "default"  # Sentence-BERT: 'default' (bundled all-MiniLM-L6-v2), a folder, or a cached name
    k: int = 5
    query_mode: str = "official"  # "official" (reference objects_no_rep) or "counted"
    index: str = "Flat"  # faiss index-factory string, always with inner product on unit vectors
    nprobe: int = 16  # IVF indexes only
    train_size: int = 100_000  # sentences sampled to train an index that needs training
    encode_batch_size: int = 128
    unit_size: int = 20_000
    query_batch_size: int = 500
    min_tag_score: float = 0.0  # leave region tags scored below this out of the query (the best tag always stays)
    exclude_sentence_ids: Path | None = None  # text file, one sentence id per line (e.g. the images' own captions)
    device: str = "cpu"
    shard: int | None = None
    num_shards: int | None = None

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"retrieval: k must be >= 1, got {self.k}")
        if self.query_mode not in QUERY_MODES:
            raise ConfigError(f"retrieval: query_mode {self.query_mode!r} not in {QUERY_MODES}")
        for name in ("nprobe", "train_size", "encode_batch_size", "unit_size", "query_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"retrieval: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_tag_score <= 1.0:
            raise ConfigError(f"retrieval: min_tag_score must be in [0, 1], got {self.min_tag_score}")
        if not self.index.strip():
            raise ConfigError("retrieval: index must be a faiss index-factory string such as 'Flat'")
        if not (Path(self.text) / "sentences.parquet").exists():
            raise ConfigError(f"retrieval: {Path(self.text) / 'sentences.parquet'} not found (run the text stage)")
        if not region_index_path(self.regions).exists():
            raise ConfigError(f"retrieval: {region_index_path(self.regions)} not found (run the regions stage)")
        if self.exclude_sentence_ids is not None and not Path(self.exclude_sentence_ids).is_file():
            raise ConfigError(f"retrieval: exclude_sentence_ids file {self.exclude_sentence_ids} not found")
        try:
            resolve_shard(self.shard, self.num_shards)
        except ValueError as err:
            raise ConfigError(f"retrieval: {err}") from err


def region_index_path(regions: Path) -> Path:
    """The merged region index: ``<regions>/index.parquet`` (or the parquet file itself)."""
    regions = Path(regions)
    return regions if regions.suffix == ".parquet" else regions / "index.parquet"


def confident_region_tags(regions: Path, min_score: float) -> tuple[list[str], list[list[str]]]:
    """Like :func:`read_region_tags`, keeping only tags whose region score is >= ``min_score``.

    WHY: a weak detector (our offline ImageNet-on-crops default) labels many crops with unrelated
    classes; those tags pull the query away from the image. The best-scored tag always stays so no
    image loses its query. ``min_score <= 0`` keeps every tag (the reference recipe).
    """
    if min_score <= 0:
        return read_region_tags(regions)
    from muvla.corpus.regions import RegionStore

    ids: list[str] = []
    kept: list[list[str]] = []
    for image in RegionStore(Path(regions)):
        scores = np.asarray(image.scores, dtype=np.float32)
        keep = [t for t, sc in zip(image.tags, scores) if sc >= min_score and t]
        if not keep and len(scores):
            keep = [image.tags[int(np.argmax(scores))]]
        ids.append(str(image.image_id))
        kept.append([t for t in keep if t])
    return ids, kept


def read_region_tags(regions: Path) -> tuple[list[str], list[list[str]]]:
    """(image ids, per-image region tags in region order) from the merged region index."""
    path = region_index_path(regions)
    names = pq.read_schema(path).names
    if "image_id" not in names or "tags" not in names:
        raise ConfigError(f"{path} lacks the image_id/tags columns of a merged region index (has {names})")
    table = pq.read_table(path, columns=["image_id", "tags"])
    ids = [str(i) for i in table.column("image_id").to_pylist()]
    tags = [list(t or []) for t in table.column("tags").to_pylist()]
    return ids, tags


def read_exclusions(path: Path | None, n_sentences: int) -> np.ndarray:
    """Sorted unique sentence ids to exclude; a non-integer or out-of-range line is a clear error."""
    if path is None:
        return np.zeros(0, dtype=np.int64)
    ids = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            value = int(line)
        except ValueError as err:
            raise ConfigError(f"{path}:{line_no}: expected a sentence id, got {line!r}") from err
        if not 0 <= value < n_sentences:
            raise ConfigError(f"{path}:{line_no}: sentence id {value} outside 0..{n_sentences - 1}")
        ids.append(value)
    return np.unique(np.asarray(ids, dtype=np.int64))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Refuse to mix parts encoded from another corpus/model/unit size into this run."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != meta:
            raise ConfigError(
                f"{path} records {old}, but this run has {meta}: the existing embeddings belong to "
                "another corpus, model or unit size; use a fresh output folder or delete embeddings/"
            )
        return
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def encode_units(cfg: RetrievalConfig, texts: list[str], rank: int, world: int) -> dict[str, Any]:
    """Encode this rank's missing units; returns counts and speed."""
    emb_dir = Path(cfg.out) / "embeddings"
    clean_stale_tmp(emb_dir)
    ranges = unit_ranges(len(texts), cfg.unit_size)
    todo = [u for u in range(len(ranges)) if u % world == rank and not (emb_dir / f"{unit_name(u)}.npy").exists()]
    encoded = 0
    if todo:
        encoders.load_sentence_encoder(cfg.model, cfg.device)  # load outside the timed loop
    t0 = time.time()
    for u in progress(todo, desc="encode sentences", unit="unit"):
        start, stop = ranges[u]
        emb = encoders.encode(texts[start:stop], batch_size=cfg.encode_batch_size, model=cfg.model,
                              device=cfg.device)
        with atomic_file(emb_dir / f"{unit_name(u)}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float16))
        encoded += stop - start
    seconds = time.time() - t0
    return {"units_total": len(ranges), "units_encoded_now": len(todo), "sentences_encoded_now": encoded,
            "encode_seconds": round(seconds, 3),
            "encode_sentences_per_s": round(encoded / seconds, 1) if encoded and seconds > 0 else None}


def missing_units(out: Path, n_sentences: int, unit_size: int) -> list[int]:
    emb_dir = Path(out) / "embeddings"
    n_units = len(unit_ranges(n_sentences, unit_size))
    return [u for u in range(n_units) if not (emb_dir / f"{unit_name(u)}.npy").exists()]


def load_embeddings(out: Path, n_sentences: int, unit_size: int) -> np.ndarray:
    """All unit parts concatenated as float32 [n, d] (unit i holds ids [i*U, (i+1)*U))."""
    emb_dir = Path(out) / "embeddings"
    parts = []
    for u, (start, stop) in enumerate(unit_ranges(n_sentences, unit_size)):
        arr = np.load(emb_dir / f"{unit_name(u)}.npy")
        if arr.shape[0] != stop - start:
            raise ValueError(f"{emb_dir / unit_name(u)}.npy has {arr.shape[0]} rows, expected {stop - start}")
        parts.append(arr)
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32))


def build_index(emb: np.ndarray, spec: str, train_size: int, seed: int = 0) -> Any:
    """Inner-product faiss index from an index-factory string; trained on a sample when needed."""
    import faiss

    d = emb.shape[1]
    try:
        index = faiss.IndexFlatIP(d) if spec == "Flat" else faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"retrieval: faiss cannot build index {spec!r}: {err}") from err
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = emb if emb.shape[0] <= train_size else emb[np.sort(rng.choice(emb.shape[0], train_size, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ConfigError(f"retrieval: training index {spec!r} on {sample.shape[0]} sentences failed: {err}") from err
    index.add(emb)
    return index


def set_search_params(index: Any, nprobe: int, k: int) -> None:
    """nprobe for IVF indexes, efSearch >= k for HNSW; other indexes have nothing to set."""
    import faiss

    with contextlib.suppress(RuntimeError):  # raised when the index is not an IVF index
        faiss.extract_index_ivf(index).nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, 2 * k)


def run_retrieval(cfg: RetrievalConfig) -> dict[str, Any]:
    """Encode sentences (this rank's units), then on rank 0 build the index and retrieve top-K per image."""
    import faiss

    cfg.validate()
    spec = resolve_shard(cfg.shard, cfg.num_shards)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    text_path = Path(cfg.text) / "sentences.parquet"
    texts = read_sentences(cfg.text, columns=["text"]).column("text").to_pylist()
    n = len(texts)
    if n == 0:
        raise ConfigError(f"retrieval: {text_path} holds no sentences")
    text_digest = _file_digest(text_path)
    _check_meta(out / "embeddings" / "meta.json",
                {"model": cfg.model, "unit_size": cfg.unit_size, "n_sentences": n, "text_digest": text_digest})
    if spec.is_main:
        save_config(cfg, out, inputs={"regions_index": str(region_index_path(cfg.regions)),
                                      "sentences": str(text_path), "text_digest": text_digest})

    summary: dict[str, Any] = {"stage": "retrieval", "shard": spec.rank, "num_shards": spec.world,
                               "sentences": n}
    summary.update(encode_units(cfg, texts, spec.rank, spec.world))
    if not spec.is_main:
        summary["status"] = "encoded_shard"
        with atomic_file(out / f"summary.rank-{spec.rank:05d}.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary
    missing = missing_units(out, n, cfg.unit_size)
    if missing:
        summary.update(status="waiting_for_shards", missing_units=missing,
                       note="rerun rank 0 once every shard has finished encoding to build the index and query")
        _write_summary(out, summary)
        return summary

    # Index over the non-excluded sentences; positions map back to sentence ids through index_ids.
    excluded = read_exclusions(cfg.exclude_sentence_ids, n)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), excluded)
    if keep.size == 0:
        raise ConfigError("retrieval: every sentence is excluded; nothing left to retrieve")
    index_meta = {"index": cfg.index, "train_size": cfg.train_size, "model": cfg.model, "n_sentences": n,
                  "text_digest": text_digest, "excluded_digest": hashlib.sha256(excluded.tobytes()).hexdigest()[:16]}
    index_path, meta_path, ids_path = out / "index.faiss", out / "index.json", out / "index_ids.npy"
    t0 = time.time()
    if index_path.exists() and ids_path.exists() and meta_path.exists() and \
            json.loads(meta_path.read_text(encoding="utf-8")) == index_meta:
        index = faiss.read_index(str(index_path))
        summary["index_reused"] = True
    else:
        emb = load_embeddings(out, n, cfg.unit_size)
        index = build_index(emb[keep], cfg.index, cfg.train_size)
        with atomic_file(index_path) as tmp:
            faiss.write_index(index, str(tmp))
        with atomic_file(ids_path) as tmp, open(tmp, "wb") as f:
            np.save(f, keep)
        with atomic_file(meta_path) as tmp:
            tmp.write_text(json.dumps(index_meta, indent=2), encoding="utf-8")
        summary["index_reused"] = False
    summary["index_seconds"] = round(time.time() - t0, 3)
    index_ids = np.load(ids_path)
    set_search_params(index, cfg.nprobe, cfg.k)

    # Queries: one per image with usable tags; identical strings are encoded and searched once.
    image_ids, image_tags = confident_region_tags(cfg.regions, cfg.min_tag_score)
    queries: list[str] = []
    query_images: list[str] = []
    skipped: list[dict[str, str]] = []
    for image_id, tags in zip(image_ids, image_tags):
        q = make_query(tags, cfg.query_mode)
        if q:
            queries.append(q)
            query_images.append(image_id)
        else:
            skipped.append({"image_id": image_id, "reason": "no region tags"})
    unique = list(dict.fromkeys(queries))
    k = min(cfg.k, int(keep.size))
    encoders.load_sentence_encoder(cfg.model, cfg.device)  # load outside the timed loop
    t0 = time.time()
    labels = np.full((len(unique), k), -1, dtype=np.int64)
    scores = np.zeros((len(unique), k), dtype=np.float32)
    batches = range(0, len(unique), cfg.query_batch_size)
    for start in progress(batches, desc="retrieve", total=len(batches), unit="batch"):
        chunk = unique[start:start + cfg.query_batch_size]
        q_emb = encoders.encode(chunk, batch_size=cfg.encode_batch_size, model=cfg.model, device=cfg.device)
        d, i = index.search(q_emb, k)
        labels[start:start + len(chunk)] = i
        scores[start:start + len(chunk)] = d
    query_seconds = time.time() - t0

    pos = {q: j for j, q in enumerate(unique)}
    rows_image, rows_rank, rows_sid, rows_score = [], [], [], []
    short = 0
    for image_id, q in zip(query_images, queries):
        j = pos[q]
        found = 0
        for r in range(k):
            label = int(labels[j, r])
            if label < 0:  # an approximate index may return fewer than k hits
                continue
            rows_image.append(image_id)
            rows_rank.append(found)
            rows_sid.append(int(index_ids[label]))
            rows_score.append(float(scores[j, r]))
            found += 1
        short += found < cfg.k

    with atomic_file(out / "queries.parquet") as tmp:
        pq.write_table(pa.table({"image_id": pa.array(query_images, pa.string()),
                                 "query": pa.array(queries, pa.string())}), tmp)
    with atomic_file(out / "topk.parquet") as tmp:
        pq.write_table(pa.table({"image_id": pa.array(rows_image, pa.string()),
                                 "rank": pa.array(rows_rank, pa.int32()),
                                 "sentence_id": pa.array(rows_sid, pa.int64()),
                                 "score": pa.array(rows_score, pa.float32())}), tmp)
    with atomic_file(out / "skipped.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")

    hits = np.bincount(np.asarray(rows_sid, dtype=np.int64), minlength=n) if rows_sid else np.zeros(n, np.int64)
    summary.update(
        status="done",
        query_mode=cfg.query_mode, index=cfg.index, k=cfg.k,
        excluded_sentences=int(excluded.size), indexed_sentences=int(keep.size),
        images=len(image_ids), queries=len(queries), unique_queries=len(unique),
        images_skipped=len(skipped), skipped_examples=[s["image_id"] for s in skipped[:20]],
        images_with_fewer_than_k=int(short),
        query_seconds=round(query_seconds, 3),
        queries_per_s=round(len(unique) / query_seconds, 1) if unique and query_seconds > 0 else None,
        hubness={
            "fraction_of_corpus_retrieved": round(float((hits > 0).sum()) / max(int(keep.size), 1), 6),
            "distinct_sentences_retrieved": int((hits > 0).sum()),
            "max_times_one_sentence_retrieved": int(hits.max()) if hits.size else 0,
            "most_retrieved_sentence_id": int(hits.argmax()) if rows_sid else None,
        },
    )
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
