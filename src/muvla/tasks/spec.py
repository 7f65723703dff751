"""The contract between a downstream task module and the fine-tune / evaluate stages.

A task module (``vqa.py``, ``nlvr2.py``, ...) exports one :class:`TaskSpec`: how to read the
benchmark's files, the dataset over them, the head, the official scoring and the prediction file.
The stages only call these functions; they never branch on a task's name, so a new task is one
new module plus one line in ``muvla.tasks.registry.TASKS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from muvla.corpus.region_store import RegionStore
from muvla.model import Model
from muvla.tasks.batch import DEFAULT_MAX_TEXT_LEN, TaskCollator, TaskItem
from muvla.tasks.files import HasRegions, LoadReport
from muvla.tasks.model import HeadFactory, TaskModel
from muvla.tasks.vocab import AnswerVocab
from muvla.utils.config import ConfigError
from muvla.utils.device import autocast
from muvla.utils.progress import progress


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need besides its files (a reader ignores what it does not use)."""

    images: Path | None = None  # image folder: readers that name image files check they exist
    split: str | None = None  # split inside a multi-split file (RefCOCO+ refer files)
    has_regions: HasRegions | None = None  # drop (and record) examples whose image has no regions
    vocab: AnswerVocab | None = None  # the answer vocabulary of tasks that learn one (VQA targets)


@dataclass(frozen=True)
class DataOptions:
    """What a training dataset may need besides its examples and the region store."""

    n_answers: int = 0  # answer vocabulary size (VQA target vector)
    n_negatives: int = 1  # retrieval: random negative captions per positive


DEFAULT_RERANK_QUERY = "salient"  # retrieval's first stage: the tag query mode (muvla.retrieval.queries)


@dataclass(frozen=True)
class EvalOptions:
    """How to score a split: inference settings plus the few a task may use."""

    store: RegionStore
    tokenizer: Any
    device: torch.device
    batch_size: int = 32
    max_text_len: int = DEFAULT_MAX_TEXT_LEN
    vocab: AnswerVocab | None = None  # label -> answer for tasks that learn a vocabulary (VQA)
    max_images: int = 0  # retrieval: score the first N images only (0 = all)
    max_captions_per_image: int = 0  # retrieval: 0 = all
    zero_shot: bool = False  # the model was not fine-tuned on this task (retrieval through the ITM head)
    label: str = ""  # which model is scored, shown on the progress bar
    precision: str = "fp32"  # resolved (fp32 | bf16 | fp16, muvla.utils.device.resolve_precision): forward autocast
    rerank_k: int = 0  # retrieval: ITM re-scores the first stage's top k each way (0 = every pair)
    rerank_query: str = DEFAULT_RERANK_QUERY  # retrieval: the first stage's tag query mode (retrieval.queries)

    def collator(self) -> TaskCollator:
        return TaskCollator(self.tokenizer, self.max_text_len)


@dataclass
class Evaluation:
    """A scored split: official metrics (empty headline when the split has no labels) and the
    predictions in whatever form the task's writer takes."""

    metrics: dict[str, Any]
    predictions: Any
    info: dict[str, Any] = field(default_factory=dict)  # how it was scored (e.g. pairs, seconds); not metrics


Reader = Callable[[Sequence[Path], ReadOptions], tuple[list[Any], LoadReport]]
DatasetFactory = Callable[[Sequence[Any], RegionStore, DataOptions], "Dataset[TaskItem]"]
Evaluator = Callable[[TaskModel, Sequence[Any], LoadReport, EvalOptions], Evaluation]
PredictionWriter = Callable[[Path, Any], Path]
VocabBuilder = Callable[[Sequence[Path], int], AnswerVocab]
ExtraWriter = Callable[[Evaluation, Path, str, str], dict[str, str]]


