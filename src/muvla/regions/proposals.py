"""Class-agnostic region proposals (Felzenszwalb segments) and box utilities (IoU, NMS).

Why Felzenszwalb: it needs no trained detector and no download, runs in milliseconds on a downscaled
image, and its segments at a few scales give object-like boxes that the classifier then tags.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProposalConfig:
    """Knobs of the proposal generator (see `propose_boxes`)."""

    max_side: int = 128            # the image is downscaled to this longest side before segmenting
    scales: tuple[float, ...] = (400.0, 150.0, 50.0)  # coarse -> fine Felzenszwalb scales
    sigma: float = 0.8
    min_box_frac: float = 0.01     # drop boxes smaller than this fraction of the image area
    max_aspect: float = 8.0        # drop slivers longer than this ratio
    dedup_iou: float = 0.8         # proposals overlapping a kept one more than this are duplicates
    max_proposals: int = 48        # cap on the crops classified per image (cost is linear in it)

    def validate(self) -> None:
        if self.max_side < 8:
            raise ValueError(f"proposal max_side must be >= 8, got {self.max_side}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"proposal scales must be positive, got {self.scales}")
        if not 0.0 <= self.min_box_frac < 1.0:
            raise ValueError(f"min_box_frac must be in [0, 1), got {self.min_box_frac}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if not 0.0 < self.dedup_iou <= 1.0:
            raise ValueError(f"dedup_iou must be in (0, 1], got {self.dedup_iou}")
        if self.max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {self.max_proposals}")


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of x1y1x2y2 boxes [N, 4] (0 for degenerate boxes)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of x1y1x2y2 boxes: a [N, 4], b [M, 4] -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    Ties are broken by the lower index (stable sort) so the result is deterministic.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"nms: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    ious = box_iou(boxes, boxes)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= ious[i] > iou
    return np.asarray(keep, dtype=np.int64)


def whole_image_box(width: int, height: int) -> np.ndarray:
    return np.array([0.0, 0.0, float(width), float(height)], dtype=np.float32)


def propose_boxes(image: np.ndarray, cfg: ProposalConfig | None = None) -> np.ndarray:
    """RGB uint8 image [H, W, 3] -> proposals [P, 4] (x1y1x2y2 pixels, float32); row 0 = whole image.

    Segments at coarse scales come first (they tend to be whole objects), near-duplicates are dropped,
    and at most ``cfg.max_proposals`` boxes are returned (whole image included).
    """
    from skimage.segmentation import felzenszwalb
    from skimage.transform import resize

    cfg = cfg or ProposalConfig()
    height, width = image.shape[:2]
    boxes = [whole_image_box(width, height)]
    if min(height, width) < 2:
        return np.stack(boxes)
    factor = min(1.0, cfg.max_side / max(height, width))
    small_h, small_w = max(2, round(height * factor)), max(2, round(width * factor))
    small = resize(image, (small_h, small_w), order=1, anti_aliasing=factor < 1.0, preserve_range=True)
    small = small.astype(np.float64) / 255.0
    sx, sy = width / small_w, height / small_h
    min_area = cfg.min_box_frac * width * height
    for scale in cfg.scales:
        labels = felzenszwalb(small, scale=scale, sigma=cfg.sigma, min_size=max(4, int(scale / 4)))
        n = int(labels.max()) + 1
        ys, xs = np.indices(labels.shape)
        flat = labels.ravel()
        x1 = np.full(n, small_w, dtype=np.int64)
        y1 = np.full(n, small_h, dtype=np.int64)
        x2 = np.zeros(n, dtype=np.int64)
        y2 = np.zeros(n, dtype=np.int64)
        np.minimum.at(x1, flat, xs.ravel())
        np.minimum.at(y1, flat, ys.ravel())
        np.maximum.at(x2, flat, xs.ravel() + 1)
        np.maximum.at(y2, flat, ys.ravel() + 1)
        seg = np.stack([x1 * sx, y1 * sy, x2 * sx, y2 * sy], axis=1).astype(np.float32)
        seg[:, [0, 2]] = np.clip(seg[:, [0, 2]], 0, width)
        seg[:, [1, 3]] = np.clip(seg[:, [1, 3]], 0, height)
        # largest segments first within a scale: deterministic and object-first
        seg = seg[np.argsort(-box_area(seg), kind="stable")]
        for box in seg:
            bw, bh = box[2] - box[0], box[3] - box[1]
            if bw <= 0 or bh <= 0 or bw * bh < min_area or max(bw / bh, bh / bw) > cfg.max_aspect:
                continue
            if box_iou(box[None], np.stack(boxes)).max() > cfg.dedup_iou:
                continue
            boxes.append(box)
            if len(boxes) >= cfg.max_proposals:
                return np.stack(boxes)
    return np.stack(boxes)
