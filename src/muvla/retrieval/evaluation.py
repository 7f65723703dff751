"""Own-caption recall@k of a ranking on a development set, with bootstrap confidence intervals.

Images are the unit of resampling: two modes are compared on the same resampled images (a paired
bootstrap), because their errors are strongly correlated and two separate intervals overlap even
when one mode is better on almost every resample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from muvla.retrieval.devsets import DevSet
from muvla.retrieval.rerank import RankingConfig, rank_images

KS = (1, 5, 10)


@dataclass
class Interval:
    """Per-k estimate with a percentile bootstrap interval (arrays parallel to the ks)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def own_caption_hits(devset: DevSet, sentence_embeddings: np.ndarray, cfg: RankingConfig,
                     encode: Callable[[list[str]], np.ndarray], ks: tuple[int, ...] = KS) -> np.ndarray:
    """[images, len(ks)] bool: is one of the image's own captions among its top k?

    ``sentence_embeddings`` are the rows of ``devset.sentences``. An image's excluded rows are taken
    out of its list before counting (the list is fetched long enough for that).
    """
    import faiss

    if len(sentence_embeddings) != len(devset.sentences):
        raise ValueError(f"{devset.name}: {len(sentence_embeddings)} embeddings for {len(devset.sentences)} sentences")
    index = faiss.IndexFlatIP(sentence_embeddings.shape[1])
    index.add(np.ascontiguousarray(sentence_embeddings, dtype=np.float32))
    spare = max((len(e) for e in devset.excluded), default=0)
    ranked = rank_images(devset.images, index, sentence_embeddings, max(ks) + spare, cfg, encode)
    hits = np.zeros((len(devset.images), len(ks)), dtype=bool)
    for i, (ids, relevant, excluded) in enumerate(zip(ranked.ids, devset.relevant, devset.excluded)):
        ids = ids[(ids >= 0) & ~np.isin(ids, excluded)]
        found = np.isin(ids, relevant)
        hits[i] = [found[:k].any() for k in ks]
    return hits


def _percentiles(samples: np.ndarray, point: np.ndarray) -> Interval:
    return Interval(point, np.percentile(samples, 2.5, axis=0), np.percentile(samples, 97.5, axis=0))


def bootstrap_recall(hits: np.ndarray, resamples: int = 2000, seed: int = 0) -> Interval:
    """Recall per k with a 95% percentile bootstrap interval over images."""
    hits = np.asarray(hits, dtype=np.float64)
    rows = np.random.default_rng(seed).integers(0, len(hits), size=(resamples, len(hits)))
    return _percentiles(hits[rows].mean(axis=1), hits.mean(axis=0))


def paired_difference(hits: np.ndarray, reference: np.ndarray, resamples: int = 2000, seed: int = 0) -> Interval:
    """Recall(hits) - recall(reference) per k, 95% interval from resampling the same images for both."""
    if np.shape(hits) != np.shape(reference):
        raise ValueError(f"paired_difference: shapes {np.shape(hits)} and {np.shape(reference)} differ")
    return bootstrap_recall(np.asarray(hits, dtype=np.float64) - np.asarray(reference, dtype=np.float64),
                            resamples, seed)
