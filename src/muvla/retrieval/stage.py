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
   once, search in batches and re-rank each image's candidates against hub sentences
   (``rerank.py``, CSLS by default), write ``queries.parquet`` and ``topk.parquet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muvla import encoders
from muvla.corpus.layout import RegionsOutput, RetrievalOutput, TextOutput, TopK
from muvla.corpus.provenance import BuildRecord, StageRun, Step, StepResult, digest_file, run_step
from muvla.retrieval.queries import QUERY_MODES, TaggedImage
from muvla.retrieval.rerank import (
    HUBNESS_CORRECTIONS,
    Ranking,
    RankingConfig,
    rank_images,
    read_tagged_images,
)
from muvla.utils.config import ConfigError, check_choices, output_settings, setting
from muvla.utils.progress import progress
from muvla.utils.shards import ShardSpec, UnitPlan, atomic_file, clean_stale_tmp, unit_ranges

DEFAULT_K = 5  # the paper's best K; the one default of "sentences per image" (pairs use it too)


@dataclass(kw_only=True)
class RetrievalSettings:
    """How each image's query is made and searched (METHOD §2)."""

    model: str = setting("default", help="Sentence-BERT: 'default' (bundled all-MiniLM-L6-v2), a local folder, "
                                         "or a name in the local HuggingFace cache")
    k: int = setting(DEFAULT_K, help="sentences retrieved per image (K)")
    query_mode: str = setting("salient", choices=QUERY_MODES,
                              help="salient: caption-like with counts, biggest objects first ('a man, two dogs'); "
                                   "official: de-duplicated tags joined by spaces (the reference recipe); "
                                   "counted: counts, most numerous first")
    hubness: str = setting("csls", choices=HUBNESS_CORRECTIONS,
                           help="csls: re-rank each image's top 100 by cos - r_s/2, r_s = the sentence's mean "
                                "cosine to its 10 nearest queries (sentences near everybody pay); none: plain "
                                "cosine top-K (the reference recipe)")
    index: str = setting("Flat", help="faiss index-factory string (inner product on unit vectors): Flat = exact, "
                                      "or e.g. IVF4096,Flat / HNSW32 / IVF4096,PQ32")
    nprobe: int = setting(16, help="IVF indexes: lists searched per query")
    train_size: int = setting(100_000, help="sentences sampled to train an index that needs training")
    unit_size: int = setting(20_000, help="sentences per embedding unit (one resumable .npy part each)")
    min_tag_score: float = setting(0.25, help="leave region tags scored below this out of the query (the best "
                                              "tag always stays); 0 keeps all (the reference recipe)")
    exclude_sentence_ids: Path | None = setting(None, help="text file, one sentence id per line, never retrieved "
                                                           "(e.g. the images' own captions)")
    encoder_backend: str = setting("auto", choices=encoders.BACKENDS,
                                   help="auto: ONNX Runtime on CPU when installed, else PyTorch (fp16 on CUDA); "
                                        "the backend used is recorded, and a rerun must use the same one")
    encode_batch_size: int = setting(128, help="sentences per encoder batch", runtime=True)
    query_batch_size: int = setting(500, help="queries encoded and searched per batch", runtime=True)
    device: str = setting("cpu", help="device of the sentence encoder (cpu, cuda)", runtime=True)

    def validate(self) -> None:
        check_choices(self, "retrieval")
        if self.k < 1:
            raise ConfigError(f"retrieval.k must be >= 1, got {self.k}")
        for name in ("nprobe", "train_size", "encode_batch_size", "unit_size", "query_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"retrieval.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_tag_score <= 1.0:
            raise ConfigError(f"retrieval.min_tag_score must be in [0, 1], got {self.min_tag_score}")
        if not self.index.strip():
            raise ConfigError("retrieval.index must be a faiss index-factory string such as 'Flat'")
        if self.exclude_sentence_ids is not None and not Path(self.exclude_sentence_ids).is_file():
            raise ConfigError(f"retrieval: exclude_sentence_ids file {self.exclude_sentence_ids} not found")


@dataclass
class RetrievalConfig(RetrievalSettings, StageRun):
    """``muvla retrieve``: the settings plus the regions and text stage outputs to read."""

    out: Path = setting(help="output folder (topk.parquet, queries.parquet, embeddings/, index.faiss)")
    regions: Path = setting(help="regions stage output folder (a region store)")
    text: Path = setting(help="text stage output folder (sentences.parquet)")

    def validate(self) -> None:
        super().validate()
        self.shard_spec()
        if not TextOutput(Path(self.text)).sentences.exists():
            raise ConfigError(f"retrieval: {TextOutput(Path(self.text)).sentences} not found (run the text stage)")
        if not RegionsOutput(Path(self.regions)).index.exists():
            raise ConfigError(f"retrieval: {RegionsOutput(Path(self.regions)).index} not found "
                              "(run the regions stage)")


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


def embedding_meta(cfg: RetrievalSettings, n_sentences: int, text_digest: str) -> dict[str, Any]:
    """What the sentence embedding units depend on (they are kept when only other inputs change)."""
    return {"model": cfg.model, "encoder_backend": cfg.encoder_backend, "unit_size": cfg.unit_size,
            "n_sentences": n_sentences, "text": text_digest}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def encode_units(cfg: RetrievalSettings, plan: UnitPlan, text: TextOutput, n: int) -> dict[str, Any]:
    """Encode this process's missing embedding units; returns counts and speed."""
    clean_stale_tmp(plan.folder)
    ranges = unit_ranges(n, cfg.unit_size)
    todo = plan.todo()
    encoded = 0
    if todo:
        encoders.get_encoder(cfg.model, cfg.device, cfg.encoder_backend)  # load (export) outside the timed loop
    t0 = time.time()
    for u in progress(todo, desc="encode sentences", unit="unit"):
        start, stop = ranges[u]
        texts = text.texts(range(start, stop))  # one unit's sentences: the corpus is never all in memory
        emb = encoders.encode([texts[i] for i in range(start, stop)], batch_size=cfg.encode_batch_size,
                              model=cfg.model, device=cfg.device, backend=cfg.encoder_backend)
        with plan.write(u) as tmp, open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float16))
        encoded += stop - start
    seconds = time.time() - t0
    return {"units_total": len(ranges), "units_encoded_now": len(todo), "sentences_encoded_now": encoded,
            "encode_seconds": round(seconds, 3),
            "encode_sentences_per_s": round(encoded / seconds, 1) if encoded and seconds > 0 else None}


