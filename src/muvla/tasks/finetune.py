"""Downstream fine-tuning (``muvla finetune``, METHOD.md sections 8-9).

Reads the task's official files, builds a :class:`TaskModel` on the pre-trained encoder and trains it
with the pre-training :class:`Trainer` (AdamW, warm-up/decay, AMP, DDP, checkpoints, resume,
metrics.jsonl). Outputs under ``<out>``:

    model/            encoder (save_pretrained) + task_head.safetensors + task.json (+ answer_vocab.json)
    checkpoints/, metrics.jsonl, training_curves.png       (the trainer's)
    results.json      validation metrics in the ``muvla table`` schema (when ``val`` is given)
    predictions_<task>_val.*                                 (official submission format)
    rejected.jsonl    every skipped train/val item with file, line and reason
    summary.json, config.yaml
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from muvla.corpus.regions import RegionStore
from muvla.tasks.data import AnswerVocab, LoadReport
from muvla.tasks.datasets import TaskCollator, build_dataset
from muvla.tasks.evaluate import (
    PREDICTION_SUFFIX,
    evaluate_examples,
    load_task_examples,
    merge_reports,
    results_entry,
    retrieval_scores,
    select_retrieval_subset,
    tokenizer_source,
    write_predictions,
    write_retrieval_predictions,
)
from muvla.tasks.heads import ANSWER_VOCAB_FILE, TaskModel, canonical_task, load_encoder
from muvla.tasks.metrics import retrieval_recall
from muvla.training import TrainConfig, Trainer, TrainerSettings
from muvla.utils.config import ConfigError, save_config
from muvla.utils.shards import atomic_file

logger = logging.getLogger(__name__)

@dataclass
class FinetuneConfig(TrainerSettings):
    """``muvla finetune`` settings; trainer fields are flat (CLI flags), defaults are small CPU values.
    The paper's values are in configs/finetune/*_reference.yaml."""

    out: Path
    task: str
    train: list[Path]  # vqa: questions.json annotations.json; nlvr2 / snli_ve: jsonl; refcoco+: refs.p instances.json
    regions: Path
    model: str = "default"  # pre-trained muvla folder / run folder, or a BERT folder ('default' = MiniLM)
    images: Path | None = None  # NLVR2 / SNLI-VE image folder (checks that every image exists)
    answer_vocab: Path | None = None  # VQA ans2label JSON; None = built from the train annotations
    answer_min_count: int = 9  # when building the VQA vocabulary
    val: list[Path] = field(default_factory=list)
    train_split: str = "train"  # RefCOCO+ split names inside the refer files
    val_split: str = "val"
    # trainer settings are inherited (TrainerSettings); these defaults differ for small fine-tuning runs
    batch_size: int = field(default=8, kw_only=True)
    keep_checkpoints: int = field(default=2, kw_only=True)
    tensorboard: bool = field(default=False, kw_only=True)
    find_unused_parameters: bool = field(default=True, kw_only=True)  # pre-training heads get no gradient
    max_text_len: int = 40
    head_dropout: float = 0.1
    n_negatives: int = 1  # retrieval fine-tuning: random negative captions per positive
    eval_batch_size: int = 32
    max_val_images: int = 0  # retrieval validation: first N images (0 = all)
    model_name: str = "muvla"
    torch_threads: int = 0  # intra-op CPU threads; 0 = torch's default (1 is often fastest on busy small machines)

    def validate(self) -> None:
        try:
            self.task = canonical_task(self.task)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if not self.train:
            raise ConfigError("train: give the task's training files")
        if self.task == "vqa" and len(self.train) != 2:
            raise ConfigError(f"vqa train expects questions.json annotations.json, got {len(self.train)} file(s)")
        if self.task == "vqa" and self.val and len(self.val) != 2:
            raise ConfigError(f"vqa val expects questions.json annotations.json, got {len(self.val)} file(s)")
        if self.task == "refcoco+" and len(self.train) not in (1, 2):
            raise ConfigError("refcoco+ train expects refs.p instances.json, or one refcoco JSON")
        for name in ("max_text_len", "eval_batch_size", "n_negatives", "answer_min_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.head_dropout < 1:
            raise ConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.max_val_images < 0:
            raise ConfigError("max_val_images must be >= 0 (0 = all)")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0 (0 = torch default), got {self.torch_threads}")
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        return super().train_config(self.out)


def _answer_vocab(cfg: FinetuneConfig, out: Path) -> tuple[AnswerVocab, Path]:
    """The VQA vocabulary file to train with (given, or built from the train annotations)."""
    if cfg.answer_vocab is not None:
        return AnswerVocab.from_file(cfg.answer_vocab), Path(cfg.answer_vocab)
    vocab = AnswerVocab.build(cfg.train[1], min_count=cfg.answer_min_count)
    path = vocab.save(out / ANSWER_VOCAB_FILE)
    logger.info("built a %d-answer vocabulary from %s (min_count=%d)", len(vocab), cfg.train[1],
                cfg.answer_min_count)
    return vocab, path


def _validate_model(cfg: FinetuneConfig, model: TaskModel, store: RegionStore, tokenizer: Any,
                    vocab: AnswerVocab | None, out: Path) -> tuple[dict[str, Any], LoadReport, Path]:
    """Score the validation files; write predictions. Returns (metrics, load report, predictions path)."""
    device = next(model.parameters()).device
    split = cfg.val_split if cfg.task == "refcoco+" else "val"
    examples, report = load_task_examples(cfg.task, cfg.val, images=cfg.images, vocab=vocab, store=store,
                                          split=split)
    stem = f"{cfg.task.replace('+', '_plus')}_val"
    pred_path = out / f"predictions_{stem}{PREDICTION_SUFFIX[cfg.task]}"
    if cfg.task == "retrieval":
        subset = select_retrieval_subset(examples, cfg.max_val_images)
        if not subset:
            raise ValueError(f"retrieval validation: no caption left ({report.summary()})")
        scores, image_ids, t2i = retrieval_scores(model, subset, store, tokenizer, batch_size=cfg.eval_batch_size,
                                                  max_text_len=cfg.max_text_len, device=device)
        metrics: dict[str, Any] = retrieval_recall(scores, t2i)
        metrics.update({"n_images": len(image_ids), "n_captions": len(subset), "zero_shot": False})
        write_retrieval_predictions(pred_path, scores, image_ids, subset)
    else:
        metrics, predictions = evaluate_examples(model, examples, report, store, tokenizer,
                                                 batch_size=cfg.eval_batch_size, max_text_len=cfg.max_text_len,
                                                 device=device, vocab=vocab)
        write_predictions(cfg.task, pred_path, predictions)
    return metrics, report, pred_path


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.task``; save the task model; evaluate on ``cfg.val``."""
    from muvla.encoders import load_wordpiece_tokenizer

    cfg.validate()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = RegionStore(cfg.regions)
    vocab, vocab_path = _answer_vocab(cfg, out) if cfg.task == "vqa" else (None, None)
    train_split = cfg.train_split if cfg.task == "refcoco+" else None
    examples, train_report = load_task_examples(cfg.task, cfg.train, images=cfg.images, vocab=vocab, store=store,
                                                split=train_split)
    logger.info("train data: %s", train_report.summary())
    train_report.write_rejected(out / "rejected.jsonl")
    if not examples:
        raise ConfigError(f"no usable training example in {[str(p) for p in cfg.train]} "
                          f"({train_report.summary()}; see {out / 'rejected.jsonl'})")

    tok_src = tokenizer_source(cfg.model)
    tokenizer = load_wordpiece_tokenizer(tok_src)
    torch.manual_seed(cfg.seed)  # head initialisation
    encoder = load_encoder(cfg.model, store.feature_dim)
    model = TaskModel(encoder, cfg.task, n_answers=len(vocab) if vocab is not None else 0,
                      head_dropout=cfg.head_dropout)
    dataset = build_dataset(cfg.task, examples, store, n_answers=model.n_answers, n_negatives=cfg.n_negatives)
    trainer = Trainer(model, dataset, TaskCollator(tokenizer, cfg.max_text_len), cfg.train_config())
    train_summary = trainer.train()
    if not trainer.dist.is_main:
        return {"stage": "finetune", "task": cfg.task, "rank": trainer.dist.rank, "train": train_summary}

    model_dir = model.save_pretrained(out / "model", answer_vocab=vocab_path,
                                      extra={"max_text_len": cfg.max_text_len, "finetuned_from": str(cfg.model)})
    summary: dict[str, Any] = {"stage": "finetune", "task": cfg.task, "model_dir": str(model_dir),
                               "train_examples": len(examples), "train_load_report": train_report.to_dict(),
                               "train": {k: v for k, v in train_summary.items() if k != "config"}}
    if train_summary.get("wall_s") and train_summary.get("resumed_from") is None:
        summary["steps_per_s"] = train_summary["steps"] / train_summary["wall_s"]
    reports = [train_report]
    if cfg.val:
        metrics, val_report, pred_path = _validate_model(cfg, model, store, tokenizer, vocab, out)
        reports.append(val_report)
        entry = results_entry(cfg.model_name, cfg.task, "val", metrics)
        with atomic_file(out / "results.json") as tmp:
            tmp.write_text(json.dumps(entry, indent=1), encoding="utf-8")
        summary.update({"val_metrics": metrics, "val_load_report": val_report.to_dict(),
                        "predictions": str(pred_path), "results": str(out / "results.json")})
    merge_reports(reports).write_rejected(out / "rejected.jsonl")
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    save_config(cfg, out, inputs={"train": cfg.train, "val": cfg.val, "regions": cfg.regions, "model": cfg.model,
                                  "answer_vocab": vocab_path})
    return summary
