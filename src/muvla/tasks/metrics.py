"""Task-independent metrics: accuracy, box IoU, retrieval recall@k and the Meta-Ave.

All metrics are fractions in [0, 1] (not percentages); the table renders percentages. The
task-specific official metrics (VQA accuracy, NLVR2 consistency, RefCOCO+ accuracy) live in their
task modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def accuracy(predictions: Sequence, targets: Sequence) -> float:
    """Fraction of positions where prediction == target."""
    if len(predictions) != len(targets):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(targets)} targets")
    if len(targets) == 0:
        raise ValueError("accuracy: no targets to score")
    return float(np.mean([p == t for p, t in zip(predictions, targets)]))


def box_iou(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> np.ndarray:
    """IoU of boxes x1, y1, x2, y2: [N, 4] x [M, 4] -> [N, M] (single boxes give a scalar array).

    Continuous areas, which equal the refer toolkit's inclusive-pixel computeIoU on xywh boxes
    (x2 = x + w). Boxes with NaN coordinates (no prediction) get IoU 0.
    """
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    single = a_arr.ndim == 1 and b_arr.ndim == 1
    a2 = a_arr.reshape(-1, 4)
    b2 = b_arr.reshape(-1, 4)
    ix1 = np.maximum(a2[:, None, 0], b2[None, :, 0])
    iy1 = np.maximum(a2[:, None, 1], b2[None, :, 1])
    ix2 = np.minimum(a2[:, None, 2], b2[None, :, 2])
    iy2 = np.minimum(a2[:, None, 3], b2[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = np.clip(a2[:, 2] - a2[:, 0], 0, None) * np.clip(a2[:, 3] - a2[:, 1], 0, None)
    area_b = np.clip(b2[:, 2] - b2[:, 0], 0, None) * np.clip(b2[:, 3] - b2[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    iou = np.nan_to_num(iou, nan=0.0)
    return iou.reshape(()) if single else iou


def _float_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores)
    return s if np.issubdtype(s.dtype, np.floating) else s.astype(np.float64)


def retrieval_ranks(scores: np.ndarray, text_to_image: np.ndarray | Sequence[int],
                    chunk: int = 1024, text_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(i2t_rank [n_images], t2i_rank [n_texts]): 0-based rank of each image's best own text and of
    each text's own image, from a score matrix [n_images, n_texts].

    ``text_to_image[t]`` is the row (image) of text t. Ties rank the lower index first (as a stable
    sort would), so results are deterministic. Ranks are counted in row chunks instead of sorting, so
    a 5k x 25k matrix needs no extra full-size copies. ``text_scores`` (same shape): the matrix the
    text->image ranks come from, when it differs (two-stage retrieval re-scores each direction's own
    top k); default ``scores``.
    """
    s = _float_scores(scores)
    ts = s if text_scores is None else _float_scores(text_scores)
    if ts.shape != s.shape:
        raise ValueError(f"retrieval_recall: text_scores has shape {ts.shape}, scores {s.shape}")
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if s.ndim != 2:
        raise ValueError(f"retrieval_recall: scores must be [n_images, n_texts], got shape {s.shape}")
    n_images, n_texts = s.shape
    if t2i.shape != (n_texts,):
        raise ValueError(f"retrieval_recall: text_to_image has {t2i.shape} entries, expected ({n_texts},)")
    if n_texts == 0 or n_images == 0:
        raise ValueError("retrieval_recall: empty score matrix")
    if t2i.min() < 0 or t2i.max() >= n_images:
        raise ValueError(f"retrieval_recall: text_to_image holds rows outside 0..{n_images - 1}")
    if len(np.unique(t2i)) != n_images:
        raise ValueError("retrieval_recall: some image has no text (image->text recall undefined)")
    if np.isnan(s).any() or (ts is not s and np.isnan(ts).any()):
        raise ValueError("retrieval_recall: scores contain NaN")
    cols = np.arange(n_texts)
    true_score = ts[t2i, cols]  # [n_texts] score of each text with its own image
    t2i_rank = np.zeros(n_texts, dtype=np.int64)
    i2t_rank = np.zeros(n_images, dtype=np.int64)
    for start in range(0, n_images, chunk):
        block = s[start:start + chunk]  # [b, n_texts]
        rows = np.arange(start, start + len(block))
        # text -> image: images scoring above the true one, or equal with a lower index
        text_block = ts[start:start + chunk]
        t2i_rank += (text_block > true_score).sum(0) + \
            ((text_block == true_score) & (rows[:, None] < t2i[None, :])).sum(0)
        # image -> text: rank of the image's best own text (first one on ties)
        own = t2i[None, :] == rows[:, None]
        best = np.argmax(np.where(own, block, -np.inf), axis=1)
        best_score = block[np.arange(len(block)), best]
        i2t_rank[rows] = (block > best_score[:, None]).sum(1) + \
            ((block == best_score[:, None]) & (cols[None, :] < best[:, None])).sum(1)
    return i2t_rank, t2i_rank


def retrieval_recall(scores: np.ndarray, text_to_image: np.ndarray | Sequence[int],
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024, text_scores: np.ndarray | None = None) -> dict:
    """Recall@k both directions from a score matrix [n_images, n_texts] (see :func:`retrieval_ranks`,
    also for ``text_scores``); an image counts as found (image->text) when any of its texts is in its
    top k. Returns i2t_r{k}, t2i_r{k}, rsum (sum of those, fractions) and mean_recall (their mean)."""
    i2t_rank, t2i_rank = retrieval_ranks(scores, text_to_image, chunk, text_scores)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
    out["rsum"] = float(sum(out.values()))
    out["mean_recall"] = out["rsum"] / (2 * len(ks))
    return out


def mean_recall_bootstrap(scores: np.ndarray, text_to_image: np.ndarray | Sequence[int],
                          ks: Sequence[int] = (1, 5, 10), n_boot: int = 2000, seed: int = 0,
                          text_scores: np.ndarray | None = None) -> np.ndarray:
    """Mean recall of ``n_boot`` bootstrap resamples of the images (each image with all its texts;
    the candidates stay the full set): [n_boot] values whose percentiles are a confidence interval.
    ``text_scores`` as in :func:`retrieval_ranks`."""
    t2i = np.asarray(text_to_image, dtype=np.int64)
    i2t_rank, t2i_rank = retrieval_ranks(scores, t2i, text_scores=text_scores)
    n_images = len(i2t_rank)
    image_hits = sum((i2t_rank < k).astype(np.float64) for k in ks)  # [n_images]
    text_hits = np.bincount(t2i, weights=sum((t2i_rank < k).astype(np.float64) for k in ks), minlength=n_images)
    texts = np.bincount(t2i, minlength=n_images).astype(np.float64)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot).astype(np.float64)
    i2t = counts @ image_hits / n_images
    t2i_mean = (counts @ text_hits) / (counts @ texts)
    return (i2t + t2i_mean) / (2 * len(ks))


def meta_ave(metrics: Mapping[str, float]) -> float:
    """Meta-Ave: the plain mean of the reported task metrics (fractions)."""
    if not metrics:
        raise ValueError("meta_ave: no metrics")
    return float(np.mean([float(v) for v in metrics.values()]))
