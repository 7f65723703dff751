"""RefCOCO+ (METHOD.md section 8): pick the region an expression refers to.

Files: the refer toolkit's ``refs(unc).p`` pickle (list of refs: ref_id, ann_id, image_id, split,
category_id, sentences [{sent, tokens, raw, sent_id}]) plus ``instances.json`` (COCO style: images,
annotations with bbox = x, y, w, h, categories); or the JSON equivalent, one object ``{"refs": [...],
"images": [...], "annotations": [...], "categories": [...]}`` (the pickle's list under "refs" merged
into instances.json). One example per expression of the requested split.

An MLP scores every region state; cross entropy over the regions with the region of max IoU with
the ground-truth box as target. Accuracy: the chosen region's box has IoU >= 0.5 with the ground
truth, reported over ALL expressions (unscored ones, e.g. on images without regions, count as
wrong) and over the expressions whose object some region covers (the number the reference code
reported). Predictions: JSON ``[{"sent_id", "box": [x1, y1, x2, y2]}]`` (the refer toolkit has no
submission format).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from muvla.corpus.region_store import RegionStore
from muvla.model import Model, ModelConfig
from muvla.model.modeling import EncoderOutput
from muvla.tasks.batch import TaskBatch, TaskItem, get_regions
from muvla.tasks.files import NO_REGIONS, HasRegions, LoadReport, int_or, missing_field, read_json
from muvla.tasks.metrics import box_iou
from muvla.tasks.model import MLPHead, TaskModel
from muvla.tasks.spec import DataOptions, EvalOptions, Evaluation, ReadOptions, TaskSpec, predict_dataset
from muvla.utils.shards import atomic_file


@dataclass
class RefExample:
    ref_id: int
    ann_id: int
    image_id: int
    sentence: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    split: str
    sent_id: int = -1
    category_id: int = -1


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """The refs pickle holds only lists, dicts, strings and numbers: refuse anything that would
    import code, so a hostile file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refs pickle refers to {module}.{name}: only plain data is allowed")


def read_refs_pickle(path: str | Path) -> list[dict]:
    """Read refer toolkit ``refs(unc).p`` (written by Python 2: byte strings decoded as latin-1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        refs = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a refer toolkit refs pickle ({e})") from e
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _annotation_boxes(instances: Any, path: str | Path, report: LoadReport) -> dict[int, list[float]]:
    """annotation id -> bbox [x, y, w, h]; malformed annotations are recorded and left out."""
    if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list):
        raise ValueError(f"{path}: expected COCO instances with an 'annotations' list")
    boxes: dict[int, list[float]] = {}
    for i, ann in enumerate(instances["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int | float) for v in bbox)
                or missing_field(ann, ("id",), ("id",))):
            report.skip(path, i, "malformed annotation (needs id and bbox [x, y, w, h])")
            continue
        boxes[int(ann["id"])] = [float(v) for v in bbox]
    return boxes


def _ref_problem(ref: Any) -> str | None:
    bad = (missing_field(ref, ("ref_id", "ann_id", "image_id", "split", "sentences"), ("ref_id", "ann_id", "image_id"))
           if isinstance(ref, dict) else "not a dict")
    if bad is None and not isinstance(ref["sentences"], list):
        bad = "'sentences' is not a list"
    return bad


def _refcoco_examples(refs: list, instances: Any, split: str | None, refs_file: str | Path,
                      instances_file: str | Path, has_regions: HasRegions | None) -> tuple[list[RefExample], LoadReport]:
    report = LoadReport()
    boxes = _annotation_boxes(instances, instances_file, report)
    examples: list[RefExample] = []
    for i, ref in enumerate(refs):
        bad = _ref_problem(ref)
        if bad:
            report.skip(refs_file, i, f"malformed ref: {bad}")
            continue
        if split is not None and ref["split"] != split:
            continue
        key = f"ref_id={ref['ref_id']}"
        bbox = boxes.get(int(ref["ann_id"]))
        if bbox is None:
            report.skip(refs_file, i, "ref's ann_id not in instances", key)
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            report.skip(refs_file, i, "empty ground-truth box", key)
            continue
        if has_regions is not None and not has_regions(ref["image_id"]):
            for _ in ref["sentences"]:  # counted per expression, so accuracy over ALL can count them
                report.skip(refs_file, i, NO_REGIONS, key)
            continue
        x, y, w, h = bbox
        for s in ref["sentences"]:
            text = s.get("sent", s.get("raw")) if isinstance(s, dict) else None
            if not text:
                report.skip(refs_file, i, "sentence without text", key)
                continue
            examples.append(RefExample(int(ref["ref_id"]), int(ref["ann_id"]), int(ref["image_id"]), str(text),
                                       (x, y, x + w, y + h), str(ref["split"]), int_or(s.get("sent_id"), -1),
                                       int_or(ref.get("category_id"), -1)))
    report.kept = len(examples)
    return examples, report


def load_refcoco(refs_pickle: str | Path, instances_json: str | Path, split: str | None,
                 has_regions: HasRegions | None = None) -> tuple[list[RefExample], LoadReport]:
    """RefCOCO+ from the refer toolkit files; one example per expression (sentence) of ``split``
    (e.g. 'train', 'val', 'testA', 'testB'; None = all). Skips are counted per expression so the
    accuracy over ALL expressions can count them as wrong."""
    refs = read_refs_pickle(refs_pickle)
    return _refcoco_examples(refs, read_json(instances_json), split, refs_pickle, instances_json, has_regions)


def load_refcoco_json(path: str | Path, split: str | None,
                      has_regions: HasRegions | None = None) -> tuple[list[RefExample], LoadReport]:
    """RefCOCO+ from the JSON equivalent: instances.json with the refs list under "refs"."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("refs"), list):
        raise ValueError(f"{path}: expected {{'refs': [...], 'annotations': [...], ...}}")
    return _refcoco_examples(data["refs"], data, split, path, path, has_regions)


