"""Task heads on the pre-trained encoder for downstream fine-tuning (METHOD.md section 8).

``TaskModel`` = the pre-trained :class:`muvla.model.Model` (encoder + its ITM head) + one small head.
``forward(batch)`` returns the trainer's :class:`StepOutput`; ``predict(batch)`` returns the task's
raw predictions. Heads follow the usual VisualBERT/UNITER recipes:

- vqa:       MLP on the pooled [CLS] -> n_answers logits; BCE-with-logits on the soft scores,
             mean over (batch, answers) then multiplied by n_answers (= summed over answers, mean
             over questions), as the reference code does, so the gradient does not shrink with a
             3,129-way output.
- nlvr2:     rows 2i / 2i+1 of a batch are (left image, sentence) / (right image, sentence); their two
             pooled vectors are concatenated -> MLP -> 2 classes (False, True); cross entropy.
- snli_ve:   MLP on pooled -> 3 classes (LABELS order); cross entropy.
- refcoco+:  MLP on every region state -> one score; padding masked out; cross entropy over the
             regions with the region of max IoU with the ground-truth box as target.
- retrieval: the pre-training ITM head (one logit = match) on pooled; BCE on positives / negatives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from muvla.model import Model
from muvla.training import StepOutput
from muvla.utils.shards import atomic_file

TASKS: tuple[str, ...] = ("vqa", "nlvr2", "snli_ve", "refcoco+", "retrieval")
TASK_ALIASES: dict[str, str] = {"snli-ve": "snli_ve", "refcoco_plus": "refcoco+", "refcocoplus": "refcoco+"}
HEAD_WEIGHTS = "task_head.safetensors"
TASK_FILE = "task.json"
ANSWER_VOCAB_FILE = "answer_vocab.json"


def canonical_task(task: str) -> str:
    """'SNLI-VE' -> 'snli_ve'; a clear error for an unknown task."""
    name = TASK_ALIASES.get(task.strip().lower(), task.strip().lower())
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return name


def task_outputs(task: str, n_answers: int = 0) -> int:
    """Number of head outputs per task (VQA needs the answer vocabulary size)."""
    task = canonical_task(task)
    if task == "vqa":
        if n_answers < 1:
            raise ValueError("the VQA head needs n_answers >= 1 (the answer vocabulary size)")
        return n_answers
    return {"nlvr2": 2, "snli_ve": 3, "refcoco+": 1, "retrieval": 1}[task]


class MLPHead(nn.Module):
    """Linear -> GELU -> LayerNorm -> dropout -> Linear: the VQA/NLVR2 classifier of UNITER/VisualBERT."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, out_dim)
        for lin in (self.dense, self.out):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.norm(F.gelu(self.dense(x)))))


