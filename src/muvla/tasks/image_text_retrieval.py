"""Image-text retrieval (METHOD.md section 8): recall@1/5/10 both ways through the ITM head.

Captions files, one of (chosen by suffix; each caption must name its image):
- COCO captions JSON (``.json``): ``{"images": [...], "annotations": [{image_id, caption, id}]}``;
- JSON lines (``.jsonl``): ``{"image": <id or file name>, "caption": str}`` per line (optional "id");
- TSV (``.tsv``): ``image<TAB>caption`` per line (an optional header line ``image<TAB>caption``).
A malformed line is recorded in the load report (rejected.jsonl) with its file and line. Image
names are reduced to their file stem and digit stems read as integer ids, so '139',
'000000000139' and 'images/000000000139.jpg' all name COCO image 139 in the region store.

Zero-shot retrieval needs no fine-tuning (the pre-training ITM head scores every pair); fine-tuning
trains the ITM head with BCE on (image, own caption) = 1 and (image, random other caption) = 0.
Every (image, caption) pair of the (optionally subsampled) split is scored, so n images x m
captions cost n*m encoder passes; ``max_images`` caps n for CPU runs. Predictions: top-10 caption
ids per image and top-10 image ids per caption (there is no official format).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from muvla.corpus.captions import normalise_caption, read_captions_file
from muvla.corpus.region_store import RegionStore
from muvla.model import Model, ModelConfig
from muvla.model.modeling import EncoderOutput
from muvla.tasks.batch import DEFAULT_MAX_TEXT_LEN, TaskBatch, TaskItem, get_regions
from muvla.tasks.files import (
    NO_REGIONS,
    HasRegions,
    LoadReport,
    int_or,
    iter_jsonl,
    iter_lines,
    load_each,
    missing_field,
)
from muvla.tasks.metrics import mean_recall_bootstrap, retrieval_recall
from muvla.tasks.model import TaskHead, TaskModel
from muvla.tasks.spec import DataOptions, EvalOptions, Evaluation, ReadOptions, TaskSpec
from muvla.utils.config import ConfigError
from muvla.utils.progress import progress
from muvla.utils.shards import atomic_file

CAPTION_FORMATS = ('COCO captions JSON {"images", "annotations": [{"image_id", "caption"}]} (.json), '
                   'JSON lines {"image": ..., "caption": ...} (.jsonl) or TSV image<TAB>caption (.tsv)')


@dataclass
class CaptionExample:
    image_id: int | str
    caption: str
    caption_id: int = -1


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


def load_coco_captions(path: str | Path, has_regions: HasRegions | None = None
                       ) -> tuple[list[CaptionExample], LoadReport]:
    """COCO captions JSON; captions sorted by (image_id, caption id) for deterministic order.

    Images are named by file stem (``muvla.corpus.captions``); a digit stem is read as the integer
    COCO id (as the other formats do), so predictions name COCO images by their ids.
    """
    path = Path(path)
    report = LoadReport()
    captions = read_captions_file(path)
    examples: list[CaptionExample] = []
    for caption in captions.captions():
        if caption.image_id is None or caption.text is None:
            missing = "image_id" if caption.image_id is None else "caption"
            report.skip(path, caption.index, f"malformed caption: missing field '{missing}'")
            continue
        stem = captions.stem_of(caption.image_id)
        image_id: int | str = int(stem) if stem.isdigit() else stem
        text = normalise_caption(caption.text)
        if not text:
            report.skip(path, caption.index, "empty caption", f"image_id={image_id}")
            continue
        if has_regions is not None and not has_regions(image_id):
            report.skip(path, caption.index, NO_REGIONS, f"image_id={image_id}")
            continue
        caption_id = caption.caption_id if caption.caption_id is not None else caption.index
        examples.append(CaptionExample(image_id, text, caption_id))
    examples.sort(key=lambda e: (str(e.image_id), e.caption_id))
    report.kept = len(examples)
    return examples, report


def _image_key(value: Any) -> int | str | None:
    """Region-store key of an image named by id or file name; None when it names nothing."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        return None
    stem = Path(value.strip()).stem
    return int(stem) if stem.isdigit() else stem


def _add_caption(examples: list[CaptionExample], report: LoadReport, path: Path, lineno: int,
                 image: Any, caption: Any, caption_id: int, has_regions: HasRegions | None) -> None:
    """Append one caption line's example, or record why it is rejected."""
    image_id = _image_key(image)
    if image_id is None:
        report.skip(path, lineno, f"image {image!r} is not an image id or file name")
        return
    if not isinstance(caption, str):
        report.skip(path, lineno, "caption is not a string", f"image={image_id}")
        return
    text = normalise_caption(caption)
    if not text:
        report.skip(path, lineno, "empty caption", f"image={image_id}")
        return
    if has_regions is not None and not has_regions(image_id):
        report.skip(path, lineno, NO_REGIONS, f"image={image_id}")
        return
    examples.append(CaptionExample(image_id, text, caption_id))


