"""SNLI-VE (METHOD.md section 8): does the image (premise) entail the hypothesis? 3 classes.

Files: JSON lines with Flickr30K_ID, sentence2 (hypothesis), gold_label, pairID; images
``<Flickr30K_ID>.jpg``. MLP on the pooled [CLS] -> entailment / neutral / contradiction (LABELS
order); cross entropy; plain accuracy. Predictions: JSON lines ``{"pairID", "gold_label"}`` (the
annotation file's own keys, so a predictions file can be scored like an annotation file).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from muvla.corpus.region_store import RegionStore
from muvla.model import ModelConfig
from muvla.tasks.batch import TaskItem, get_regions
from muvla.tasks.files import NO_REGIONS, HasRegions, LoadReport, iter_jsonl, load_each, missing_field
from muvla.tasks.metrics import accuracy
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

LABELS: tuple[str, str, str] = ("entailment", "neutral", "contradiction")


@dataclass
class SNLIVEExample:
    pair_id: str
    image_id: str  # Flickr30K id (file stem)
    hypothesis: str
    label: int  # index into LABELS
    image_path: Path | None = None


def load_snli_ve(jsonl: str | Path, image_dir: str | Path | None = None,
                 has_regions: HasRegions | None = None) -> tuple[list[SNLIVEExample], LoadReport]:
    """SNLI-VE JSON lines (Flickr30K_ID, sentence2, gold_label, pairID). A gold_label outside
    LABELS (e.g. SNLI's '-' = no consensus) is skipped with its line. With ``image_dir`` the image
    ``<Flickr30K_ID>.jpg`` must exist."""
    report = LoadReport()
    examples: list[SNLIVEExample] = []
    seen: set[str] = set()
    root = Path(image_dir) if image_dir is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"SNLI-VE image folder not found: {root}")
    for lineno, obj in iter_jsonl(jsonl, report):
        bad = missing_field(obj, ("Flickr30K_ID", "sentence2", "gold_label"))
        if bad:
            report.skip(jsonl, lineno, bad)
            continue
        image_id = str(obj["Flickr30K_ID"])
        pair_id = str(obj.get("pairID", f"line-{lineno}"))
        if obj["gold_label"] not in LABELS:
            report.skip(jsonl, lineno, f"label {obj['gold_label']!r} is not one of {'/'.join(LABELS)}", pair_id)
            continue
        if pair_id in seen:
            report.skip(jsonl, lineno, "duplicate pairID", pair_id)
            continue
        image_path = None
        if root is not None:
            image_path = root / f"{image_id}.jpg"
            if not image_path.is_file():
                report.skip(jsonl, lineno, "missing SNLI-VE image", f"{pair_id}: {image_path.name}")
                continue
        if has_regions is not None and not has_regions(image_id):
            report.skip(jsonl, lineno, NO_REGIONS, pair_id)
            continue
        seen.add(pair_id)
        examples.append(SNLIVEExample(pair_id, image_id, str(obj["sentence2"]), LABELS.index(obj["gold_label"]),
                                      image_path))
    report.kept = len(examples)
    return examples, report


def read_snli_ve(files: Sequence[Path], options: ReadOptions) -> tuple[list[SNLIVEExample], LoadReport]:
    """The spec's reader: one or more JSON-lines files."""
    return load_each(load_snli_ve(f, options.images, options.has_regions) for f in files)


class SNLIVEDataset(Dataset):
    """(image premise, hypothesis) -> label index in LABELS."""

    def __init__(self, examples: Sequence[SNLIVEExample], store: RegionStore) -> None:
        self.examples = list(examples)
        self.store = store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        return TaskItem([ex.hypothesis], [get_regions(self.store, ex.image_id)], torch.tensor(ex.label), ex.pair_id)


def snli_ve_dataset(examples: Sequence[SNLIVEExample], store: RegionStore, options: DataOptions) -> SNLIVEDataset:
    return SNLIVEDataset(examples, store)


def snli_ve_head(config: ModelConfig, n_answers: int, dropout: float) -> MLPHead:
    """MLP on the pooled [CLS] -> 3 classes (LABELS order); cross entropy."""
    h = config.hidden_size
    return MLPHead(h, 2 * h, len(LABELS), dropout, config.layer_norm_eps)


def snli_ve_accuracy(predictions: Mapping[str, int | str], examples: Sequence[SNLIVEExample]) -> float:
    """SNLI-VE accuracy; a prediction is a label index or one of LABELS."""
    missing = [ex.pair_id for ex in examples if ex.pair_id not in predictions]
    if missing:
        raise ValueError(f"SNLI-VE: {len(missing)} of {len(examples)} pairs have no prediction (first: {missing[:5]})")
    preds = []
    for ex in examples:
        p = predictions[ex.pair_id]
        if isinstance(p, str):
            if p not in LABELS:
                raise ValueError(f"SNLI-VE: prediction {p!r} for {ex.pair_id} is not one of {LABELS}")
            p = LABELS.index(p)
        preds.append(int(p))
    return accuracy(preds, [ex.label for ex in examples])


def evaluate_snli_ve(model: TaskModel, examples: Sequence[SNLIVEExample], report: LoadReport,
                     options: EvalOptions) -> Evaluation:
    keys, preds, _ = predict_dataset(model, SNLIVEDataset(examples, options.store), options)
    predictions = {str(k): int(p) for k, p in zip(keys, preds)}
    metrics = count_metrics(examples, report)
    metrics["accuracy"] = snli_ve_accuracy(predictions, examples)
    return Evaluation(metrics, predictions)


def write_snli_ve_predictions(path: str | Path, predictions: Mapping[str, int | str]) -> Path:
    """SNLI-VE predictions as JSON lines {"pairID": str, "gold_label": label name} (the annotation
    file's own keys, so a predictions file can be scored like an annotation file)."""
    path = Path(path)
    lines = []
    for pair_id, pred in sorted(predictions.items()):
        label = pred if isinstance(pred, str) else LABELS[int(pred)]
        if label not in LABELS:
            raise ValueError(f"SNLI-VE prediction {pred!r} for {pair_id} is not one of {LABELS}")
        lines.append(json.dumps({"pairID": pair_id, "gold_label": label}))
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


SNLI_VE = TaskSpec(
    name="snli_ve", display="SNLI-VE", headline="accuracy", aliases=("snli-ve", "snlive"),
    files="one or more SNLI-VE JSON-lines files", read=read_snli_ve, dataset=snli_ve_dataset,
    head=snli_ve_head, evaluate=evaluate_snli_ve, write_predictions=write_snli_ve_predictions,
    prediction_suffix=".jsonl",
)