def kept_unit_blocks(plan: UnitPlan, n_sentences: int, unit_size: int, keep: np.ndarray) -> Iterator[np.ndarray]:
    """The kept sentences' embeddings, one unit at a time, as float32 [m, d] (unit i holds ids
    [i*U, (i+1)*U)). WHY per unit: the whole float32 matrix is 4.6 GB at 3M sentences, and an index
    only needs one unit at a time to add it."""
    for u, (start, stop) in enumerate(unit_ranges(n_sentences, unit_size)):
        arr = np.load(plan.path(u), mmap_mode="r")
        if arr.shape[0] != stop - start:
            raise ConfigError(f"{plan.path(u)} has {arr.shape[0]} rows, expected {stop - start}; delete it and rerun")
        lo, hi = np.searchsorted(keep, [start, stop])
        yield np.ascontiguousarray(arr[keep[lo:hi] - start], dtype=np.float32)


def build_index(blocks: Callable[[], Iterable[np.ndarray]], n: int, spec: str, train_size: int,
                seed: int = 0) -> Any:
    """Inner-product faiss index from an index-factory string over ``n`` vectors that ``blocks()``
    yields in order (float32 [m, d] each); trained on a uniform sample of ``train_size`` of them when
    the index needs training. ``blocks`` is called once more for that sample, so only one block and
    the sample are ever in memory next to the index."""
    import faiss

    d = next(iter(blocks())).shape[1]
    try:
        index = faiss.IndexFlatIP(d) if spec == "Flat" else faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"retrieval: faiss cannot build index {spec!r}: {err}") from err
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        rows = np.arange(n) if n <= train_size else np.sort(rng.choice(n, train_size, replace=False))
        sample, offset = [], 0
        for block in blocks():
            lo, hi = np.searchsorted(rows, [offset, offset + block.shape[0]])
            sample.append(block[rows[lo:hi] - offset])
            offset += block.shape[0]
        try:
            index.train(np.concatenate(sample))
        except RuntimeError as err:
            raise ConfigError(f"retrieval: training index {spec!r} on {rows.size} sentences failed: {err}") from err
    for block in blocks():
        index.add(block)
    return index


def set_search_params(index: Any, nprobe: int, k: int) -> None:
    """nprobe for IVF indexes, efSearch >= k for HNSW; other indexes have nothing to set."""
    import faiss

    with contextlib.suppress(RuntimeError):  # raised when the index is not an IVF index
        faiss.extract_index_ivf(index).nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, 2 * k)


def _index_over(cfg: RetrievalSettings, output: RetrievalOutput, plan: UnitPlan, n: int, keep: np.ndarray,
                meta: dict[str, Any]) -> tuple[Any, np.ndarray, bool]:
    """The faiss index over the kept sentences (reused when its recorded recipe matches) and the
    index position -> sentence id map."""
    import faiss

    if output.index.exists() and output.index_ids.exists() and _read_json(output.index_meta) == meta:
        return faiss.read_index(str(output.index)), np.load(output.index_ids), True
    index = build_index(lambda: kept_unit_blocks(plan, n, cfg.unit_size, keep), int(keep.size), cfg.index,
                        cfg.train_size)
    with atomic_file(output.index) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_file(output.index_ids) as tmp, open(tmp, "wb") as f:
        np.save(f, keep)
    with atomic_file(output.index_meta) as tmp:
        tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return index, keep, False