def load_caption_lines(path: str | Path, has_regions: HasRegions | None = None
                       ) -> tuple[list[CaptionExample], LoadReport]:
    """JSON lines ``{"image": ..., "caption": ...}`` (optional integer "id"; default: the line number)."""
    path = Path(path)
    report = LoadReport()
    examples: list[CaptionExample] = []
    for lineno, obj in iter_jsonl(path, report):
        bad = missing_field(obj, ("image", "caption"))
        if bad:
            report.skip(path, lineno, bad)
            continue
        _add_caption(examples, report, path, lineno, obj["image"], obj["caption"], int_or(obj.get("id"), lineno),
                     has_regions)
    examples.sort(key=lambda e: (str(e.image_id), e.caption_id))
    report.kept = len(examples)
    return examples, report


def load_caption_tsv(path: str | Path, has_regions: HasRegions | None = None
                     ) -> tuple[list[CaptionExample], LoadReport]:
    """TSV ``image<TAB>caption``; caption ids are line numbers. A row without exactly two fields is
    rejected (a caption with a tab in it is ambiguous, so it is not guessed)."""
    path = Path(path)
    report = LoadReport()
    examples: list[CaptionExample] = []
    first = True
    for lineno, line in iter_lines(path, report):
        fields = line.rstrip("\r\n").split("\t")
        if first and [f.strip().lower() for f in fields] == ["image", "caption"]:
            first = False
            continue  # header
        first = False
        if len(fields) != 2:
            report.skip(path, lineno, f"expected image<TAB>caption, got {len(fields)} field(s)")
            continue
        _add_caption(examples, report, path, lineno, fields[0], fields[1], lineno, has_regions)
    examples.sort(key=lambda e: (str(e.image_id), e.caption_id))
    report.kept = len(examples)
    return examples, report


CAPTION_READERS = {".json": load_coco_captions, ".jsonl": load_caption_lines, ".tsv": load_caption_tsv}


def load_captions(path: str | Path, has_regions: HasRegions | None = None
                  ) -> tuple[list[CaptionExample], LoadReport]:
    """Any supported captions file, by suffix; an unknown suffix is one clear line naming the formats."""
    reader = CAPTION_READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise ConfigError(f"captions file {path}: unknown format; expected {CAPTION_FORMATS}")
    return reader(path, has_regions)


def caption_index(examples: Sequence[CaptionExample]) -> tuple[list[int | str], list[int]]:
    """(image ids in first-seen order, text_to_image row per caption) for ``retrieval_recall``."""
    rows: dict[int | str, int] = {}
    text_to_image = []
    for ex in examples:
        text_to_image.append(rows.setdefault(ex.image_id, len(rows)))
    return list(rows), text_to_image


def read_captions(files: Sequence[Path], options: ReadOptions) -> tuple[list[CaptionExample], LoadReport]:
    """The spec's reader: one or more captions files."""
    return load_each(load_captions(f, options.has_regions) for f in files)


# --------------------------------------------------------------------------------------------
# fine-tuning: dataset and head
# --------------------------------------------------------------------------------------------


class RetrievalTrainDataset(Dataset):
    """Caption i -> rows (its image, caption i) = 1 then n_negatives x (its image, a caption of another
    image) = 0. Negatives are random (drawn from the RNG the trainer seeds per batch, so resumable)."""

    def __init__(self, captions: Sequence[CaptionExample], store: RegionStore, n_negatives: int = 1) -> None:
        self.captions = list(captions)
        self.store = store
        self.n_negatives = n_negatives
        if n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
        if len({str(c.image_id) for c in self.captions}) < 2:
            raise ValueError("retrieval fine-tuning needs captions of at least two images (for negatives)")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> TaskItem:
        ex = self.captions[i]
        regions = get_regions(self.store, ex.image_id)
        texts = [ex.caption]
        while len(texts) < 1 + self.n_negatives:
            other = self.captions[random.randrange(len(self.captions))]
            if str(other.image_id) != str(ex.image_id):
                texts.append(other.caption)
        target = torch.zeros(1 + self.n_negatives, dtype=torch.float32)
        target[0] = 1.0
        return TaskItem(texts, [regions] * len(texts), target, ex.caption_id)


def retrieval_dataset(captions: Sequence[CaptionExample], store: RegionStore,
                      options: DataOptions) -> RetrievalTrainDataset:
    return RetrievalTrainDataset(captions, store, options.n_negatives)


