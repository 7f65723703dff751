"""The fine-tuned model: the pre-trained encoder plus one task head, and its folder on disk.

``TaskModel`` = the pre-trained :class:`muvla.model.Model` (encoder + its pre-training heads) + one
:class:`TaskHead`. ``forward(batch)`` returns the trainer's :class:`StepOutput`; ``predict(batch)``
returns the task's raw predictions. Each task module defines its head (usually an :class:`MLPHead`,
the VisualBERT/UNITER classifier); this module knows no task by name.

A fine-tuned folder is the encoder folder (``Model.save_pretrained``) + ``task_head.safetensors`` +
``task.json`` (:class:`TaskInfo`: what fine-tuning used, read back by evaluation) + the answer
vocabulary when the task learns one (VQA).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muvla.model import Model, ModelConfig
from muvla.model.modeling import EncoderOutput
from muvla.tasks.batch import TaskBatch
from muvla.training import StepOutput
from muvla.utils.config import ConfigError
from muvla.utils.shards import atomic_file

HEAD_WEIGHTS = "task_head.safetensors"
TASK_FILE = "task.json"
ANSWER_VOCAB_FILE = "answer_vocab.json"


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------


class TaskHead(nn.Module):
    """A task's output layer. Defaults suit single-label classification: cross entropy over
    ``logits`` (targets of -100 are ignored), training accuracy, argmax predictions."""

    n_outputs: int

    def logits(self, out: EncoderOutput, batch: TaskBatch, encoder: Model) -> torch.Tensor:
        """Task logits from the encoder output; ``encoder`` lets a head reuse a pre-training head
        (retrieval scores through the ITM head)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets >= 0
        if not bool(valid.any()):  # e.g. a RefCOCO+ batch where no region overlaps any gt box
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float()[valid], targets[valid])

    def train_logs(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        valid = targets >= 0
        if not bool(valid.any()):
            return {}
        return {"train_acc": (logits.argmax(-1)[valid] == targets[valid]).float().mean()}

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class MLPHead(TaskHead):
    """Linear -> GELU -> LayerNorm -> dropout -> Linear on the pooled [CLS]: the VQA/NLVR2
    classifier of UNITER/VisualBERT. Subclasses change what it reads (``logits``) and the loss."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.n_outputs = out_dim
        self.dense = nn.Linear(in_dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, out_dim)
        for lin in (self.dense, self.out):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.norm(F.gelu(self.dense(x)))))

    def logits(self, out: EncoderOutput, batch: TaskBatch, encoder: Model) -> torch.Tensor:
        return self(out.pooled)


# A task's head for an encoder config, the size of its answer vocabulary (0 = fixed classes) and dropout.
HeadFactory = Callable[[ModelConfig, int, float], TaskHead]


# --------------------------------------------------------------------------------------------
# task.json
# --------------------------------------------------------------------------------------------


@dataclass
class TaskInfo:
    """task.json: what fine-tuning used; evaluation reads it back (an explicit flag still wins)."""

    task: str
    n_answers: int = 0  # answer vocabulary size (VQA); 0 for tasks with fixed classes
    n_outputs: int = 0
    head_dropout: float = 0.1
    answer_vocab: str | None = None  # file name of the copied vocabulary inside the folder
    max_text_len: int | None = None  # the text truncation fine-tuning used
    finetuned_from: str | None = None

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> TaskInfo:
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise ValueError(f"{path}: expected a JSON object with a 'task' field")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_task_info(folder: str | Path) -> TaskInfo | None:
    """task.json of a fine-tuned model folder, or None for a plain encoder folder."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    return TaskInfo.from_dict(data, path)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


class TaskModel(nn.Module):
    """Pre-trained encoder + one task head; the trainer calls ``forward(batch) -> StepOutput``."""

    def __init__(self, encoder: Model, task: str, head: TaskHead, n_answers: int = 0,
                 head_dropout: float = 0.1) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.head = head
        self.n_answers = n_answers
        self.n_outputs = head.n_outputs
        self.head_dropout = head_dropout

    def encode(self, batch: TaskBatch) -> EncoderOutput:
        return self.encoder(batch.input_ids, batch.attention_mask, batch.region_features,
                            batch.region_positions, batch.region_mask)

    def logits(self, batch: TaskBatch) -> torch.Tensor:
        return self.head.logits(self.encode(batch), batch, self.encoder)

    def forward(self, batch: TaskBatch) -> StepOutput:
        logits = self.logits(batch)
        loss = self.head.loss(logits, batch.targets)
        logs: dict[str, float | torch.Tensor] = {f"{self.task}_loss": loss.detach()}
        with torch.no_grad():
            logs.update(self.head.train_logs(logits, batch.targets))
        return StepOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """The head's raw predictions (a label index per item for classifiers)."""
        return self.head.predict(self.logits(batch))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}

    def save_pretrained(self, path: str | Path, *, tokenizer: Any = None, answer_vocab: str | Path | None = None,
                        max_text_len: int | None = None, finetuned_from: str | None = None) -> Path:
        """``<path>/`` = encoder folder + task_head.safetensors + task.json (+ answer_vocab.json,
        copied so the folder is self-contained)."""
        from safetensors.torch import save_file

        folder = Path(path)
        self.encoder.save_pretrained(folder, tokenizer=tokenizer)
        with atomic_file(folder / HEAD_WEIGHTS) as tmp:
            save_file(self.head_state_dict(), str(tmp), metadata={"format": "pt", "task": self.task})
        info = TaskInfo(self.task, self.n_answers, self.n_outputs, self.head_dropout, None, max_text_len,
                        finetuned_from)
        if answer_vocab is not None:
            src = Path(answer_vocab)
            if src.resolve() != (folder / ANSWER_VOCAB_FILE).resolve():
                with atomic_file(folder / ANSWER_VOCAB_FILE) as tmp:
                    shutil.copyfile(src, tmp)
            info.answer_vocab = ANSWER_VOCAB_FILE
        with atomic_file(folder / TASK_FILE) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(info), indent=1), encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, make_head: HeadFactory, map_location: str = "cpu") -> TaskModel:
        """Load a folder written by :meth:`save_pretrained`; ``make_head`` is the task's head factory."""
        from safetensors.torch import load_file

        folder = Path(path)
        info = read_task_info(folder)
        if info is None:
            raise FileNotFoundError(f"{folder} has no {TASK_FILE}: not a fine-tuned task model folder")
        encoder = Model.from_pretrained(folder, map_location=map_location)
        head = make_head(encoder.config, int(info.n_answers), float(info.head_dropout))
        model = cls(encoder, info.task, head, int(info.n_answers), float(info.head_dropout))
        model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS), device=map_location), strict=True)
        return model


