"""Downstream evaluation (``muvla evaluate``): official metrics + prediction files (METHOD.md section 8).

``run_evaluate`` scores a fine-tuned task model (``<finetune out>/model`` with task.json) on one
split, or, for ``--task retrieval``, any muvla model zero-shot through its pre-training ITM head:
every (image, caption) pair of the (optionally subsampled) split is scored, so n images x m captions
cost n*m encoder passes; ``max_images`` caps n for CPU runs.

Outputs (``out`` is a folder, or a ``*.json`` results path whose parent holds the rest):
results.json in the ``muvla table`` schema, the predictions in the benchmark's submission format,
rejected.jsonl (the loaders' records), summary.json and config.yaml.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from muvla.corpus.regions import RegionStore
from muvla.tasks.data import (
    NO_REGIONS,
    AnswerVocab,
    CaptionExample,
    LoadReport,
    caption_index,
    load_coco_captions,
    load_nlvr2,
    load_refcoco,
    load_refcoco_json,
    load_snli_ve,
    load_vqa,
)
from muvla.tasks.datasets import TaskBatch, TaskCollator, build_dataset, get_regions, has_regions_fn
from muvla.tasks.heads import ANSWER_VOCAB_FILE, TASKS, TaskModel, canonical_task, read_task_info
from muvla.tasks.metrics import (
    covered_by_regions,
    nlvr2_accuracy_consistency,
    refcoco_accuracy,
    retrieval_recall,
    snli_ve_accuracy,
    vqa_accuracy,
    write_nlvr2_predictions,
    write_refcoco_predictions,
    write_snli_ve_predictions,
    write_vqa_predictions,
)
from muvla.tasks.table import HEADLINE
from muvla.training.distributed import pick_device
from muvla.utils.config import ConfigError, save_config
from muvla.utils.progress import progress
from muvla.utils.shards import atomic_file

logger = logging.getLogger(__name__)

PREDICTION_SUFFIX = {"vqa": ".json", "nlvr2": ".csv", "snli_ve": ".jsonl", "refcoco+": ".json", "retrieval": ".json"}


# --------------------------------------------------------------------------------------------
# shared helpers (also used by finetune)
# --------------------------------------------------------------------------------------------


def merge_reports(reports: Sequence[LoadReport]) -> LoadReport:
    """One LoadReport over several files (counts summed, records concatenated)."""
    out = LoadReport()
    for r in reports:
        out.kept += r.kept
        out.skipped.update(r.skipped)
        out.notes.update(r.notes)
        out.records.extend(r.records)
    return out


def load_task_examples(task: str, files: Sequence[Path], *, images: Path | None = None,
                       vocab: AnswerVocab | None = None, store: RegionStore | None = None,
                       split: str | None = None) -> tuple[list[Any], LoadReport]:
    """Read a task's official files with the ``muvla.tasks.data`` loaders.

    files: vqa [questions.json, annotations.json] (annotations optional for test splits);
    nlvr2 / snli_ve: one or more JSON-lines files; refcoco+: [refs(unc).p, instances.json] or
    [refcoco.json] (``split`` selects train/val/testA/testB); retrieval: [captions.json].
    """
    task = canonical_task(task)
    files = [Path(f) for f in files]
    if not files:
        raise ConfigError(f"task {task}: no data files given")
    has = has_regions_fn(store) if store is not None else None
    if task == "vqa":
        if len(files) not in (1, 2):
            raise ConfigError(f"vqa expects [questions.json, annotations.json], got {len(files)} files")
        if vocab is None:
            raise ConfigError("vqa needs an answer vocabulary (answer_vocab)")
        return load_vqa(files[0], files[1] if len(files) == 2 else None, vocab, has)
    if task == "refcoco+":
        if len(files) == 2:
            return load_refcoco(files[0], files[1], split, has)
        if len(files) == 1:
            return load_refcoco_json(files[0], split, has)
        raise ConfigError(f"refcoco+ expects [refs.p, instances.json] or [refcoco.json], got {len(files)} files")
    examples: list[Any] = []
    reports = []
    for f in files:
        if task == "nlvr2":
            ex, rep = load_nlvr2(f, images, has)
        elif task == "snli_ve":
            ex, rep = load_snli_ve(f, images, has)
        else:
            ex, rep = load_coco_captions(f, has)
        examples += ex
        reports.append(rep)
    return examples, merge_reports(reports)


def tokenizer_source(model: str | Path) -> str:
    """Folder (or 'default') to read the WordPiece tokenizer from for ``model``."""
    from muvla.tasks.heads import resolve_model_folder

    folder = resolve_model_folder(model)
    return str(folder) if folder is not None else str(model)


@torch.no_grad()
def predict_dataset(model: TaskModel, dataset: Dataset, collator: TaskCollator, batch_size: int,
                    device: torch.device, desc: str = "predict") -> tuple[list[Any], list[Any], list[np.ndarray]]:
    """(keys, predictions, region boxes of each item's first row) over ``dataset`` in order."""
    from muvla.training import move_to_device

    model.eval()
    keys: list[Any] = []
    preds: list[Any] = []
    boxes: list[np.ndarray] = []
    n = len(dataset)  # type: ignore[arg-type]
    for start in progress(range(0, n, batch_size), desc=desc, total=(n + batch_size - 1) // batch_size):
        batch = collator([dataset[i] for i in range(start, min(n, start + batch_size))])
        out = model.predict(move_to_device(batch, device)).cpu()
        keys += batch.keys
        preds += out.tolist()
        rows = batch.region_boxes.shape[0] // len(batch.keys)
        boxes += [b.numpy() for b in batch.region_boxes[::rows]]
    return keys, preds, boxes


def evaluate_examples(model: TaskModel, examples: Sequence[Any], report: LoadReport, store: RegionStore,
                      tokenizer: Any, *, batch_size: int = 32, max_text_len: int = 40,
                      device: torch.device | None = None, vocab: AnswerVocab | None = None
                      ) -> tuple[dict[str, Any], dict[Any, Any]]:
    """Predict ``examples`` with a fine-tuned model; return (official metrics, predictions by key).

    Metrics are empty when the split has no labels (e.g. VQA test questions without annotations).
    Examples the loader skipped are counted: ``n_unscored`` (and as wrong in RefCOCO+ ``acc_all``).
    """
    task = model.task
    if task == "retrieval":
        raise ValueError("use retrieval_scores for retrieval")
    device = device or next(model.parameters()).device
    if not examples:
        raise ValueError(f"{task}: no examples left to evaluate ({report.summary()})")
    dataset = build_dataset(task, examples, store, n_answers=model.n_answers)
    collator = TaskCollator(tokenizer, max_text_len)
    keys, preds, boxes = predict_dataset(model, dataset, collator, batch_size, device, desc=f"eval {task}")
    metrics: dict[str, Any] = {"n": len(examples), "n_unscored": report.n_skipped}
    predictions: dict[Any, Any]
    if task == "vqa":
        if vocab is None:
            raise ValueError("VQA evaluation needs the answer vocabulary")
        predictions = {int(k): vocab.answer(int(p)) for k, p in zip(keys, preds)}
        if all(ex.answers for ex in examples):
            metrics["accuracy"] = vqa_accuracy(predictions, examples)
    elif task == "nlvr2":
        predictions = {str(k): bool(p) for k, p in zip(keys, preds)}
        metrics.update(nlvr2_accuracy_consistency(predictions, examples))
    elif task == "snli_ve":
        predictions = {str(k): int(p) for k, p in zip(keys, preds)}
        metrics["accuracy"] = snli_ve_accuracy(predictions, examples)
    else:  # refcoco+
        predictions = {}
        pred_boxes, gt_boxes, covered = [], [], []
        for ex, key, p, b in zip(examples, keys, preds, boxes):
            box = b[int(p)]
            predictions[key] = box.tolist()
            pred_boxes.append(box)
            gt_boxes.append(ex.box)
            covered.append(covered_by_regions(ex.box, get_regions(store, ex.image_id).boxes))
        n_unscored = int(report.skipped.get(NO_REGIONS, 0))
        metrics.update(refcoco_accuracy(np.array(pred_boxes), np.array(gt_boxes), covered, n_unscored))
        metrics["n_unscored"] = n_unscored
    return metrics, predictions


def write_predictions(task: str, path: Path, predictions: dict[Any, Any]) -> Path:
    """Predictions in the benchmark's submission format (see DESIGN.md "tasks")."""
    if task == "vqa":
        return write_vqa_predictions(path, predictions)
    if task == "nlvr2":
        return write_nlvr2_predictions(path, predictions)
    if task == "snli_ve":
        return write_snli_ve_predictions(path, predictions)
    if task == "refcoco+":
        return write_refcoco_predictions(path, predictions)
    raise ValueError(f"no prediction writer for task {task!r}")


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def select_retrieval_subset(captions: Sequence[CaptionExample], max_images: int = 0,
                            max_captions_per_image: int = 0) -> list[CaptionExample]:
    """The first ``max_images`` images (caption order) and up to ``max_captions_per_image`` captions each."""
    image_ids, _ = caption_index(captions)
    keep = set(map(str, image_ids[:max_images] if max_images > 0 else image_ids))
    per_image: dict[str, int] = {}
    out = []
    for c in captions:
        key = str(c.image_id)
        if key not in keep or (max_captions_per_image > 0 and per_image.get(key, 0) >= max_captions_per_image):
            continue
        per_image[key] = per_image.get(key, 0) + 1
        out.append(c)
    return out


@torch.no_grad()
def retrieval_scores(model: TaskModel, captions: Sequence[CaptionExample], store: RegionStore, tokenizer: Any,
                     *, batch_size: int = 64, max_text_len: int = 40, device: torch.device | None = None
                     ) -> tuple[np.ndarray, list[Any], list[int]]:
    """ITM logit of every (image, caption) pair: (scores [n_images, n_captions], image ids,
    text_to_image). Captions are tokenized once; each image's regions are repeated per caption chunk."""
    if model.task != "retrieval":
        raise ValueError(f"retrieval scoring needs the ITM head (task 'retrieval'), model task is {model.task!r}")
    device = device or next(model.parameters()).device
    model.eval()
    image_ids, text_to_image = caption_index(captions)
    enc = tokenizer([c.caption for c in captions], padding="longest", truncation=True, max_length=max_text_len,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    scores = np.zeros((len(image_ids), len(captions)), dtype=np.float32)
    for row in progress(range(len(image_ids)), desc="retrieval", total=len(image_ids), unit="img"):
        regions = get_regions(store, image_ids[row])
        feats = torch.from_numpy(np.asarray(regions.features, dtype=np.float32))[None]
        pos = torch.from_numpy(regions.position_features())[None]
        for start in range(0, len(captions), batch_size):
            stop = min(len(captions), start + batch_size)
            b = stop - start
            batch = TaskBatch(input_ids=ids[start:stop].to(device), attention_mask=mask[start:stop].to(device),
                              region_features=feats.expand(b, -1, -1).to(device),
                              region_positions=pos.expand(b, -1, -1).to(device),
                              region_mask=torch.ones(b, feats.shape[1], dtype=torch.bool, device=device),
                              region_boxes=torch.zeros(b, feats.shape[1], 4), targets=torch.zeros(b),
                              keys=[])
            scores[row, start:stop] = model.predict(batch).cpu().numpy()
    return scores, image_ids, text_to_image


def write_retrieval_predictions(path: Path, scores: np.ndarray, image_ids: Sequence[Any],
                                captions: Sequence[CaptionExample], k: int = 10) -> Path:
    """Top-k caption ids per image and top-k image ids per caption (there is no official format)."""
    k_t = min(k, scores.shape[1])
    k_i = min(k, scores.shape[0])
    i2t = np.argsort(-scores, axis=1, kind="stable")[:, :k_t]
    t2i = np.argsort(-scores, axis=0, kind="stable")[:k_i].T
    rows = {"image_to_text": [{"image_id": image_ids[i], "caption_ids": [captions[j].caption_id for j in i2t[i]]}
                              for i in range(len(image_ids))],
            "text_to_image": [{"caption_id": captions[j].caption_id, "image_ids": [image_ids[i] for i in t2i[j]]}
                              for j in range(len(captions))]}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows), encoding="utf-8")
    return path


def plot_retrieval_recall(metrics: dict[str, Any], path: Path, title: str = "retrieval") -> Path:
    """Bar chart of R@1/5/10 in both directions (the demo's zero-shot retrieval figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = (1, 5, 10)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    for j, (direction, label) in enumerate((("i2t", "image -> text"), ("t2i", "text -> image"))):
        vals = [100 * metrics[f"{direction}_r{k}"] for k in ks]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(ks))], vals, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(ks)), [f"R@{k}" for k in ks])
    ax.set_ylim(0, 105)
    ax.set_ylabel("recall (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# the evaluate stage
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluateConfig:
    """``muvla evaluate`` settings."""

    out: Path  # results json path, or a folder (-> <out>/results.json)
    task: str
    model: str = "default"  # fine-tuned folder (task.json), or for retrieval any muvla/BERT model
    split: str = "val"
    data: list[Path] = field(default_factory=list)
    regions: Path | None = None
    images: Path | None = None  # NLVR2 / SNLI-VE image folder; retrieval: images to build regions from
    captions: Path | None = None  # retrieval: COCO captions JSON (or pass it in data)
    answer_vocab: Path | None = None  # VQA: default = the copy inside the fine-tuned model folder
    coco_instances: Path | None = None  # on-the-fly regions with the coco-instances backend
    region_backend: str = "detector"  # backend when regions must be built from images
    max_regions: int = 36
    max_images: int = 0  # retrieval: first N images only (0 = all)
    max_captions_per_image: int = 0  # retrieval: 0 = all
    batch_size: int = 32
    max_text_len: int = 40
    device: str = "auto"
    model_name: str = "muvla"
    torch_threads: int = 0  # intra-op CPU threads; 0 = torch's default

    def validate(self) -> None:
        try:
            self.task = canonical_task(self.task)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self.task == "retrieval":
            if self.captions is None and not self.data:
                raise ConfigError("retrieval needs captions (a COCO captions JSON)")
            if self.regions is None and self.images is None:
                raise ConfigError("retrieval needs a region store (regions) or an image folder (images)")
        else:
            if not self.data:
                raise ConfigError(f"task {self.task} needs its data files (data)")
            if self.regions is None:
                raise ConfigError(f"task {self.task} needs a region store (regions)")
        for name in ("batch_size", "max_text_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0 or self.max_captions_per_image < 0:
            raise ConfigError("max_images and max_captions_per_image must be >= 0 (0 = all)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0 (0 = torch default), got {self.torch_threads}")


def output_paths(out: Path, task: str, split: str) -> tuple[Path, Path]:
    """(results.json path, folder for predictions / rejected / summary)."""
    out = Path(out)
    if out.suffix == ".json":
        return out, out.parent
    return out / "results.json", out


def results_entry(model_name: str, task: str, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One results record in the ``muvla table`` schema (task '<task>/<split>')."""
    name = "refcoco+" if task == "refcoco+" else task
    return {"model": model_name, "task": f"{name}/{split}" if split else name, "metrics": metrics}


def load_task_model(model: str | Path, task: str, feature_dim: int) -> TaskModel:
    """A fine-tuned task model; for retrieval also a plain encoder (zero-shot through its ITM head)."""
    from muvla.tasks.heads import load_encoder, resolve_model_folder

    folder = resolve_model_folder(model)
    info = read_task_info(folder) if folder is not None else None
    if info is not None:
        if canonical_task(info["task"]) != task:
            raise ConfigError(f"{folder} was fine-tuned for {info['task']!r}, not {task!r}")
        tm = TaskModel.from_pretrained(folder)
        if tm.encoder.config.region_feature_dim != feature_dim:
            raise ConfigError(f"{folder} expects region features of size {tm.encoder.config.region_feature_dim}, "
                              f"the region store has {feature_dim}")
        return tm
    if task != "retrieval":
        raise ConfigError(f"{model} is not a fine-tuned {task} model (no task.json): run muvla finetune first")
    return TaskModel(load_encoder(model, feature_dim), "retrieval")


def _build_regions(cfg: EvaluateConfig, folder: Path) -> Path:
    """Retrieval without a store: run the regions stage on ``cfg.images`` into ``<folder>/regions``."""
    from muvla.regions.stage import RegionsConfig, run_regions

    rcfg = RegionsConfig(out=folder / "regions", backend=cfg.region_backend, images=cfg.images,
                         coco_instances=cfg.coco_instances, max_regions=cfg.max_regions,
                         max_proposals=max(48, cfg.max_regions), progress=False)
    run_regions(rcfg)
    return rcfg.out


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate one task on one split; write results.json, predictions, rejected.jsonl, summary.json."""
    from muvla.encoders import load_wordpiece_tokenizer

    cfg.validate()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    task = cfg.task
    results_path, folder = output_paths(cfg.out, task, cfg.split)
    folder.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    regions_root = cfg.regions if cfg.regions is not None else _build_regions(cfg, folder)
    store = RegionStore(regions_root)
    model = load_task_model(cfg.model, task, store.feature_dim).to(device)
    tokenizer = load_wordpiece_tokenizer(tokenizer_source(cfg.model))
    stem = f"{task.replace('+', '_plus')}_{cfg.split}" if cfg.split else task.replace("+", "_plus")
    pred_path = folder / f"predictions_{stem}{PREDICTION_SUFFIX[task]}"
    summary: dict[str, Any] = {"stage": "evaluate", "task": task, "split": cfg.split, "model": str(cfg.model),
                               "regions": str(regions_root), "device": str(device)}

    if task == "retrieval":
        files = [cfg.captions] if cfg.captions is not None else list(cfg.data)
        captions, report = load_task_examples(task, files, store=store)
        subset = select_retrieval_subset(captions, cfg.max_images, cfg.max_captions_per_image)
        if not subset:
            raise ValueError(f"retrieval: no caption has an image with regions ({report.summary()})")
        scores, image_ids, t2i = retrieval_scores(model, subset, store, tokenizer, batch_size=cfg.batch_size,
                                                  max_text_len=cfg.max_text_len, device=device)
        metrics: dict[str, Any] = retrieval_recall(scores, t2i)
        model_folder = folder_of(cfg.model)
        zero_shot = model_folder is None or read_task_info(model_folder) is None
        metrics.update({"n_images": len(image_ids), "n_captions": len(subset), "zero_shot": zero_shot})
        np.save(folder / f"scores_{stem}.npy", scores)
        write_retrieval_predictions(pred_path, scores, image_ids, subset)
        kind = "zero-shot (ITM head)" if metrics["zero_shot"] else "fine-tuned"
        summary["figure"] = str(plot_retrieval_recall(
            metrics, folder / "retrieval_recall.png",
            f"{cfg.model_name} {kind}: {len(image_ids)} images x {len(subset)} captions"))
    else:
        vocab = None
        if task == "vqa":
            vocab_path = cfg.answer_vocab
            if vocab_path is None:
                mf = folder_of(cfg.model)
                vocab_path = mf / ANSWER_VOCAB_FILE if mf is not None else None
            if vocab_path is None or not Path(vocab_path).is_file():
                raise ConfigError("VQA evaluation needs answer_vocab (none found in the model folder)")
            vocab = AnswerVocab.from_file(vocab_path)
            if len(vocab) != model.n_answers:
                raise ConfigError(f"answer vocabulary {vocab_path} has {len(vocab)} answers, the model "
                                  f"{model.n_answers}")
        examples, report = load_task_examples(task, cfg.data, images=cfg.images, vocab=vocab, store=store,
                                              split=cfg.split if task == "refcoco+" else None)
        metrics, predictions = evaluate_examples(model, examples, report, store, tokenizer,
                                                 batch_size=cfg.batch_size, max_text_len=cfg.max_text_len,
                                                 device=device, vocab=vocab)
        write_predictions(task, pred_path, predictions)
    report.write_rejected(folder / "rejected.jsonl")
    if HEADLINE[task] in metrics:
        entry = results_entry(cfg.model_name, task, cfg.split, metrics)
        with atomic_file(results_path) as tmp:
            tmp.write_text(json.dumps(entry, indent=1), encoding="utf-8")
    else:  # e.g. VQA test-dev questions without annotations: predictions only, scored by the server
        logger.warning("%s/%s has no labels: wrote predictions only (%s)", task, cfg.split, pred_path)
        results_path = None
    summary.update({"metrics": metrics, "load_report": report.to_dict(),
                    "results": str(results_path) if results_path else None, "predictions": str(pred_path)})
    with atomic_file(folder / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    save_config(cfg, folder, inputs={"data": cfg.data, "regions": regions_root, "model": cfg.model})
    logger.info("evaluate %s/%s: %s (%s)", task, cfg.split, metrics, report.summary())
    return summary


def folder_of(model: str | Path) -> Path | None:
    from muvla.tasks.heads import resolve_model_folder

    return resolve_model_folder(model)


__all__ = ["TASKS", "EvaluateConfig", "evaluate_examples", "load_task_examples", "retrieval_scores",
           "run_evaluate", "select_retrieval_subset"]
