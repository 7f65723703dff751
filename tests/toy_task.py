"""A sixth downstream task, written the way a real one is: one module exporting one TaskSpec.

Toy task "region parity": JSON lines ``{"id": str, "image": str, "text": str, "label": 0 | 1}``;
MLP on the pooled [CLS] -> 2 classes; accuracy; predictions as JSON ``{id: label}``. Registering it
is one line, ``TASKS["toy"] = TOY`` (the tests do it with monkeypatch so it does not leak).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from muvla.corpus.region_store import RegionStore
from muvla.model import ModelConfig
from muvla.tasks.batch import TaskItem, get_regions
from muvla.tasks.files import NO_REGIONS, LoadReport, iter_jsonl, missing_field
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


@dataclass
class ToyExample:
    key: str
    image: str
    text: str
    label: int


def read_toy(files: Sequence[Path], options: ReadOptions) -> tuple[list[ToyExample], LoadReport]:
    report = LoadReport()
    examples: list[ToyExample] = []
    for path in files:
        for lineno, obj in iter_jsonl(path, report):
            bad = missing_field(obj, ("id", "image", "text", "label"))
            if bad or obj["label"] not in (0, 1):
                report.skip(path, lineno, bad or f"label {obj['label']!r} is not 0/1")
                continue
            if options.has_regions is not None and not options.has_regions(str(obj["image"])):
                report.skip(path, lineno, NO_REGIONS, str(obj["id"]))
                continue
            examples.append(ToyExample(str(obj["id"]), str(obj["image"]), str(obj["text"]), int(obj["label"])))
    report.kept = len(examples)
    return examples, report


class ToyDataset(Dataset):
    def __init__(self, examples: Sequence[ToyExample], store: RegionStore) -> None:
        self.examples = list(examples)
        self.store = store

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.examples[i]
        return TaskItem([ex.text], [get_regions(self.store, ex.image)], torch.tensor(ex.label), ex.key)


def toy_dataset(examples: Sequence[ToyExample], store: RegionStore, options: DataOptions) -> ToyDataset:
    return ToyDataset(examples, store)


def toy_head(config: ModelConfig, n_answers: int, dropout: float) -> MLPHead:
    return MLPHead(config.hidden_size, config.hidden_size, 2, dropout, config.layer_norm_eps)


def evaluate_toy(model: TaskModel, examples: Sequence[ToyExample], report: LoadReport,
                 options: EvalOptions) -> Evaluation:
    keys, preds, _ = predict_dataset(model, ToyDataset(examples, options.store), options)
    predictions = {str(k): int(p) for k, p in zip(keys, preds)}
    metrics = count_metrics(examples, report)
    metrics["accuracy"] = accuracy([predictions[ex.key] for ex in examples], [ex.label for ex in examples])
    return Evaluation(metrics, predictions)


def write_toy_predictions(path: Path, predictions: dict[str, int]) -> Path:
    path.write_text(json.dumps(dict(sorted(predictions.items()))), encoding="utf-8")
    return path


TOY = TaskSpec(
    name="toy", display="Toy parity", headline="accuracy", aliases=("toy-task",),
    files="one or more toy JSON-lines files", read=read_toy, dataset=toy_dataset, head=toy_head,
    evaluate=evaluate_toy, write_predictions=write_toy_predictions, prediction_suffix=".json",
)