@dataclass(frozen=True)
class TaskSpec:
    """Everything the stages need to know about one downstream task."""

    name: str  # canonical name: task.json, results.json ('<name>/<split>'), file names
    display: str  # column title in ``muvla table``
    headline: str  # the metric ``muvla table`` shows (a key of Evaluation.metrics)
    files: str  # what ``read`` takes, for one-line errors (e.g. "questions.json annotations.json")
    read: Reader
    dataset: DatasetFactory
    head: HeadFactory
    evaluate: Evaluator
    write_predictions: PredictionWriter
    prediction_suffix: str  # the submission format's file suffix
    aliases: tuple[str, ...] = ()
    n_files: tuple[int, ...] = ()  # allowed numbers of files; () = one or more
    n_labelled_files: tuple[int, ...] = ()  # the same for labelled (train / val) files; () = n_files
    build_answer_vocab: VocabBuilder | None = None  # tasks whose classes are the training answers (VQA)
    zero_shot: bool = False  # evaluate may score a model never fine-tuned on the task
    regions_from_images: bool = False  # evaluate may build the region store from its image folder
    extra_outputs: ExtraWriter | None = None  # files only ``muvla evaluate`` writes (retrieval: scores, figure)

    @property
    def learns_answers(self) -> bool:
        return self.build_answer_vocab is not None

    @property
    def file_stem(self) -> str:
        """The name in file names ('refcoco+' -> 'refcoco_plus')."""
        return self.name.replace("+", "_plus")

    def check_files(self, files: Sequence[Path], role: str, labelled: bool) -> None:
        """One clear line when ``files`` cannot be this task's ``role`` files (e.g. 'train')."""
        allowed = (self.n_labelled_files or self.n_files) if labelled else self.n_files
        if not files or (allowed and len(files) not in allowed):
            raise ConfigError(f"{self.name} {role} expects {self.files}, got {len(files)} file(s)")

    def output_stem(self, split: str) -> str:
        """'<task>_<split>' as in predictions_<stem>.json ('refcoco+', 'testA' -> 'refcoco_plus_testA')."""
        return f"{self.file_stem}_{split}" if split else self.file_stem

    def prediction_path(self, folder: Path, split: str) -> Path:
        return folder / f"predictions_{self.output_stem(split)}{self.prediction_suffix}"

    def load(self, files: Sequence[Path], options: ReadOptions) -> tuple[list[Any], LoadReport]:
        """``read`` with unreadable files turned into one clear line (ConfigError)."""
        try:
            return self.read([Path(f) for f in files], options)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def score(self, model: TaskModel, examples: Sequence[Any], report: LoadReport, options: EvalOptions,
              predictions_path: Path) -> Evaluation:
        """Evaluate ``examples`` and write the predictions file; the one scoring path of both stages."""
        if not examples:
            raise ConfigError(f"{self.name}: no examples left to evaluate ({report.summary()})")
        evaluation = self.evaluate(model, examples, report, options)
        self.write_predictions(predictions_path, evaluation.predictions)
        return evaluation

    def build_model(self, encoder: Model, n_answers: int = 0, head_dropout: float = 0.1) -> TaskModel:
        """A new task model: ``encoder`` + a freshly initialised head."""
        return TaskModel(encoder, self.name, self.head(encoder.config, n_answers, head_dropout), n_answers,
                         head_dropout)

    def load_model(self, folder: Path, map_location: str = "cpu") -> TaskModel:
        """A fine-tuned model folder of this task (``TaskModel.save_pretrained``)."""
        return TaskModel.from_pretrained(folder, self.head, map_location)


# --------------------------------------------------------------------------------------------
# helpers for a task's evaluate function
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_dataset(model: TaskModel, dataset: Dataset, options: EvalOptions
                    ) -> tuple[list[Any], list[Any], list[np.ndarray]]:
    """(keys, predictions, region boxes of each item's first row) over ``dataset`` in order."""
    from muvla.training import move_to_device

    model.eval()
    collate = options.collator()
    keys: list[Any] = []
    preds: list[Any] = []
    boxes: list[np.ndarray] = []
    n = len(dataset)  # type: ignore[arg-type]
    size = options.batch_size
    for start in progress(range(0, n, size), desc=f"evaluate {model.task}" + (f" [{options.label}]" if options.label else ""), total=(n + size - 1) // size):
        batch = collate([dataset[i] for i in range(start, min(n, start + size))])
        with autocast(options.precision, options.device):
            out = model.predict(move_to_device(batch, options.device)).cpu()
        keys += batch.keys
        preds += out.tolist()
        rows = batch.region_boxes.shape[0] // len(batch.keys)
        boxes += [b.numpy() for b in batch.region_boxes[::rows]]
    return keys, preds, boxes


def count_metrics(examples: Sequence[Any], report: LoadReport) -> dict[str, Any]:
    """The counts every classification result starts with: scored examples and skipped ones."""
    return {"n": len(examples), "n_unscored": report.n_skipped}
