"""Paired statistics of an experiment: per-image retrieval hits, and the paired bootstrap of a gap.

Two models evaluated on the same held-out images are compared image by image: every bootstrap
resample draws the test images (with replacement) AND the seeds (with replacement) once, and both
models are scored on that same resample, so the interval of their gap reflects the variation over
images and over pre-training seeds together, not the seed spread alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muvla.tasks.metrics import retrieval_ranks

KS = (1, 5, 10)


@dataclass(frozen=True)
class ImageHits:
    """One retrieval evaluation, reduced to what mean recall needs per image (rows: the images in
    the evaluation's order, the same for every model scored on the same captions file).

    ``i2t_rank`` [n_images]: 0-based rank of the image's best own caption; ``t2i_rank`` [n_texts]:
    rank of each caption's own image; ``text_to_image`` [n_texts]: the row of each caption."""

    image_ids: tuple[str, ...]
    i2t_rank: np.ndarray
    t2i_rank: np.ndarray
    text_to_image: np.ndarray

    @classmethod
    def from_scores(cls, image_ids: Sequence[object], scores: np.ndarray, text_to_image: np.ndarray,
                    text_scores: np.ndarray | None = None) -> ImageHits:
        i2t, t2i = retrieval_ranks(scores, text_to_image, text_scores=text_scores)
        return cls(tuple(str(i) for i in image_ids), i2t, t2i, np.asarray(text_to_image, dtype=np.int64))

    @classmethod
    def from_evaluation(cls, folder: Path, stem: str) -> ImageHits:
        """Read what ``muvla evaluate --task retrieval`` wrote into ``folder`` (its score matrices,
        caption -> image rows and the image ids of the predictions file)."""
        import json

        scores = np.load(folder / f"scores_{stem}.npy")
        t2i_path = folder / f"scores_t2i_{stem}.npy"
        preds = json.loads((folder / f"predictions_{stem}.json").read_text(encoding="utf-8"))
        ids = [row["image_id"] for row in preds["image_to_text"]]
        return cls.from_scores(ids, scores, np.load(folder / f"text_to_image_{stem}.npy"),
                               np.load(t2i_path) if t2i_path.is_file() else None)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def per_image(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image_hits, text_hits, texts), each [n_images]: hits summed over k in KS of the image as a
        query, of its captions as queries, and its number of captions."""
        image_hits = sum((self.i2t_rank < k).astype(np.float64) for k in KS)
        text_hits = np.bincount(self.text_to_image, weights=sum((self.t2i_rank < k).astype(np.float64) for k in KS),
                                minlength=self.n_images)
        texts = np.bincount(self.text_to_image, minlength=self.n_images).astype(np.float64)
        return image_hits, text_hits, texts

    def mean_recall(self, counts: np.ndarray | None = None) -> np.ndarray:
        """Mean recall (mean of R@1/5/10 both ways, a fraction) with image weights ``counts``
        [n_boot, n_images] (a bootstrap resample each), or of the evaluation itself ([1])."""
        image_hits, text_hits, texts = self.per_image()
        w = np.ones((1, self.n_images)) if counts is None else np.asarray(counts, dtype=np.float64)
        i2t = (w @ image_hits) / w.sum(1)
        t2i = (w @ text_hits) / (w @ texts)
        return (i2t + t2i) / (2 * len(KS))


@dataclass(frozen=True)
class Gap:
    """``a - b`` in mean recall (fractions) on the same images and seeds, with its paired bootstrap
    interval; ``per_seed`` [n_seeds] the gap of each shared seed on all the images."""

    a: str
    b: str
    gap: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    seeds: tuple[int, ...]
    n_images: int
    n_boot: int

    @property
    def verdict(self) -> str:
        """Worded from the interval: a difference is claimed only when the interval excludes zero."""
        if self.low > 0:
            return "holds"
        if self.high < 0:
            return "reversed"
        return "not distinguishable at this size"


def paired_gap(a: str, b: str, hits_a: dict[int, ImageHits], hits_b: dict[int, ImageHits], n_boot: int = 2000,
               seed: int = 0, level: float = 0.95) -> Gap:
    """Paired bootstrap of mean recall ``a - b`` over the seeds both were run with (seed -> hits).

    Each of ``n_boot`` resamples draws the images (multinomial counts) and the seeds (indices with
    replacement) once; the gap of a resample is the mean over the drawn seeds of a's minus b's mean
    recall on the drawn images. The seed draw and the image draw are the same for both models."""
    seeds = sorted(set(hits_a) & set(hits_b))
    if not seeds:
        raise ValueError(f"paired_gap: {a} and {b} share no seed")
    first = hits_a[seeds[0]]
    for s in seeds:
        for name, h in ((a, hits_a[s]), (b, hits_b[s])):
            if h.image_ids != first.image_ids:
                raise ValueError(f"paired_gap: {name} seed {s} was scored on other images than {a} seed {seeds[0]}")
    rng = np.random.default_rng(seed)
    n = first.n_images
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # [n_boot, n_images]
    diffs = np.stack([hits_a[s].mean_recall(counts) - hits_b[s].mean_recall(counts) for s in seeds])  # [S, B]
    drawn = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))  # [B, S]
    boot = diffs[drawn, np.arange(n_boot)[:, None]].mean(1)  # [B]
    per_seed = tuple(float(hits_a[s].mean_recall()[0] - hits_b[s].mean_recall()[0]) for s in seeds)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Gap(a, b, float(np.mean(per_seed)), float(low), float(high), per_seed, tuple(seeds), n, n_boot)
