"""NLVR2 (METHOD.md section 8): a sentence about a pair of images, True or False.

Files: JSON lines with identifier ``split-set-pair-sentence``, sentence, label "True"/"False";
images ``{identifier minus last part}-img0.png`` / ``-img1.png`` in the image folder (or in
``<folder>/<directory>/`` when the line has a ``directory`` field, as in the train split). Each
example is two encoder rows, (left image, sentence) and (right image, sentence); their pooled
vectors are concatenated -> MLP -> 2 classes (False, True). Accuracy and consistency exactly as
lil-lab/nlvr ``nlvr2/eval/metrics.py``: a group is the identifier with its third part (the
image-pair index) blanked, i.e. one sentence written for one set; a group is consistent when every
example of it is correct. Predictions: the official CSV ``identifier,True|False`` without header.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from muvla.corpus.region_store import RegionStore
from muvla.model import Model, ModelConfig
from muvla.model.modeling import EncoderOutput
from muvla.tasks.batch import TaskBatch, TaskItem, get_regions
from muvla.tasks.files import NO_REGIONS, HasRegions, LoadReport, iter_jsonl, load_each, missing_field
from muvla.tasks.model import MLPHead, TaskModel
from muvla.tasks.spec import (
    DataOptions,
    EvalOptions,
    Evaluation,
    ReadOptions,
    TaskSpec,
    count_metrics,
    predict_dataset,
)
from muvla.utils.shards import atomic_file


@dataclass
class NLVR2Example:
    identifier: str
    sentence: str
    left_image: Path
    right_image: Path
    label: bool


# --------------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------------


def nlvr2_image_stem(identifier: str) -> str:
    """'dev-850-0-0' -> 'dev-850-0' (the identifier minus its last, sentence, part)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not 'split-set-pair-sentence'")
    return "-".join(parts[:-1])


def _parse_bool_label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _pair_paths(stem: str, root: Path | None, directory: Any) -> list[Path]:
    """The left and right image files: bare names without an image folder, else found in the folder
    or in its ``directory`` sub-folder (the train split's layout)."""
    names = [f"{stem}-img0.png", f"{stem}-img1.png"]
    if root is None:
        return [Path(n) for n in names]
    folders = [root] + ([root / str(directory)] if directory is not None else [])
    return [next((d / n for d in folders if (d / n).is_file()), folders[-1] / n) for n in names]


def load_nlvr2(jsonl: str | Path, image_dir: str | Path | None,
               has_regions: HasRegions | None = None) -> tuple[list[NLVR2Example], LoadReport]:
    """NLVR2 JSON lines. With ``image_dir`` both images must exist (else skipped with the line);
    with ``image_dir=None`` (annotations only) image paths are bare file names and not checked.
    ``has_regions`` receives the image stems ('dev-850-0-img0')."""
    report = LoadReport()
    examples: list[NLVR2Example] = []
    seen: set[str] = set()
    root = Path(image_dir) if image_dir is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"NLVR2 image folder not found: {root}")
    for lineno, obj in iter_jsonl(jsonl, report):
        bad = missing_field(obj, ("identifier", "sentence", "label"))
        if bad:
            report.skip(jsonl, lineno, bad)
            continue
        ident = str(obj["identifier"])
        try:
            stem = nlvr2_image_stem(ident)
        except ValueError:
            report.skip(jsonl, lineno, "bad identifier", ident)
            continue
        if ident in seen:
            report.skip(jsonl, lineno, "duplicate identifier", ident)
            continue
        label = _parse_bool_label(obj["label"])
        if label is None:
            report.skip(jsonl, lineno, f"label {obj['label']!r} is not True/False", ident)
            continue
        paths = _pair_paths(stem, root, obj.get("directory"))
        lost = [p.name for p in paths if root is not None and not p.is_file()]
        if lost:
            report.skip(jsonl, lineno, "missing NLVR2 image", f"{ident}: {', '.join(lost)}")
            continue
        if has_regions is not None and not all(has_regions(p.stem) for p in paths):
            report.skip(jsonl, lineno, NO_REGIONS, ident)
            continue
        seen.add(ident)
        examples.append(NLVR2Example(ident, str(obj["sentence"]), paths[0], paths[1], label))
    report.kept = len(examples)
    return examples, report


