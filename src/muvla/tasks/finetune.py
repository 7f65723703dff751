"""Downstream fine-tuning (``muvla finetune``, METHOD.md sections 8-9).

Reads the task's official files (the task's :class:`~muvla.tasks.spec.TaskSpec`), builds a
:class:`TaskModel` on the pre-trained encoder and trains it with the generic
:class:`~muvla.training.Trainer` (AdamW, warm-up/decay, AMP, DDP, checkpoints, resume,
metrics.jsonl). Outputs under ``<out>``:

    model/            encoder (save_pretrained) + task_head.safetensors + task.json (+ answer_vocab.json)
    checkpoints/, metrics.jsonl, training_curves.png       (the trainer's)
    results.json      validation metrics in the ``muvla table`` schema (when ``val`` is given)
    predictions_<task>_val.*                                 (official submission format)
    rejected.jsonl    every skipped train/val item with file, line and reason
    summary.json, config.yaml
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muvla.corpus.layout import RegionsOutput
from muvla.corpus.provenance import (
    OutputPolicy,
    StageStart,
    Step,
    StepResult,
    digest_file,
    digest_model,
    run_step,
)
from muvla.corpus.region_store import RegionStore
from muvla.tasks.batch import DEFAULT_MAX_TEXT_LEN, TaskCollator, has_regions_fn
from muvla.tasks.files import LoadReport, merge_reports
from muvla.tasks.model import ANSWER_VOCAB_FILE, HEAD_WEIGHTS, TaskModel, load_encoder, tokenizer_source
from muvla.tasks.registry import get_task, task_names
from muvla.tasks.results import write_results
from muvla.tasks.spec import DataOptions, EvalOptions, ReadOptions, TaskSpec
from muvla.tasks.vocab import AnswerVocab
from muvla.training import SCHEDULE_SETTINGS, TrainConfig, Trainer, TrainerSettings
from muvla.utils.config import ConfigError, check_max_text_len, output_settings, setting
from muvla.utils.device import (
    NUM_THREADS_HELP,
    check_num_threads,
    pick_device,
    resolve_precision,
    torch_num_threads,
)
from muvla.utils.shards import resolve_shard

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TrainerSettings, OutputPolicy):
    """``muvla finetune`` settings; trainer fields are flat (CLI flags), defaults are small CPU values.
    The paper's values are in configs/finetune/*_reference.yaml."""

    out: Path = setting(help="run folder: model/ (encoder + task head + task.json), metrics.jsonl, results.json")
    task: str = setting(help=f"one of {', '.join(task_names())}")
    train: list[Path] = setting(help="training files: vqa questions.json annotations.json; nlvr2 / snli_ve JSON "
                                     "lines; refcoco+ refs(unc).p instances.json; retrieval a captions file")
    regions: Path = setting(help="region store of the task's images (built by muvla regions)")
    model: str = setting("default", help="pre-trained muvla model or run folder, or a BERT folder ('default' = the "
                                         "bundled MiniLM)")
    images: Path | None = setting(None, help="NLVR2 / SNLI-VE image folder (checks that every image exists)")
    answer_vocab: Path | None = setting(None, help="VQA ans2label JSON (default: built from the train annotations)")
    answer_min_count: int = setting(9, help="VQA: answers given by fewer questions are left out of a built "
                                            "vocabulary")
    val: list[Path] = setting(default_factory=list, help="validation files (same formats as --train)")
    train_split: str = setting("train", help="RefCOCO+ split used for training inside the refer files")
    val_split: str = setting("val", help="RefCOCO+ split used for validation")
    # trainer settings are inherited (TrainerSettings); these defaults differ for small fine-tuning runs
    batch_size: int = setting(8, help="samples per rank and per micro-step", kw_only=True)
    keep_checkpoints: int = setting(2, help="newest checkpoints kept; 0 keeps all", kw_only=True, runtime=True)
    tensorboard: bool = setting(False, help="also log to <out>/tensorboard", kw_only=True, runtime=True)
    find_unused_parameters: bool = setting(True, help="DDP: the pre-training heads get no gradient", kw_only=True,
                                           runtime=True)
    max_text_len: int = setting(DEFAULT_MAX_TEXT_LEN, help="tokens per text incl. [CLS]/[SEP] (recorded in task.json)")
    head_dropout: float = setting(0.1, help="dropout of the task head")
    n_negatives: int = setting(1, help="retrieval fine-tuning: random negative captions per positive")
    eval_batch_size: int = setting(32, help="rows per batch when scoring the validation files", runtime=True)
    max_val_images: int = setting(0, help="retrieval validation: first N images (0 = all)")
    model_name: str = setting("muvla", help="row name of this model in results.json and the Meta-Ave table")
    num_threads: int | None = setting(None, help=NUM_THREADS_HELP, runtime=True)

    def validate(self) -> None:
        spec = get_task(self.task)
        self.task = spec.name
        if not self.train:
            raise ConfigError("train: give the task's training files")
        spec.check_files(self.train, "train", labelled=True)
        if self.val:
            spec.check_files(self.val, "val", labelled=True)
        check_max_text_len(self.max_text_len)
        for name in ("eval_batch_size", "n_negatives", "answer_min_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.head_dropout < 1:
            raise ConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.max_val_images < 0:
            raise ConfigError("max_val_images must be >= 0 (0 = all)")
        check_num_threads(self.num_threads)
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        return super().train_config(self.out)


def _answer_vocab(cfg: FinetuneConfig, spec: TaskSpec, out: Path) -> tuple[AnswerVocab | None, Path | None]:
    """The answer vocabulary to train with (given, or built from the train files); None when the
    task's classes are fixed."""
    if spec.build_answer_vocab is None:
        return None, None
    try:
        if cfg.answer_vocab is not None:
            return AnswerVocab.from_file(cfg.answer_vocab), Path(cfg.answer_vocab)
        vocab = spec.build_answer_vocab(cfg.train, cfg.answer_min_count)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    logger.info("built a %d-answer vocabulary from %s (min_count=%d)", len(vocab), cfg.train,
                cfg.answer_min_count)
    return vocab, vocab.save(out / ANSWER_VOCAB_FILE)


def _read_train(cfg: FinetuneConfig, spec: TaskSpec, store: RegionStore, vocab: AnswerVocab | None,
                out: Path) -> tuple[list[Any], LoadReport]:
    """Training examples; rejected.jsonl is written first, so an empty result can point at it."""
    options = ReadOptions(images=cfg.images, split=cfg.train_split, has_regions=has_regions_fn(store), vocab=vocab)
    examples, report = spec.load(cfg.train, options)
    logger.info("train data: %s", report.summary())
    report.write_rejected(out / "rejected.jsonl")
    if not examples:
        raise ConfigError(f"no usable training example in {[str(p) for p in cfg.train]} "
                          f"({report.summary()}; see {out / 'rejected.jsonl'})")
    return examples, report


def _validate_model(cfg: FinetuneConfig, spec: TaskSpec, model: TaskModel, store: RegionStore, tokenizer: Any,
                    vocab: AnswerVocab | None, out: Path, precision: str) -> tuple[dict[str, Any], LoadReport]:
    """Score the validation files (at the trainer's resolved ``precision``); write predictions and
    results.json. Returns (summary part, report)."""
    read = ReadOptions(images=cfg.images, split=cfg.val_split, has_regions=has_regions_fn(store), vocab=vocab)
    examples, report = spec.load(cfg.val, read)
    options = EvalOptions(store, tokenizer, next(model.parameters()).device, batch_size=cfg.eval_batch_size,
                          max_text_len=cfg.max_text_len, vocab=vocab, max_images=cfg.max_val_images,
                          label=f"{cfg.model_name} validation", precision=precision)
    pred_path = spec.prediction_path(out, "val")
    evaluation = spec.score(model, examples, report, options, pred_path)
    results = write_results(out / "results.json", cfg.model_name, spec.name, "val", evaluation.metrics)
    return {"val_metrics": evaluation.metrics, "val_load_report": report.to_dict(),
            "predictions": str(pred_path), "results": str(results)}, report


def _train(cfg: FinetuneConfig, spec: TaskSpec, examples: list[Any], store: RegionStore, tokenizer: Any,
           vocab: AnswerVocab | None) -> tuple[TaskModel, Trainer, dict[str, Any]]:
    """A fresh head on the encoder, trained by the generic trainer."""
    torch.manual_seed(cfg.seed)  # head initialisation
    model = spec.build_model(load_encoder(cfg.model, store.feature_dim), len(vocab) if vocab is not None else 0,
                             cfg.head_dropout)
    dataset = spec.dataset(examples, store, DataOptions(n_answers=model.n_answers, n_negatives=cfg.n_negatives))
    trainer = Trainer(model, dataset, TaskCollator(tokenizer, cfg.max_text_len), cfg.train_config())
    return model, trainer, trainer.train()


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.task``; save the task model; evaluate on ``cfg.val``.

    A step of the protocol (``muvla.corpus.provenance``): the same settings, files, regions and model
    reuse the finished run; an interrupted one resumes; changed settings are refused unless
    ``overwrite`` (``resume`` may lengthen the schedule); a changed input retrains."""
    cfg.validate()
    out = Path(cfg.out)
    regions = RegionsOutput(Path(cfg.regions))
    inputs = {"regions": regions.digest(), "model": digest_model(cfg.model)}  # a finished, unchanged region store
    inputs.update({f"train:{i}:{Path(p).name}": digest_file(Path(p)) for i, p in enumerate(cfg.train)})
    inputs.update({f"val:{i}:{Path(p).name}": digest_file(Path(p)) for i, p in enumerate(cfg.val)})
    if cfg.answer_vocab is not None:
        inputs["answer_vocab"] = digest_file(Path(cfg.answer_vocab))
    model_dir = out / "model"
    outputs = [model_dir / "task.json", model_dir / HEAD_WEIGHTS] + ([out / "results.json"] if cfg.val else [])
    settings = output_settings(cfg, exclude=("train", "val", "regions", "model", "images", "answer_vocab"))
    settings["precision"] = resolve_precision(cfg.precision, pick_device(cfg.device))  # what auto means here
    step = Step("finetune", out, settings, inputs, outputs, cfg,
                sources={"train": cfg.train, "val": cfg.val, "regions": cfg.regions, "model": cfg.model,
                         "answer_vocab": cfg.answer_vocab},
                work=[out / "checkpoints", model_dir, out / "metrics.jsonl", out / "training_curves.png",
                      out / "rejected.jsonl", *out.glob("predictions_*")],
                resume_may_change=SCHEDULE_SETTINGS)
    with torch_num_threads(cfg.num_threads):
        return run_step(step, lambda start: StepResult(_finetune(cfg, start)), overwrite=cfg.overwrite,
                        rank=resolve_shard().rank, resume_requested=cfg.resume)


def _finetune(cfg: FinetuneConfig, start: StageStart) -> dict[str, Any]:
    from muvla.encoders import load_wordpiece_tokenizer

    cfg = dataclasses.replace(cfg, resume=start.status == "resume")  # the protocol decides, not a flag
    spec = get_task(cfg.task)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = RegionStore(cfg.regions)
    vocab, vocab_path = _answer_vocab(cfg, spec, out)
    examples, train_report = _read_train(cfg, spec, store, vocab, out)
    tokenizer = load_wordpiece_tokenizer(tokenizer_source(cfg.model))
    model, trainer, train_summary = _train(cfg, spec, examples, store, tokenizer, vocab)
    if not trainer.dist.is_main:
        return {"task": spec.name, "rank": trainer.dist.rank, "train": train_summary}

    model_dir = model.save_pretrained(out / "model", answer_vocab=vocab_path, max_text_len=cfg.max_text_len,
                                      finetuned_from=str(cfg.model))
    summary: dict[str, Any] = {"task": spec.name, "model_dir": str(model_dir),
                               "train_examples": len(examples), "train_load_report": train_report.to_dict(),
                               "train": {k: v for k, v in train_summary.items() if k != "config"}}
    if train_summary.get("wall_s") and train_summary.get("resumed_from") is None:
        summary["steps_per_s"] = train_summary["steps"] / train_summary["wall_s"]
    reports = [train_report]
    if cfg.val:
        val_summary, val_report = _validate_model(cfg, spec, model, store, tokenizer, vocab, out,
                                                  trainer.precision)
        summary.update(val_summary)
        reports.append(val_report)
    merge_reports(reports).write_rejected(out / "rejected.jsonl")
    return summary


def describe(summary: dict[str, Any]) -> list[str]:
    """The few lines ``muvla finetune`` prints at the end (details in summary.json)."""
    reused = " (reused: same settings and inputs)" if summary.get("reused") else ""
    train = summary.get("train") or {}
    lines = [f"finetune [{summary.get('task')}]: {train.get('steps')} steps on {summary.get('train_examples')} "
             f"examples{reused}", f"  model: {summary.get('model_dir')}"]
    metrics = summary.get("val_metrics")
    if metrics:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))[:200]
        lines.append(f"  validation: {shown}")
    return lines
