"""The offline COCO-80 detector: MobileNetV3-CenterNet (TensorFlow.js graph) run by our own executor.

Input: RGB 0-255, the image scaled to fit 512x512 and centred on a black canvas (the letterbox
the model was trained with). Output ``tower_0/detections``: 100 rows (x1, y1, x2, y2, score, class)
in canvas pixels, already peak-picked by the graph (3x3 max-pool on the class heatmaps, top-100);
we map them back to image pixels and the region selection adds class-wise NMS.

The convolutional trunk runs on the whole batch; the graph's decoding tail is written for batch 1,
so it is fed each image's heatmaps separately (the executor can start from any node).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from muvla.regions.backends import CropFeaturizer
from muvla.regions.object_regions import Detections, ObjectDetectorBackend, RegionSelection
from muvla.regions.tags import COCO80_NAMES
from muvla.regions.tfjs_graph import GraphError, TfjsGraph
from muvla.regions.weights import WeightsError, require_centernet, verify

INPUT_NODE = "tower_0/images"
HEATMAP_NODE = "tower_0/keypoints"
SIZE_NODE = "tower_0/wh"
DETECTIONS_NODE = "tower_0/detections"
INPUT_SIZE = 512


@dataclass(frozen=True)
class Letterbox:
    """Image pixel = (canvas pixel - offset) / scale."""

    scale: float
    dx: int
    dy: int


def letterbox(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """uint8 RGB [H, W, 3] -> float canvas [size, size, 3] (0-255, image centred, black borders).

    Resized by torch (antialiased bilinear) rather than PIL, so the canvas, and with it the recorded
    reference outputs of the test fixture, depend only on the pinned torch version.
    """
    height, width = image.shape[:2]
    scale = min(size / height, size / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.zeros((size, size, 3), dtype=torch.float32)
    dx, dy = (size - new_w) // 2, (size - new_h) // 2
    canvas[dy:dy + new_h, dx:dx + new_w] = resized[0].permute(1, 2, 0).clamp(0.0, 255.0)
    return canvas, Letterbox(scale=scale, dx=dx, dy=dy)


class CenterNetDetector:
    """MobileNetV3-CenterNet: RGB images -> raw detections (no score threshold, no NMS)."""

    classes = COCO80_NAMES

    def __init__(self, folder: Path | None = None):
        if folder is None:
            folder = require_centernet()
        else:  # a user-given copy must be the exact pinned model: class order and decoding depend on it
            folder = Path(folder)
            verify(folder)
        try:
            self.graph = TfjsGraph.load(folder / "centernet.json")
        except GraphError as err:
            raise WeightsError(f"CenterNet graph in {folder} cannot be loaded ({err}); delete the folder and "
                               "run `python -m muvla.regions.weights`") from err

    def raw_outputs(self, canvases: torch.Tensor) -> torch.Tensor:
        """Canvases [B, 512, 512, 3] -> the graph's detections [B, 100, 6] in canvas pixels."""
        heatmaps, sizes = self.graph.run({INPUT_NODE: canvases}, [HEATMAP_NODE, SIZE_NODE])
        rows = [self.graph.run({HEATMAP_NODE: heatmaps[i:i + 1], SIZE_NODE: sizes[i:i + 1]}, [DETECTIONS_NODE])[0]
                for i in range(len(canvases))]
        return torch.cat(rows)

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        boxed = [letterbox(image) for image in images]
        raw = self.raw_outputs(torch.stack([canvas for canvas, _ in boxed])).numpy()
        out = []
        for rows, (_, lb) in zip(raw, boxed):
            boxes = (rows[:, :4] - np.array([lb.dx, lb.dy, lb.dx, lb.dy], dtype=np.float32)) / lb.scale
            out.append(Detections(boxes=boxes.astype(np.float32), scores=rows[:, 4].astype(np.float32),
                                  class_ids=np.rint(rows[:, 5]).astype(np.int64)))
        return out


class CenterNetBackend(ObjectDetectorBackend):
    """Regions from the offline COCO detector: whole image + detected objects, Lite0 crop features."""

    name = "centernet"
    detector_classes = list(COCO80_NAMES)

    def __init__(self, images: Path, featurizer: CropFeaturizer, selection: RegionSelection | None = None,
                 weights: Path | None = None, tag_words: dict[str, str] | None = None, batch_images: int = 4):
        super().__init__(images, featurizer, selection or RegionSelection(), tag_words, batch_images)
        self.detector = CenterNetDetector(weights)

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        return self.detector(images)

