"""Torch datasets over the downstream examples (``muvla.tasks.data``) and a region store.

One dataset item is a :class:`TaskItem`: one or more encoder rows ``(text, image regions)`` plus the
item's target. NLVR2 items have two rows (left and right image, same sentence) and retrieval
training items have 1 + n_negatives rows; every other task has one row. ``TaskCollator`` tokenizes
the texts of a batch in one call and pads the regions into a :class:`TaskBatch`.

Images are looked up through the store by the ids the loaders keep: int COCO ids (``store.find``
maps them to zero-padded stems), Flickr30K ids and NLVR2 image stems (file stems). Examples whose
image has no regions never reach a dataset: :func:`has_regions_fn` is the loaders' ``has_regions``
callback, so they are counted and recorded in the loaders' ``LoadReport``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from muvla.corpus.regions import ImageRegions, RegionStore
from muvla.tasks.data import CaptionExample, NLVR2Example, RefExample, SNLIVEExample, VQAExample
from muvla.tasks.metrics import box_iou


def has_regions_fn(store: RegionStore) -> Callable[[Any], bool]:
    """Loader callback: True when the store holds at least one region for ``image_id``."""

    def has_regions(image_id: Any) -> bool:
        regions = store.find(image_id)
        return regions is not None and regions.num_regions > 0

    return has_regions


def get_regions(store: RegionStore, image_id: Any) -> ImageRegions:
    """Regions of an image that the loader already checked; a clear error if the store changed since."""
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
    """Collated batch. rows = B * rows_per_item; targets: vqa [B, A] float, nlvr2 / snli_ve [B] long,
    refcoco+ [B] long region index (-100 = no region overlaps the box), retrieval [rows] float."""

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

    def __init__(self, tokenizer: Any, max_text_len: int = 40, max_regions: int | None = None) -> None:
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3, got {max_text_len}")
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


class VQADataset(Dataset):
    """(question, image) -> soft-score target vector over the answer vocabulary."""

    def __init__(self, examples: Sequence[VQAExample], store: RegionStore, n_answers: int) -> None:
        self.examples = list(examples)
        self.store = store
        self.n_answers = n_answers

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        target = torch.zeros(self.n_answers, dtype=torch.float32)
        for label, score in ex.targets.items():
            target[label] = score
        return TaskItem([ex.question], [get_regions(self.store, ex.image_id)], target, ex.question_id)


class NLVR2Dataset(Dataset):
    """Two rows per example: (left image, sentence), (right image, sentence); target 1 = True."""

    def __init__(self, examples: Sequence[NLVR2Example], store: RegionStore) -> None:
        self.examples = list(examples)
        self.store = store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        images = [get_regions(self.store, ex.left_image.stem), get_regions(self.store, ex.right_image.stem)]
        return TaskItem([ex.sentence, ex.sentence], images, torch.tensor(int(ex.label)), ex.identifier)


class SNLIVEDataset(Dataset):
    """(image premise, hypothesis) -> label index in ``muvla.tasks.data.LABELS``."""

    def __init__(self, examples: Sequence[SNLIVEExample], store: RegionStore) -> None:
        self.examples = list(examples)
        self.store = store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        return TaskItem([ex.hypothesis], [get_regions(self.store, ex.image_id)], torch.tensor(ex.label), ex.pair_id)


def refcoco_target(gt_box: Sequence[float], region_boxes: np.ndarray) -> int:
    """Training target: the region with max IoU with the ground-truth box; -100 when none overlaps."""
    if len(region_boxes) == 0:
        return -100
    ious = box_iou(np.asarray(gt_box, dtype=np.float64)[None], np.asarray(region_boxes).reshape(-1, 4))[0]
    best = int(np.argmax(ious))
    return best if ious[best] > 0 else -100


class RefCOCODataset(Dataset):
    """(expression, image) -> index of the region with max IoU with the ground-truth box."""

    def __init__(self, examples: Sequence[RefExample], store: RegionStore, max_regions: int | None = None) -> None:
        self.examples = list(examples)
        self.store = store
        self.max_regions = max_regions

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        regions = get_regions(self.store, ex.image_id)
        boxes = regions.boxes[: self.max_regions] if self.max_regions else regions.boxes
        key = ex.sent_id if ex.sent_id >= 0 else i
        return TaskItem([ex.sentence], [regions], torch.tensor(refcoco_target(ex.box, boxes)), key)


class RetrievalTrainDataset(Dataset):
    """Caption i -> rows (its image, caption i) = 1 then n_negatives x (its image, a caption of another
    image) = 0. Negatives are random (drawn from the RNG the trainer seeds per batch, so resumable)."""

    def __init__(self, captions: Sequence[CaptionExample], store: RegionStore, n_negatives: int = 1) -> None:
        self.captions = list(captions)
        self.store = store
        self.n_negatives = n_negatives
        if n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
        if len({str(c.image_id) for c in self.captions}) < 2:
            raise ValueError("retrieval fine-tuning needs captions of at least two images (for negatives)")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.captions[i]
        regions = get_regions(self.store, ex.image_id)
        texts = [ex.caption]
        while len(texts) < 1 + self.n_negatives:
            other = self.captions[random.randrange(len(self.captions))]
            if str(other.image_id) != str(ex.image_id):
                texts.append(other.caption)
        target = torch.zeros(1 + self.n_negatives, dtype=torch.float32)
        target[0] = 1.0
        return TaskItem(texts, [regions] * len(texts), target, ex.caption_id)


def build_dataset(task: str, examples: Sequence[Any], store: RegionStore, n_answers: int = 0,
                  n_negatives: int = 1) -> Dataset:
    """The dataset class of ``task`` over loader examples."""
    if task == "vqa":
        return VQADataset(examples, store, n_answers)
    if task == "nlvr2":
        return NLVR2Dataset(examples, store)
    if task == "snli_ve":
        return SNLIVEDataset(examples, store)
    if task == "refcoco+":
        return RefCOCODataset(examples, store)
    if task == "retrieval":
        return RetrievalTrainDataset(examples, store, n_negatives)
    raise ValueError(f"unknown task {task!r}")
