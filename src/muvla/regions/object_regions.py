"""Shared part of the real-detector backends (CenterNet, HuggingFace): detections -> ImageRegions.

A detector backend only has to turn a batch of RGB images into `Detections` (boxes in image pixels,
scores, class ids). This module does the rest the same way for every detector: class-wise NMS,
merging near-identical boxes of different classes, the score threshold and region cap, region 0 =
the whole image, EfficientNet-Lite0 crop features for every region (crops of a whole batch of
images go through the backbone together) and tags normalised to caption words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muvla.corpus.region_store import ImageRegions
from muvla.regions.backends import CropFeaturizer, ImageFolderMixin, InputItem, _mark_duplicates, crop
from muvla.regions.efficientnet import EfficientNetLite0, imagenet_tags
from muvla.regions.images import RejectedImage, list_images
from muvla.regions.proposals import box_iou, nms, whole_image_box
from muvla.regions.tags import caption_word


@dataclass
class Detections:
    """One image's detections: boxes [n, 4] (x1, y1, x2, y2 image pixels), scores [n], class ids [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def take(self, keep: np.ndarray | list[int]) -> Detections:
        keep = np.asarray(keep, dtype=np.int64)
        return Detections(self.boxes[keep], self.scores[keep], self.class_ids[keep])

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class RegionSelection:
    """Which detections become regions."""

    min_score: float = 0.15         # detections below this score are not stored at all
    max_regions: int = 36           # including region 0 (the whole image)
    nms_iou: float = 0.5            # class-wise NMS
    duplicate_iou: float = 0.9      # boxes of different classes overlapping this much are one object


def classwise_nms(det: Detections, iou: float) -> Detections:
    """Greedy NMS within each class; result ordered by score (highest first)."""
    keep: list[int] = []
    for cls in np.unique(det.class_ids):
        idx = np.flatnonzero(det.class_ids == cls)
        keep.extend(int(idx[k]) for k in nms(det.boxes[idx], det.scores[idx], iou))
    keep.sort(key=lambda i: (-float(det.scores[i]), i))
    return det.take(keep)


def merge_duplicates(det: Detections, iou: float) -> Detections:
    """Drop a box when a higher-scored box of another class covers the same object (IoU >= ``iou``).

    WHY: a detector often fires "cup" and "bowl", or "car" and "truck", on the same object; two
    regions with one box and conflicting tags add noise to the query and to the region-tag task.
    """
    if len(det) < 2:
        return det
    order = np.argsort(-det.scores, kind="stable")
    ious = box_iou(det.boxes[order], det.boxes[order])
    keep: list[int] = []
    for pos in range(len(order)):
        if any(ious[pos, k] >= iou for k in keep):
            continue
        keep.append(pos)
    return det.take(order[keep])


def select_regions(det: Detections, sel: RegionSelection) -> Detections:
    det = det.take(np.flatnonzero(det.scores >= sel.min_score))
    det = classwise_nms(det, sel.nms_iou)
    det = merge_duplicates(det, sel.duplicate_iou)
    return det.take(np.arange(min(len(det), sel.max_regions - 1)))


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def featurize_batch(featurizer: CropFeaturizer, images: list[np.ndarray], boxes: list[np.ndarray]
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Crop features of several images in shared backbone batches: per image (features, ImageNet probs)."""
    crops = [crop(image, box) for image, bxs in zip(images, boxes) for box in bxs]
    all_feats, all_probs = featurizer.crop_features(crops)
    out, start = [], 0
    for bxs in boxes:
        out.append((all_feats[start:start + len(bxs)], all_probs[start:start + len(bxs)]))
        start += len(bxs)
    return out


class ObjectDetectorBackend(ImageFolderMixin):
    """Base of the real-detector backends; subclasses set ``name``, ``detector_classes`` and ``detect``.

    classes = the detector's raw class names followed by the 1000 ImageNet tags, so region 0 (the
    whole image, tagged by the backbone's ImageNet top-1 as in the COCO oracle backend) still has a
    class id that names its tag. Stored tags are caption words (`muvla.regions.tags`); class ids keep
    the raw detector class.
    """

    name = "object-detector"
    feature_dim = EfficientNetLite0.feature_dim
    detector_classes: list[str]

    def __init__(self, images: Path, featurizer: CropFeaturizer, selection: RegionSelection,
                 tag_words: dict[str, str] | None = None, batch_images: int = 4):
        self.images = Path(images)
        self.featurizer = featurizer
        self.selection = selection
        self.tag_words = tag_words
        self.batch_images = batch_images

    @property
    def classes(self) -> list[str]:
        return list(self.detector_classes) + list(imagenet_tags())

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        raise NotImplementedError

    def list_inputs(self) -> list[InputItem]:
        files = list_images(self.images)
        items = [InputItem(p.stem, p.relative_to(self.images).as_posix(), p.relative_to(self.images).as_posix())
                 for p in files]
        return _mark_duplicates(items)

    def process(self, item: InputItem) -> tuple[ImageRegions, dict[str, int]]:
        result = self.process_batch([item])[0]
        if isinstance(result, RejectedImage):
            raise result
        return result

    def process_batch(self, items: list[InputItem]
                      ) -> list[tuple[ImageRegions, dict[str, int]] | RejectedImage]:
        """Regions of several images (loaded, detected and featurised together); a bad file -> RejectedImage."""
        loaded: list[np.ndarray | RejectedImage] = []
        for item in items:
            try:
                loaded.append(self._load(item))
            except RejectedImage as rej:
                loaded.append(rej)
        good = [i for i, img in enumerate(loaded) if not isinstance(img, RejectedImage)]
        images = [loaded[i] for i in good]
        detections: list[Detections] = []
        for s in range(0, len(images), self.batch_images):
            detections.extend(self.detect(images[s:s + self.batch_images]))
        selected, all_boxes = [], []
        for image, det in zip(images, detections):
            height, width = image.shape[:2]
            det = Detections(clip_boxes(det.boxes, width, height), np.asarray(det.scores, np.float32),
                             np.asarray(det.class_ids, np.int64))
            valid = (det.boxes[:, 2] > det.boxes[:, 0]) & (det.boxes[:, 3] > det.boxes[:, 1])
            det = select_regions(det.take(np.flatnonzero(valid)), self.selection)
            selected.append(det)
            all_boxes.append(np.concatenate([whole_image_box(width, height)[None], det.boxes]))
        features = featurize_batch(self.featurizer, images, all_boxes)
        results: list[tuple[ImageRegions, dict[str, int]] | RejectedImage] = list(loaded)  # type: ignore[arg-type]
        n_det = len(self.detector_classes)
        for k, i in enumerate(good):
            image, det, boxes = images[k], selected[k], all_boxes[k]
            feats, probs = features[k]
            whole_cls = int(probs[0].argmax())
            class_ids = np.concatenate([[n_det + whole_cls], det.class_ids]).astype(np.int32)
            tags = [self.classes[n_det + whole_cls]] + [
                caption_word(self.detector_classes[c], self.tag_words) for c in det.class_ids]
            scores = np.concatenate([[probs[0, whole_cls]], det.scores]).astype(np.float32)
            regions = ImageRegions(
                image_id=items[i].image_id, file=items[i].file, width=image.shape[1], height=image.shape[0],
                boxes=boxes.astype(np.float32), tags=tags, scores=scores, class_ids=class_ids, features=feats)
            stats = {"detections_kept": len(det)}
            if len(det) == 0:
                stats["images_without_detections"] = 1
            results[i] = (regions, stats)
        return results