# --------------------------------------------------------------------------------------------
# where models come from
# --------------------------------------------------------------------------------------------


def resolve_model_folder(model: str | Path) -> Path | None:
    """The muvla model folder behind ``model``: the folder itself, or ``<model>/model`` (a fine-tune
    or pre-training run folder); None when it is not a muvla folder (e.g. 'default' or a BERT folder)."""
    if str(model) == "default":
        return None
    root = Path(model)
    for cand in (root, root / "model"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                arch = json.loads(cfg.read_text(encoding="utf-8")).get("architecture")
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg}: invalid JSON ({err})") from err
            if arch == "muvla.Model":
                return cand
    return None


def tokenizer_source(model: str | Path) -> str:
    """Folder (or 'default') to read the WordPiece tokenizer from for ``model``."""
    folder = resolve_model_folder(model)
    return str(folder) if folder is not None else str(model)


def load_encoder(model: str | Path, region_feature_dim: int) -> Model:
    """Encoder to fine-tune: a muvla model folder (pre-trained) or a HuggingFace BERT ('default' = MiniLM).

    A pre-trained encoder's region feature size must match the region store's (a clear error
    instead of a shape mismatch deep inside the first forward pass).
    """
    folder = resolve_model_folder(model)
    if folder is not None:
        enc = Model.from_pretrained(folder)
        if enc.config.region_feature_dim != region_feature_dim:
            raise ConfigError(f"{folder} expects region features of size {enc.config.region_feature_dim} but the "
                             f"region store has {region_feature_dim}: use regions from the same detector")
        return enc
    return Model.from_bert(str(model), region_feature_dim=region_feature_dim)
