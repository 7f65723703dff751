"""What every task's dataset yields and how a batch of it is collated.

One dataset item is a :class:`TaskItem`: one or more encoder rows ``(text, image regions)`` plus the
item's target. NLVR2 items have two rows (left and right image, same sentence) and retrieval
training items have 1 + n_negatives rows; every other task has one row. ``TaskCollator`` tokenizes
the texts of a batch in one call and pads the regions into a :class:`TaskBatch`.

Images are looked up through the store by the ids the readers keep: int COCO ids (``store.find``
maps them to zero-padded stems), Flickr30K ids and NLVR2 image stems (file stems). Examples whose
image has no regions never reach a dataset: :func:`has_regions_fn` is the readers' ``has_regions``
callback, so they are counted and recorded in the readers' ``LoadReport``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from muvla.corpus.region_store import ImageRegions, RegionStore
from muvla.tasks.files import HasRegions
from muvla.utils.config import check_max_text_len

# Text truncation (tokens incl. [CLS]/[SEP]) when neither a flag nor the fine-tuned model's task.json says.
DEFAULT_MAX_TEXT_LEN = 40


def has_regions_fn(store: RegionStore) -> HasRegions:
    """Reader callback: True when the store holds at least one region for ``image_id``."""

    def has_regions(image_id: Any) -> bool:
        regions = store.find(image_id)
        return regions is not None and regions.num_regions > 0

    return has_regions


def get_regions(store: RegionStore, image_id: Any) -> ImageRegions:
    """Regions of an image that the reader already checked; a clear error if the store changed since."""
    regions = store.find(image_id)
    if regions is None or regions.num_regions == 0:
        raise KeyError(f"image {image_id!r} has no regions in {store.root} (was the store replaced?)")
    return regions


@dataclass
class TaskItem:
    """Encoder rows of one example, its target and its key (question id, identifier, ...)."""

    texts: list[str]
    images: list[ImageRegions]
    target: torch.Tensor
    key: Any


@dataclass
class TaskBatch:
    """Collated batch. rows = B * rows_per_item; targets are the items' targets stacked ([B, ...]),
    or one per row ([rows]) when an item has one target per row (retrieval: positive + negatives)."""

    input_ids: torch.Tensor          # [rows, L]
    attention_mask: torch.Tensor     # [rows, L]
    region_features: torch.Tensor    # [rows, R, D] float32
    region_positions: torch.Tensor   # [rows, R, 5]
    region_mask: torch.Tensor        # [rows, R] bool
    region_boxes: torch.Tensor       # [rows, R, 4] pixels (RefCOCO+ predictions)
    targets: torch.Tensor
    keys: list


class TaskCollator:
    """Tokenize ``[CLS] text [SEP]`` (truncated to max_text_len) and pad regions to the batch maximum."""

    def __init__(self, tokenizer: Any, max_text_len: int = DEFAULT_MAX_TEXT_LEN, max_regions: int | None = None) -> None:
        check_max_text_len(max_text_len)
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.max_regions = max_regions

    def __call__(self, items: Sequence[TaskItem]) -> TaskBatch:
        if not items:
            raise ValueError("cannot collate an empty batch")
        texts = [t for it in items for t in it.texts]
        images = [im for it in items for im in it.images]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        rows = len(images)
        n_regions = [min(im.num_regions, self.max_regions or im.num_regions) for im in images]
        R = max(n_regions)
        D = images[0].features.shape[1]
        feats = np.zeros((rows, R, D), dtype=np.float32)
        pos = np.zeros((rows, R, 5), dtype=np.float32)
        boxes = np.zeros((rows, R, 4), dtype=np.float32)
        mask = np.zeros((rows, R), dtype=bool)
        for i, (im, n) in enumerate(zip(images, n_regions)):
            if im.features.shape[1] != D:
                raise ValueError(f"image {im.image_id!r}: feature size {im.features.shape[1]}, batch has {D}")
            feats[i, :n] = im.features[:n]
            pos[i, :n] = im.position_features()[:n]
            boxes[i, :n] = im.boxes[:n]
            mask[i, :n] = True
        targets = torch.stack([it.target for it in items])
        first = items[0]
        if len(first.texts) > 1 and first.target.dim() == 1 and first.target.shape[0] == len(first.texts):
            targets = targets.reshape(-1)  # one label per row (retrieval: positive + negatives)
        return TaskBatch(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"].bool(),
                         region_features=torch.from_numpy(feats), region_positions=torch.from_numpy(pos),
                         region_mask=torch.from_numpy(mask), region_boxes=torch.from_numpy(boxes),
                         targets=targets, keys=[it.key for it in items])