class UnitEmbeddings:
    """Rows of the sentence embedding units by index position, read from memory-mapped parts on
    demand (the ranking step reads only its candidates' rows, never all 3M sentences at once)."""

    def __init__(self, plan: UnitPlan, unit_size: int, index_ids: np.ndarray) -> None:
        self.parts = [np.load(plan.path(u), mmap_mode="r") for u in range(plan.n_units)]
        self.unit_size = unit_size
        self.index_ids = index_ids

    def __len__(self) -> int:
        return len(self.index_ids)

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        sids = self.index_ids[np.asarray(positions, dtype=np.int64)]
        return np.stack([self.parts[s // self.unit_size][s % self.unit_size] for s in sids]).astype(np.float32)


def _search(cfg: RetrievalSettings, index: Any, index_ids: np.ndarray, embeddings: UnitEmbeddings,
            images: list[TaggedImage], k: int) -> tuple[TopK, list[str]]:
    """Top-k sentences of every image in image order (an approximate index may return fewer), and
    the query of each image ('' = no usable tag)."""
    ranking = RankingConfig(query_mode=cfg.query_mode, hubness=cfg.hubness, query_batch_size=cfg.query_batch_size)
    encode = functools.partial(encoders.encode, batch_size=cfg.encode_batch_size, model=cfg.model,
                               device=cfg.device, backend=cfg.encoder_backend)
    ranked = rank_images(images, index, embeddings, k, ranking, encode)
    return topk_rows([im.image_id for im in images], ranked, index_ids), ranked.queries


def topk_rows(image_ids: list[str], ranked: Ranking, index_ids: np.ndarray) -> TopK:
    """The top-K table of a ranking: slots without a neighbour (-1) are skipped, an image's ranks are
    0..found-1, rows in image order then rank order. Array operations, not a Python object per pair
    (15M pairs at CC3M size were ~1.3 GB of Python ints and floats)."""
    found = ranked.ids >= 0
    image, col = np.nonzero(found)
    rank = (np.cumsum(found, axis=1) - 1)[image, col]
    return TopK([image_ids[i] for i in image.tolist()], rank.astype(np.int32),
                index_ids[ranked.ids[image, col]].astype(np.int64), ranked.scores[image, col].astype(np.float32),
                ranked.cosines[image, col].astype(np.float32))


def _hubness(topk: TopK, n_indexed: int, n: int) -> dict[str, Any]:
    hits = np.bincount(topk.sentence_id, minlength=n) if len(topk) else np.zeros(n, np.int64)
    return {"fraction_of_corpus_retrieved": round(float((hits > 0).sum()) / max(n_indexed, 1), 6),
            "distinct_sentences_retrieved": int((hits > 0).sum()),
            "max_times_one_sentence_retrieved": int(hits.max()) if hits.size else 0,
            "most_retrieved_sentence_id": int(hits.argmax()) if len(topk) else None}


def run_retrieval(cfg: RetrievalConfig) -> dict[str, Any]:
    """Encode sentences (this process's units), then on the main process build the index and
    retrieve the top-K sentences of every image."""
    cfg.validate()
    shard = cfg.shard_spec()
    output = RetrievalOutput(Path(cfg.out))
    regions, text = RegionsOutput(Path(cfg.regions)), TextOutput(Path(cfg.text))
    n = text.count()
    if n == 0:
        raise ConfigError(f"retrieval: {text.sentences} holds no sentences")
    inputs = {"regions": regions.digest(), "text": text.digest()}
    if cfg.exclude_sentence_ids is not None:
        inputs["exclude_sentence_ids"] = digest_file(Path(cfg.exclude_sentence_ids))
    settings = output_settings(cfg, exclude=("regions", "text", "exclude_sentence_ids"))
    settings["encoder_backend"] = encoders.get_encoder(cfg.model, cfg.device, cfg.encoder_backend).backend
    cfg = dataclasses.replace(cfg, encoder_backend=settings["encoder_backend"])  # the backend that really runs
    emb_meta = embedding_meta(cfg, n, inputs["text"])
    emb_meta_path = output.embeddings / "meta.json"

    def clear(_old: BuildRecord | None) -> None:
        for path in (output.topk, output.queries, output.skipped, output.index, output.index_ids,
                     output.index_meta, *output.root.glob("summary*.json")):
            path.unlink(missing_ok=True)
        if output.embeddings.exists() and _read_json(emb_meta_path) != emb_meta:
            shutil.rmtree(output.embeddings)  # embeddings of another text store, model or unit size

    step = Step("retrieval", output.root, settings, inputs, output.outputs(), cfg,
                sources={"regions": regions.root, "text": text.root, "exclude_sentence_ids": cfg.exclude_sentence_ids},
                work=[output.embeddings], clear=clear)
    return run_step(step, lambda _start: _retrieve(cfg, shard, output, regions, text, n, emb_meta),
                    overwrite=cfg.overwrite, rank=shard.rank)


def _retrieve(cfg: RetrievalConfig, shard: ShardSpec, output: RetrievalOutput, regions: RegionsOutput,
              text: TextOutput, n: int, emb_meta: dict[str, Any]) -> StepResult:
    if shard.is_main:
        output.embeddings.mkdir(parents=True, exist_ok=True)
        with atomic_file(output.embeddings / "meta.json") as tmp:
            tmp.write_text(json.dumps(emb_meta, indent=2), encoding="utf-8")
    plan = UnitPlan(output.embeddings, "part", len(unit_ranges(n, cfg.unit_size)), shard, ".npy")
    summary: dict[str, Any] = {"shard": shard.rank, "num_shards": shard.world, "sentences": n}
    summary.update(encode_units(cfg, plan, text, n))
    if not shard.is_main:
        return StepResult({**summary, "status": "encoded_shard"}, complete=False)
    if not plan.complete():
        return StepResult({**summary, **plan.waiting("retrieval")}, complete=False)

    excluded = read_exclusions(cfg.exclude_sentence_ids, n)
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), excluded)
    if keep.size == 0:
        raise ConfigError("retrieval: every sentence is excluded; nothing left to retrieve")
    index_meta = {"index": cfg.index, "train_size": cfg.train_size, "embeddings": emb_meta,
                  "excluded": hashlib.sha256(excluded.tobytes()).hexdigest()[:16]}
    t0 = time.time()
    index, index_ids, reused = _index_over(cfg, output, plan, n, keep, index_meta)
    summary.update(index_reused=reused, index_seconds=round(time.time() - t0, 3))
    k = min(cfg.k, int(keep.size))
    set_search_params(index, cfg.nprobe, k)

    images = read_tagged_images(regions.root, cfg.min_tag_score)
    encoders.get_encoder(cfg.model, cfg.device, cfg.encoder_backend)  # load outside the timed loop
    t0 = time.time()
    topk, queries = _search(cfg, index, index_ids, UnitEmbeddings(plan, cfg.unit_size, index_ids), images, k)
    query_seconds = time.time() - t0
    with_query = [(im.image_id, q) for im, q in zip(images, queries) if q]
    skipped = [{"image_id": im.image_id, "reason": "no region tags"} for im, q in zip(images, queries) if not q]
    output.write_queries([i for i, _ in with_query], [q for _, q in with_query])
    output.write_topk(topk)
    with atomic_file(output.skipped) as tmp:
        tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped), encoding="utf-8")
    # an image's ranks are 0..found-1: images with a row minus those with all K (no per-image dict)
    n_short = int(np.count_nonzero(topk.rank == 0) - np.count_nonzero(topk.rank == cfg.k - 1))
    unique = len({q for _, q in with_query})
    summary.update(
        status="done", query_mode=cfg.query_mode, hubness_correction=cfg.hubness, index=cfg.index, k=cfg.k,
        excluded_sentences=int(excluded.size), indexed_sentences=int(keep.size),
        images=len(images), queries=len(with_query), unique_queries=unique, images_skipped=len(skipped),
        skipped_examples=[q["image_id"] for q in skipped[:20]], images_with_fewer_than_k=int(n_short),
        query_seconds=round(query_seconds, 3),
        queries_per_s=round(unique / query_seconds, 1) if unique and query_seconds > 0 else None,
        hubness=_hubness(topk, int(keep.size), n),
    )
    return StepResult(summary)


def describe(summary: dict[str, Any]) -> list[str]:
    """The few lines ``muvla retrieve`` prints at the end (details in summary.json)."""
    if summary.get("status") != "done":
        return [f"retrieval: {summary.get('status')}: {summary.get('note', '')}".rstrip(": ")]
    hub = summary.get("hubness", {})
    lines = [f"retrieval: top-{summary['k']} sentences for {summary['queries']} images "
             f"({summary['query_mode']} queries, {summary['index']} index over {summary['indexed_sentences']} "
             "sentences)" + (" (reused: already built)" if summary.get("reused") else ""),
             f"  {100 * hub.get('fraction_of_corpus_retrieved', 0):.1f}% of the sentences were retrieved at least once"]
    if summary.get("images_skipped"):
        lines.append(f"  {summary['images_skipped']} image(s) without tags were skipped (skipped.jsonl)")
    return lines