def read_refcoco(files: Sequence[Path], options: ReadOptions) -> tuple[list[RefExample], LoadReport]:
    """The spec's reader: [refs(unc).p, instances.json] or [refcoco.json]; ``options.split`` selects."""
    if len(files) == 2:
        return load_refcoco(files[0], files[1], options.split, options.has_regions)
    return load_refcoco_json(files[0], options.split, options.has_regions)


# --------------------------------------------------------------------------------------------
# dataset and head
# --------------------------------------------------------------------------------------------


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


def refcoco_dataset(examples: Sequence[RefExample], store: RegionStore, options: DataOptions) -> RefCOCODataset:
    return RefCOCODataset(examples, store)


class RefCOCOHead(MLPHead):
    """MLP on every region state -> one score; padding regions get -inf; cross entropy over the
    regions (the base class's, which ignores expressions whose box no region overlaps)."""

    def __init__(self, config: ModelConfig, n_answers: int, dropout: float) -> None:
        h = config.hidden_size
        super().__init__(h, h, 1, dropout, config.layer_norm_eps)

    def logits(self, out: EncoderOutput, batch: TaskBatch, encoder: Model) -> torch.Tensor:
        scores = self(out.region_hidden).squeeze(-1)  # [B, R]
        return scores.masked_fill(~batch.region_mask.bool(), float("-inf"))


# --------------------------------------------------------------------------------------------
# accuracy, evaluation, predictions
# --------------------------------------------------------------------------------------------


def covered_by_regions(gt_box: Sequence[float], region_boxes: np.ndarray, threshold: float = 0.5) -> bool:
    """True when some region box has IoU >= threshold with the ground-truth box (so a perfect
    region scorer could get the expression right)."""
    region_boxes = np.asarray(region_boxes, dtype=np.float64).reshape(-1, 4)
    if len(region_boxes) == 0:
        return False
    return bool((box_iou(np.asarray(gt_box)[None], region_boxes) >= threshold).any())


def refcoco_accuracy(pred_boxes: np.ndarray, gt_boxes: np.ndarray, covered_mask: np.ndarray | Sequence[bool],
                     n_unscored: int = 0, threshold: float = 0.5) -> dict:
    """RefCOCO+ accuracy over ALL expressions and over the covered ones.

    ``n_unscored`` counts expressions that have no prediction at all (e.g. their image has no
    regions and the loader skipped them): they count as wrong and uncovered in ``acc_all``.
    A predicted box of NaNs also counts as wrong.
    """
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    covered = np.asarray(covered_mask, dtype=bool).reshape(-1)
    if not len(pred) == len(gt) == len(covered):
        raise ValueError(f"refcoco_accuracy: {len(pred)} predictions, {len(gt)} ground truths, "
                         f"{len(covered)} covered flags")
    if n_unscored < 0:
        raise ValueError("n_unscored must be >= 0")
    n_all = len(gt) + n_unscored
    if n_all == 0:
        raise ValueError("refcoco_accuracy: no expressions to score")
    ious = np.array([box_iou(p, g) for p, g in zip(pred, gt)], dtype=np.float64)
    correct = ious >= threshold
    n_covered = int(covered.sum())
    return {"acc_all": float(correct.sum()) / n_all,
            "acc_covered": float(correct[covered].sum()) / n_covered if n_covered else 0.0,
            "n_all": n_all, "n_covered": n_covered}


def evaluate_refcoco(model: TaskModel, examples: Sequence[RefExample], report: LoadReport,
                     options: EvalOptions) -> Evaluation:
    """Box of the chosen region per expression (keyed by sent_id); expressions the reader skipped
    because their image has no regions count as wrong in ``acc_all``."""
    keys, preds, boxes = predict_dataset(model, RefCOCODataset(examples, options.store), options)
    predictions: dict[Any, list[float]] = {}
    pred_boxes, gt_boxes, covered = [], [], []
    for ex, key, p, b in zip(examples, keys, preds, boxes):
        box = b[int(p)]
        predictions[key] = box.tolist()
        pred_boxes.append(box)
        gt_boxes.append(ex.box)
        covered.append(covered_by_regions(ex.box, get_regions(options.store, ex.image_id).boxes))
    n_unscored = int(report.skipped.get(NO_REGIONS, 0))
    metrics: dict[str, Any] = {"n": len(examples), "n_unscored": n_unscored}
    metrics.update(refcoco_accuracy(np.array(pred_boxes), np.array(gt_boxes), covered, n_unscored))
    return Evaluation(metrics, predictions)


def write_refcoco_predictions(path: str | Path, predictions: Mapping[int, Sequence[float]]) -> Path:
    """RefCOCO+ predictions JSON [{"sent_id": int, "box": [x1, y1, x2, y2]}] (the refer toolkit has
    no submission format; keyed by sentence id because each expression is one prediction)."""
    rows = [{"sent_id": int(k), "box": [float(v) for v in box]} for k, box in sorted(predictions.items())]
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows), encoding="utf-8")
    return path


REFCOCO = TaskSpec(
    name="refcoco+", display="RefCOCO+", headline="acc_all", aliases=("refcoco_plus", "refcocoplus"),
    files="refs(unc).p instances.json, or one refcoco JSON", n_files=(1, 2), read=read_refcoco,
    dataset=refcoco_dataset, head=RefCOCOHead, evaluate=evaluate_refcoco,
    write_predictions=write_refcoco_predictions, prediction_suffix=".json",
)
