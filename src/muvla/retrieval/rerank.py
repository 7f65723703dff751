"""Rank sentences for image queries: cosine top-M candidates, then an optional hubness correction.

Why a correction: a few generic sentences ("A man standing next to a table.") are close to very many
queries and crowd every list (the reference recipe retrieves only ~23% of CC captions). CSLS
(Lample et al. 2018, "Word translation without parallel data") scores a pair by
``2 cos(q, s) - r_q - r_s``, where ``r_s`` is the mean cosine of sentence ``s`` to its ``neighbours``
nearest queries: a sentence near everybody pays for it. ``r_q`` is a constant per image, so ranking
one image's candidates needs only ``cos - r_s / 2``, the score reported here.

Cost: one exact search of the queries (as before) plus, for the sentences that are some image's
candidate, a top-``neighbours`` search against a bank of at most ``bank_size`` query embeddings (all
queries when there are fewer; a random sample otherwise), so it stays linear in the number of images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muvla.corpus.region_store import RegionStore
from muvla.retrieval.queries import QUERY_MODES, TaggedImage, make_query

HUBNESS_CORRECTIONS = ("none", "csls")


@dataclass
class RankingConfig:
    """Query mode and re-ranking of the retrieval step; ``official`` + ``none`` is the reference recipe."""

    query_mode: str = "salient"
    hubness: str = "csls"  # "none": plain cosine top-K; "csls": cross-domain similarity local scaling
    neighbours: int = 10  # CSLS: a sentence's hubness is its mean cosine to this many nearest queries
    candidates: int = 100  # cosine top-M per image that the correction re-ranks
    bank_size: int = 100_000  # queries that measure hubness (a random sample when there are more)
    query_batch_size: int = 500
    seed: int = 0  # bank sample

    def validate(self) -> None:
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"ranking: query_mode {self.query_mode!r} not in {QUERY_MODES}")
        if self.hubness not in HUBNESS_CORRECTIONS:
            raise ValueError(f"ranking: hubness {self.hubness!r} not in {HUBNESS_CORRECTIONS}")
        for name in ("neighbours", "candidates", "bank_size", "query_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ranking: {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Ranking:
    """Top-k per query: index positions (-1 = nothing found), ranking scores and plain cosines."""

    ids: np.ndarray  # [n, k] int64
    scores: np.ndarray  # [n, k] float32, what the list is sorted by
    cosines: np.ndarray  # [n, k] float32
    queries: list[str] = field(default_factory=list)  # the query text per image (rank_images only)


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def sentence_hubness(sentences: np.ndarray, bank: np.ndarray, neighbours: int, batch_size: int = 4096) -> np.ndarray:
    """Mean cosine of every sentence row to its ``neighbours`` nearest bank queries (CSLS ``r_s``)."""
    import faiss

    if len(bank) == 0:
        raise ValueError("sentence_hubness: the query bank is empty")
    kk = min(neighbours, len(bank))
    bank_index = faiss.IndexFlatIP(bank.shape[1])
    bank_index.add(_as_float32(bank))
    out = np.empty(len(sentences), dtype=np.float32)
    for start in range(0, len(sentences), batch_size):
        sims, _ = bank_index.search(_as_float32(sentences[start:start + batch_size]), kk)
        out[start:start + batch_size] = sims.mean(axis=1)
    return out


def rank_sentences(query_embeddings: np.ndarray, index: Any, sentence_embeddings: np.ndarray, k: int,
                   cfg: RankingConfig, bank: np.ndarray | None = None) -> Ranking:
    """Top-k index positions per query (rows of L2-normalised ``query_embeddings``).

    ``index``: a faiss inner-product index over ``sentence_embeddings`` (rows = index positions;
    float16 or a memory map is fine, only candidates' rows are read). ``bank``: the queries that
    measure hubness, one row per image so frequent queries weigh more (default: ``query_embeddings``).
    """
    cfg.validate()
    if k < 1:
        raise ValueError(f"rank_sentences: k must be >= 1, got {k}")
    n = len(query_embeddings)
    if len(sentence_embeddings) != index.ntotal:
        raise ValueError(f"rank_sentences: {len(sentence_embeddings)} sentence embeddings for an index of "
                         f"{index.ntotal}")
    ids = np.full((n, k), -1, dtype=np.int64)
    scores = np.zeros((n, k), dtype=np.float32)
    cosines = np.zeros((n, k), dtype=np.float32)
    if n == 0 or index.ntotal == 0:
        return Ranking(ids, scores, cosines)
    correct = cfg.hubness == "csls"
    m = min(max(k, cfg.candidates) if correct else k, index.ntotal)
    hub = np.full(index.ntotal, np.nan, dtype=np.float32)
    if correct:
        bank = query_embeddings if bank is None else bank
        if len(bank) > cfg.bank_size:
            rows = np.random.default_rng(cfg.seed).choice(len(bank), cfg.bank_size, replace=False)
            bank = bank[np.sort(rows)]
        bank = _as_float32(bank)
    for start in range(0, n, cfg.query_batch_size):
        stop = min(start + cfg.query_batch_size, n)
        cos, pos = index.search(_as_float32(query_embeddings[start:stop]), m)
        score = cos
        if correct:
            found = pos >= 0
            todo = np.unique(pos[found])
            todo = todo[np.isnan(hub[todo])]
            if todo.size:
                hub[todo] = sentence_hubness(np.asarray(sentence_embeddings[todo]), bank, cfg.neighbours)
            score = np.where(found, cos - 0.5 * hub[np.maximum(pos, 0)], -np.inf).astype(np.float32)
        order = np.argsort(-score, axis=1, kind="stable")[:, :k]
        kk = order.shape[1]
        ids[start:stop, :kk] = np.take_along_axis(pos, order, axis=1)
        scores[start:stop, :kk] = np.take_along_axis(score, order, axis=1)
        cosines[start:stop, :kk] = np.take_along_axis(cos, order, axis=1)
    missing = ids < 0
    scores[missing] = 0.0
    cosines[missing] = 0.0
    return Ranking(ids, scores, cosines)


def rank_images(images: list[TaggedImage], index: Any, sentence_embeddings: np.ndarray, k: int,
                cfg: RankingConfig, encode: Callable[[list[str]], np.ndarray]) -> Ranking:
    """The retrieval step of the stage: one query per image, each distinct query encoded once, ranked.

    ``encode`` maps texts to L2-normalised rows (e.g. ``muvla.encoders.encode``). An image without a
    usable tag gets the query '' and a row of -1; the hubness bank holds one row per image with a query.
    """
    cfg.validate()
    queries = [make_query(im.tags, cfg.query_mode, im.areas) for im in images]
    ids = np.full((len(images), k), -1, np.int64)
    scores = np.zeros((len(images), k), np.float32)
    cosines = np.zeros((len(images), k), np.float32)
    unique = list(dict.fromkeys(q for q in queries if q))
    if not unique:
        return Ranking(ids, scores, cosines, queries)
    emb = _as_float32(encode(unique))
    row = {q: j for j, q in enumerate(unique)}
    per_image = np.asarray([row[q] for q in queries if q], dtype=np.int64)
    ranked = rank_sentences(emb, index, sentence_embeddings, k, cfg, bank=emb[per_image])
    has_query = np.asarray([bool(q) for q in queries], dtype=bool)
    ids[has_query] = ranked.ids[per_image]
    scores[has_query] = ranked.scores[per_image]
    cosines[has_query] = ranked.cosines[per_image]
    return Ranking(ids, scores, cosines, queries)


def read_tagged_images(regions: Path, min_tag_score: float = 0.0) -> list[TaggedImage]:
    """Every image of a region store with its tags, scores and box area fractions (region order).

    Reads only the index, boxes and scores (``RegionStore.iter_geometry``), never the features, so it
    stays cheap for millions of images. ``min_tag_score > 0`` leaves lower-scored tags out, but the
    best tag always stays (as the stage's ``min_tag_score``).
    """
    images = []
    for g in RegionStore(Path(regions)).iter_geometry():
        areas = g.areas()
        keep = [j for j, t in enumerate(g.tags) if t and g.scores[j] >= min_tag_score]
        named = [j for j, t in enumerate(g.tags) if t]
        if not keep and named:
            keep = [max(named, key=lambda j: g.scores[j])]
        images.append(TaggedImage(str(g.image_id), [g.tags[j] for j in keep], g.scores[keep], areas[keep]))
    return images