class RetrievalHead(TaskHead):
    """The pre-training ITM head (one logit = match) on pooled, reused as is: no weights of its own.
    BCE on positives / negatives; predictions are the ITM logits (higher = better match)."""

    def __init__(self, config: ModelConfig, n_answers: int, dropout: float) -> None:
        super().__init__()
        self.n_outputs = 1

    def logits(self, out: EncoderOutput, batch: TaskBatch, encoder: Model) -> torch.Tensor:
        return encoder.itm_head(out.pooled)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def train_logs(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"train_acc": ((logits > 0).float() == targets).float().mean()}

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()


# --------------------------------------------------------------------------------------------
# scoring, evaluation, outputs
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
                     *, batch_size: int = 64, max_text_len: int = DEFAULT_MAX_TEXT_LEN, device: torch.device | None = None,
                     label: str = "") -> tuple[np.ndarray, list[Any], list[int]]:
    """ITM logit of every (image, caption) pair: (scores [n_images, n_captions], image ids,
    text_to_image). Captions are tokenized once; each image's regions are repeated per caption chunk."""
    if not isinstance(model.head, RetrievalHead):
        raise ValueError(f"retrieval scoring needs the ITM head (task 'retrieval'), model task is {model.task!r}")
    device = device or next(model.parameters()).device
    model.eval()
    image_ids, text_to_image = caption_index(captions)
    enc = tokenizer([c.caption for c in captions], padding="longest", truncation=True, max_length=max_text_len,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    scores = np.zeros((len(image_ids), len(captions)), dtype=np.float32)
    desc = "score image-caption pairs" + (f" [{label}]" if label else "")
    for row in progress(range(len(image_ids)), desc=desc, total=len(image_ids), unit="img"):
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


@dataclass
class RetrievalPredictions:
    """The scored subset: ITM logits [n_images, n_captions], the image ids (rows) and captions (columns)."""

    scores: np.ndarray
    image_ids: list[Any]
    captions: list[CaptionExample]


def evaluate_retrieval(model: TaskModel, captions: Sequence[CaptionExample], report: LoadReport,
                       options: EvalOptions) -> Evaluation:
    """Recall@1/5/10 both ways over the first ``max_images`` images (and their captions)."""
    subset = select_retrieval_subset(captions, options.max_images, options.max_captions_per_image)
    scores, image_ids, t2i = retrieval_scores(model, subset, options.store, options.tokenizer,
                                              batch_size=options.batch_size, max_text_len=options.max_text_len,
                                              device=options.device, label=options.label)
    metrics: dict[str, Any] = retrieval_recall(scores, t2i)
    low, high = np.percentile(mean_recall_bootstrap(scores, t2i), [2.5, 97.5])
    metrics.update({"mean_recall_ci_low": float(low), "mean_recall_ci_high": float(high),
                    "n_images": len(image_ids), "n_captions": len(subset), "zero_shot": options.zero_shot})
    return Evaluation(metrics, RetrievalPredictions(scores, image_ids, subset))


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


def write_predictions(path: Path, predictions: RetrievalPredictions) -> Path:
    """The spec's writer."""
    return write_retrieval_predictions(path, predictions.scores, predictions.image_ids, predictions.captions)


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


def write_extra_outputs(evaluation: Evaluation, folder: Path, stem: str, model_name: str) -> dict[str, str]:
    """What ``muvla evaluate`` adds: the score matrix (scores_<stem>.npy [n_images, n_captions]), the
    caption -> image row map (text_to_image_<stem>.npy, so two models' scores can be compared with a
    paired bootstrap) and the recall figure."""
    preds: RetrievalPredictions = evaluation.predictions
    np.save(folder / f"scores_{stem}.npy", preds.scores)
    np.save(folder / f"text_to_image_{stem}.npy", np.asarray(caption_index(preds.captions)[1], dtype=np.int64))
    kind = "zero-shot (ITM head)" if evaluation.metrics["zero_shot"] else "fine-tuned"
    title = f"{model_name} {kind}: {len(preds.image_ids)} images x {len(preds.captions)} captions"
    return {"figure": str(plot_retrieval_recall(evaluation.metrics, folder / "retrieval_recall.png", title))}


RETRIEVAL = TaskSpec(
    name="retrieval", display="Retrieval mR", headline="mean_recall",
    files=f"a captions file (captions or data): {CAPTION_FORMATS}", read=read_captions,
    dataset=retrieval_dataset, head=RetrievalHead, evaluate=evaluate_retrieval,
    write_predictions=write_predictions, prediction_suffix=".json",
    zero_shot=True, regions_from_images=True, extra_outputs=write_extra_outputs,
)