class TaskModel(nn.Module):
    """Pre-trained encoder + one task head; the trainer calls ``forward(batch) -> StepOutput``."""

    def __init__(self, encoder: Model, task: str, n_answers: int = 0, head_dropout: float = 0.1) -> None:
        super().__init__()
        self.task = canonical_task(task)
        self.encoder = encoder
        self.n_answers = n_answers if self.task == "vqa" else 0
        self.n_outputs = task_outputs(self.task, n_answers)
        self.head_dropout = head_dropout
        h = encoder.config.hidden_size
        eps = encoder.config.layer_norm_eps
        self.head: nn.Module | None
        if self.task == "vqa":
            self.head = MLPHead(h, 2 * h, self.n_outputs, head_dropout, eps)
        elif self.task == "nlvr2":
            self.head = MLPHead(2 * h, 2 * h, 2, head_dropout, eps)
        elif self.task == "snli_ve":
            self.head = MLPHead(h, 2 * h, 3, head_dropout, eps)
        elif self.task == "refcoco+":
            self.head = MLPHead(h, h, 1, head_dropout, eps)
        else:  # retrieval reuses the pre-trained ITM head, which lives in the encoder Model
            self.head = None

    # ------------------------------------------------------------------ forward

    def encode(self, batch: Any) -> Any:
        return self.encoder(batch.input_ids, batch.attention_mask, batch.region_features,
                            batch.region_positions, batch.region_mask)

    def logits(self, batch: Any) -> torch.Tensor:
        """Task logits: vqa [B, A], nlvr2 [B, 2] (B = rows / 2), snli_ve [B, 3], refcoco+ [B, R]
        (padding = -inf), retrieval [rows] (ITM logit)."""
        out = self.encode(batch)
        if self.task == "retrieval":
            return self.encoder.itm_head(out.pooled)
        assert self.head is not None
        if self.task == "nlvr2":
            if out.pooled.shape[0] % 2:
                raise ValueError("an NLVR2 batch needs an even number of rows (left, right) per example")
            pair = torch.cat([out.pooled[0::2], out.pooled[1::2]], dim=-1)
            return self.head(pair)
        if self.task == "refcoco+":
            scores = self.head(out.region_hidden).squeeze(-1)  # [B, R]
            return scores.masked_fill(~batch.region_mask.bool(), float("-inf"))
        return self.head(out.pooled)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task == "vqa":
            return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
        if self.task == "retrieval":
            return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        valid = targets >= 0
        if not bool(valid.any()):  # e.g. a RefCOCO+ batch where no region overlaps any gt box
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float()[valid], targets[valid])

    def forward(self, batch: Any) -> StepOutput:
        logits = self.logits(batch)
        loss = self.loss(logits, batch.targets)
        logs: dict[str, float | torch.Tensor] = {f"{self.task}_loss": loss.detach()}
        with torch.no_grad():
            if self.task in ("nlvr2", "snli_ve", "refcoco+"):
                valid = batch.targets >= 0
                if bool(valid.any()):
                    logs["train_acc"] = (logits.argmax(-1)[valid] == batch.targets[valid]).float().mean()
            elif self.task == "retrieval":
                logs["train_acc"] = ((logits > 0).float() == batch.targets).float().mean()
        return StepOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def predict(self, batch: Any) -> torch.Tensor:
        """vqa: answer label [B]; nlvr2: bool [B]; snli_ve: label index [B]; refcoco+: region
        index [B]; retrieval: ITM logit [rows] (higher = better match)."""
        logits = self.logits(batch)
        if self.task == "retrieval":
            return logits.float()
        pred = logits.argmax(-1)
        return pred.bool() if self.task == "nlvr2" else pred

    # ------------------------------------------------------------------ saving / loading

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        if self.head is None:
            return {}
        return {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}

    def save_pretrained(self, path: str | Path, tokenizer: Any = None, answer_vocab: str | Path | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
        """``<path>/`` = encoder folder (Model.save_pretrained) + task_head.safetensors + task.json
        (+ answer_vocab.json for VQA, copied so the folder is self-contained)."""
        from safetensors.torch import save_file

        folder = Path(path)
        self.encoder.save_pretrained(folder, tokenizer=tokenizer)
        with atomic_file(folder / HEAD_WEIGHTS) as tmp:
            save_file(self.head_state_dict(), str(tmp), metadata={"format": "pt", "task": self.task})
        info: dict[str, Any] = {"task": self.task, "n_answers": self.n_answers, "n_outputs": self.n_outputs,
                                "head_dropout": self.head_dropout, "answer_vocab": None}
        if answer_vocab is not None:
            src = Path(answer_vocab)
            if src.resolve() != (folder / ANSWER_VOCAB_FILE).resolve():
                with atomic_file(folder / ANSWER_VOCAB_FILE) as tmp:
                    shutil.copyfile(src, tmp)
            info["answer_vocab"] = ANSWER_VOCAB_FILE
        info.update(extra or {})
        with atomic_file(folder / TASK_FILE) as tmp:
            tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> TaskModel:
        """Load a folder written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        folder = Path(path)
        info = read_task_info(folder)
        if info is None:
            raise FileNotFoundError(f"{folder} has no {TASK_FILE}: not a fine-tuned task model folder")
        model = cls(Model.from_pretrained(folder, map_location=map_location), info["task"],
                    int(info.get("n_answers", 0)), float(info.get("head_dropout", 0.1)))
        if model.head is not None:
            state = load_file(str(folder / HEAD_WEIGHTS), device=map_location)
            model.head.load_state_dict(state, strict=True)
        return model


def read_task_info(folder: str | Path) -> dict[str, Any] | None:
    """task.json of a fine-tuned model folder, or None for a plain encoder folder."""
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or "task" not in info:
        raise ValueError(f"{path}: expected a JSON object with a 'task' field")
    return info


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


def load_encoder(model: str | Path, region_feature_dim: int) -> Model:
    """Encoder to fine-tune: a muvla model folder (pre-trained) or a HuggingFace BERT ('default' = MiniLM).

    A pre-trained encoder's region feature size must match the region store's (a clear error
    instead of a shape mismatch deep inside the first forward pass).
    """
    folder = resolve_model_folder(model)
    if folder is not None:
        enc = Model.from_pretrained(folder)
        if enc.config.region_feature_dim != region_feature_dim:
            raise ValueError(f"{folder} expects region features of size {enc.config.region_feature_dim} but the "
                             f"region store has {region_feature_dim}: use regions from the same detector")
        return enc
    return Model.from_bert(str(model), region_feature_dim=region_feature_dim)