def read_nlvr2(files: Sequence[Path], options: ReadOptions) -> tuple[list[NLVR2Example], LoadReport]:
    """The spec's reader: one or more JSON-lines files."""
    return load_each(load_nlvr2(f, options.images, options.has_regions) for f in files)


# --------------------------------------------------------------------------------------------
# dataset and head
# --------------------------------------------------------------------------------------------


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


def nlvr2_dataset(examples: Sequence[NLVR2Example], store: RegionStore, options: DataOptions) -> NLVR2Dataset:
    return NLVR2Dataset(examples, store)


class NLVR2Head(MLPHead):
    """Rows 2i / 2i+1 of a batch are (left image, sentence) / (right image, sentence): their two
    pooled vectors are concatenated -> MLP -> 2 classes (False, True); cross entropy."""

    def __init__(self, config: ModelConfig, n_answers: int, dropout: float) -> None:
        h = config.hidden_size
        super().__init__(2 * h, 2 * h, 2, dropout, config.layer_norm_eps)

    def logits(self, out: EncoderOutput, batch: TaskBatch, encoder: Model) -> torch.Tensor:
        if out.pooled.shape[0] % 2:
            raise ValueError("an NLVR2 batch needs an even number of rows (left, right) per example")
        return self(torch.cat([out.pooled[0::2], out.pooled[1::2]], dim=-1))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1).bool()


# --------------------------------------------------------------------------------------------
# official metrics, evaluation, predictions
# --------------------------------------------------------------------------------------------


def nlvr2_group(identifier: str) -> str:
    """Consistency group of an NLVR2 identifier: 'dev-850-2-0' -> 'dev-850--0' (official)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r} is not 'split-set-pair-sentence'")
    parts[2] = ""
    return "-".join(parts)


def nlvr2_accuracy_consistency(predictions: Mapping[str, bool], examples: Sequence[NLVR2Example]) -> dict:
    """Official NLVR2 accuracy and consistency; returns accuracy, consistency, n, n_groups."""
    if not examples:
        raise ValueError("nlvr2_accuracy_consistency: no examples to score")
    missing = [ex.identifier for ex in examples if ex.identifier not in predictions]
    if missing:
        raise ValueError(f"NLVR2: {len(missing)} of {len(examples)} examples have no prediction "
                         f"(first: {missing[:5]})")
    correct = 0
    groups: dict[str, bool] = {}
    for ex in examples:
        ok = bool(predictions[ex.identifier]) == ex.label
        correct += ok
        key = nlvr2_group(ex.identifier)
        groups[key] = groups.get(key, True) and ok
    return {"accuracy": correct / len(examples), "consistency": sum(groups.values()) / len(groups),
            "n": len(examples), "n_groups": len(groups)}


def evaluate_nlvr2(model: TaskModel, examples: Sequence[NLVR2Example], report: LoadReport,
                   options: EvalOptions) -> Evaluation:
    keys, preds, _ = predict_dataset(model, NLVR2Dataset(examples, options.store), options)
    predictions = {str(k): bool(p) for k, p in zip(keys, preds)}
    metrics: dict[str, Any] = count_metrics(examples, report)
    metrics.update(nlvr2_accuracy_consistency(predictions, examples))
    return Evaluation(metrics, predictions)


def write_nlvr2_predictions(path: str | Path, predictions: Mapping[str, bool]) -> Path:
    """Official NLVR2 predictions CSV: one ``identifier,True|False`` line per example, no header
    (the official metrics.py treats every line as a prediction)."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        for identifier, pred in sorted(predictions.items()):
            writer.writerow([identifier, "True" if pred else "False"])
    return path


def read_nlvr2_predictions(path: str | Path) -> dict[str, bool]:
    """Read an NLVR2 predictions CSV (``identifier,True|False``)."""
    out: dict[str, bool] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            if len(parts) < 2 or parts[1].strip().lower() not in ("true", "false"):
                raise ValueError(f"{path}:{lineno}: expected 'identifier,True|False', got {line.strip()!r}")
            out[parts[0]] = parts[1].strip().lower() == "true"
    return out


NLVR2 = TaskSpec(
    name="nlvr2", display="NLVR2", headline="accuracy",
    files="one or more NLVR2 JSON-lines files", read=read_nlvr2, dataset=nlvr2_dataset, head=NLVR2Head,
    evaluate=evaluate_nlvr2, write_predictions=write_nlvr2_predictions, prediction_suffix=".csv",
)
