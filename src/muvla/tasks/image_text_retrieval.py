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
A single-stream model needs one encoder pass per (image, caption) pair, so n images x m captions
cost n*m passes (``max_images`` caps n). Scoring prepares each caption's tokens and each image's
region embeddings once, batches pairs by sequence length (no padding, no attention mask) and runs
under ``torch.inference_mode`` at the evaluation's precision. ``rerank_k`` > 0 scores two-stage, as
ALBEF and BLIP evaluate: the Sentence-BERT cosine between an image's tag query (the retrieval
stage's query) and a caption ranks every pair, and the ITM head re-scores only the top k captions
per image and the top k images per caption. Predictions: top-10 caption ids per image and top-10
image ids per caption (there is no official format).
"""

from __future__ import annotations

import json
import random
import time
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
from muvla.retrieval.queries import make_query
from muvla.retrieval.rerank import read_tagged_images
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
from muvla.tasks.spec import DEFAULT_RERANK_QUERY, DataOptions, EvalOptions, Evaluation, ReadOptions, TaskSpec
from muvla.utils.config import ConfigError
from muvla.utils.device import autocast
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


EXHAUSTIVE_BLOCK_PAIRS = 32768  # pairs per block of images in exhaustive scoring (enough rows per length)
# Two-stage: a pair the ITM head did not re-score gets (lowest re-scored logit - BELOW_RERANKED + its
# first-stage cosine): below every re-scored pair, still in first-stage order among themselves.
BELOW_RERANKED = 3.0


def _check_itm(model: TaskModel) -> None:
    if not isinstance(model.head, RetrievalHead):
        raise ValueError(f"retrieval scoring needs the ITM head (task 'retrieval'), model task is {model.task!r}")


@dataclass
class ScoringInputs:
    """What every pair reuses, prepared once: each caption's token ids and each image's region
    embeddings (the region projection runs once per image, not once per pair)."""

    token_ids: torch.Tensor  # [m, L_max] int64: [CLS] caption [SEP], then padding
    text_lengths: np.ndarray  # [m] real tokens per caption
    region_embeddings: torch.Tensor  # [n, R_max, H] float32, zero after each image's own regions
    region_counts: np.ndarray  # [n] regions per image
    image_keys: list[str]  # each image's id in the region store


@torch.inference_mode()
def prepare_scoring(model: TaskModel, captions: Sequence[CaptionExample], image_ids: Sequence[Any],
                    store: RegionStore, tokenizer: Any, *, max_text_len: int, device: torch.device,
                    precision: str = "fp32") -> ScoringInputs:
    """Tokenize every caption and embed every image's regions once (under ``precision``'s autocast)."""
    enc = tokenizer([c.caption for c in captions], padding="longest", truncation=True, max_length=max_text_len,
                    return_tensors="pt")
    lengths = enc["attention_mask"].sum(1).numpy().astype(np.int64)
    regions = [get_regions(store, image_id) for image_id in image_ids]
    counts = np.array([r.num_regions for r in regions], dtype=np.int64)
    embeddings = model.encoder.encoder.embeddings
    out = torch.zeros(len(regions), int(counts.max()), model.encoder.config.hidden_size, device=device)
    with autocast(precision, device):
        for row, r in enumerate(regions):
            feats = torch.from_numpy(np.asarray(r.features, dtype=np.float32))[None].to(device)
            pos = torch.from_numpy(r.position_features())[None].to(device)
            out[row, :counts[row]] = embeddings.regions(feats, pos)[0].float()
    return ScoringInputs(enc["input_ids"].to(device), lengths, out, counts, [str(r.image_id) for r in regions])


def _length_batches(sorted_lengths: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) batches over sorted sequence lengths: at most ``batch_size``, one length each."""
    bounds = [0, *(np.flatnonzero(np.diff(sorted_lengths)) + 1).tolist(), len(sorted_lengths)]
    return [(s, min(b, s + batch_size)) for a, b in zip(bounds[:-1], bounds[1:]) for s in range(a, b, batch_size)]


def _embed_pairs(model: TaskModel, inputs: ScoringInputs, rows: np.ndarray, cols: np.ndarray,
                 text_lengths: np.ndarray, total: int) -> torch.Tensor:
    """[b, total, H]: each pair's ``[CLS] caption [SEP]`` embeddings, then its image's regions.
    Pairs come sorted by text length, so concatenating the length groups keeps their order."""
    embeddings = model.encoder.encoder.embeddings
    device = inputs.region_embeddings.device
    parts = []
    for length in np.unique(text_lengths):
        chosen = text_lengths == length
        ids = inputs.token_ids[torch.from_numpy(cols[chosen]).to(device), :length]
        text = embeddings.text(ids, None, None, None)
        regions = inputs.region_embeddings[torch.from_numpy(rows[chosen]).to(device), :total - int(length)]
        parts.append(torch.cat([text, regions.to(text.dtype)], 1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.inference_mode()
def score_pairs(model: TaskModel, inputs: ScoringInputs, rows: np.ndarray, cols: np.ndarray, *,
                batch_size: int = 64, precision: str = "fp32", desc: str | None = None) -> np.ndarray:
    """ITM logit [P] float32 of each pair (image ``rows[p]``, caption ``cols[p]``).

    Pairs are batched by sequence length (caption tokens + regions), so a batch needs neither padding
    nor an attention mask; the last layer runs for [CLS] only (``Encoder.pooled_from_embeddings``).
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    text_lengths = inputs.text_lengths[cols]
    total = text_lengths + inputs.region_counts[rows]
    order = np.lexsort((cols, rows, text_lengths, total))
    batches = _length_batches(total[order], batch_size)
    scores = np.empty(len(rows), dtype=np.float32)
    encoder = model.encoder.encoder
    device = inputs.region_embeddings.device
    with autocast(precision, device):
        # a named bar of its own only when called alone (exhaustive scoring shows one bar over its blocks)
        steps = progress(batches, desc=desc, total=len(batches), unit="batch") if desc is not None else batches
        for start, stop in steps:
            idx = order[start:stop]
            x = _embed_pairs(model, inputs, rows[idx], cols[idx], text_lengths[idx], int(total[idx[0]]))
            scores[idx] = model.encoder.itm_head(encoder.pooled_from_embeddings(x)).float().cpu().numpy()
    return scores


def exhaustive_scores(model: TaskModel, inputs: ScoringInputs, *, batch_size: int = 64, precision: str = "fp32",
                      label: str = "") -> np.ndarray:
    """ITM logit of every (image, caption) pair: [n_images, n_captions] float32, in blocks of images."""
    n, m = len(inputs.region_counts), len(inputs.text_lengths)
    scores = np.empty((n, m), dtype=np.float32)
    block = max(1, EXHAUSTIVE_BLOCK_PAIRS // m)
    desc = "score image-caption pairs" + (f" [{label}]" if label else "")
    for start in progress(range(0, n, block), desc=desc, total=(n + block - 1) // block, unit="block"):
        stop = min(n, start + block)
        rows = np.repeat(np.arange(start, stop), m)
        cols = np.tile(np.arange(m), stop - start)
        scores[start:stop] = score_pairs(model, inputs, rows, cols, batch_size=batch_size,
                                         precision=precision).reshape(stop - start, m)
    return scores


def first_stage_similarity(store: RegionStore, image_keys: Sequence[str], captions: Sequence[CaptionExample],
                           query_mode: str = DEFAULT_RERANK_QUERY, device: str = "cpu") -> np.ndarray:
    """Sentence-BERT cosine [n_images, n_captions] between each image's tag query (built as the
    retrieval stage builds it) and each caption; 0 for an image without a usable tag."""
    from muvla.encoders import encode

    tagged = {t.image_id: t for t in read_tagged_images(store.root)}
    queries = [make_query(tagged[key].tags, query_mode, tagged[key].areas) for key in image_keys]
    unique = list(dict.fromkeys(q for q in queries if q))
    query_rows = {q: i for i, q in enumerate(unique)}
    query_emb = encode(unique, device=device)
    caption_emb = encode([c.caption for c in captions], device=device)
    per_image = np.zeros((len(queries), caption_emb.shape[1]), dtype=np.float32)
    for i, q in enumerate(queries):
        if q:
            per_image[i] = query_emb[query_rows[q]]
    return per_image @ caption_emb.T


def _top_k(similarity: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """[a, min(k, b)] column indices of each row's k highest values (any order), in row chunks."""
    k = min(k, similarity.shape[1])
    if k == similarity.shape[1]:
        return np.tile(np.arange(k), (similarity.shape[0], 1))
    return np.concatenate([np.argpartition(-similarity[s:s + chunk], k - 1, axis=1)[:, :k]
                           for s in range(0, similarity.shape[0], chunk)])


def first_stage_pairs(similarity: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (row * n_captions + column) of the pairs each direction re-scores: the top k
    captions of every image (image->text) and the top k images of every caption (text->image)."""
    n, m = similarity.shape
    top_captions = _top_k(similarity, k, chunk)
    image_to_text = (np.arange(n)[:, None] * m + top_captions).ravel()
    top_images = np.concatenate([_top_k(np.ascontiguousarray(similarity[:, s:s + chunk].T), k)
                                 for s in range(0, m, chunk)])  # [m, k]
    text_to_image = (top_images * m + np.arange(m)[:, None]).ravel()
    return np.sort(image_to_text), np.sort(text_to_image)


def two_stage_scores(model: TaskModel, inputs: ScoringInputs, similarity: np.ndarray, k: int, *,
                     batch_size: int = 64, precision: str = "fp32", label: str = ""
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """(image->text matrix, text->image matrix, pairs scored), both [n_images, n_captions].

    The ITM head re-scores the first stage's top k captions per image and top k images per caption
    (each pair once). In each direction's matrix a pair outside its top k gets a score below every
    re-scored pair (``BELOW_RERANKED``), keeping first-stage order among those.
    """
    if k < 1:
        raise ValueError(f"two-stage retrieval needs k >= 1, got {k}")
    similarity = np.asarray(similarity, dtype=np.float32)
    m = similarity.shape[1]
    image_to_text, text_to_image = first_stage_pairs(similarity, k)
    pairs = np.union1d(image_to_text, text_to_image)
    desc = f"re-score top {k} pairs" + (f" [{label}]" if label else "")
    logits = score_pairs(model, inputs, pairs // m, pairs % m, batch_size=batch_size, precision=precision,
                         desc=desc)
    floor = np.float32(float(logits.min()) - BELOW_RERANKED)
    matrices = []
    for chosen in (image_to_text, text_to_image):
        matrix = similarity + floor
        matrix.flat[chosen] = logits[np.searchsorted(pairs, chosen)]
        matrices.append(matrix)
    return matrices[0], matrices[1], len(pairs)


def retrieval_scores(model: TaskModel, captions: Sequence[CaptionExample], store: RegionStore, tokenizer: Any,
                     *, batch_size: int = 64, max_text_len: int = DEFAULT_MAX_TEXT_LEN, device: torch.device | None = None,
                     label: str = "", precision: str = "fp32") -> tuple[np.ndarray, list[Any], list[int]]:
    """ITM logit of every (image, caption) pair: (scores [n_images, n_captions], image ids,
    text_to_image), through the exhaustive fast path."""
    _check_itm(model)
    device = device or next(model.parameters()).device
    model.eval()
    image_ids, text_to_image = caption_index(captions)
    inputs = prepare_scoring(model, captions, image_ids, store, tokenizer, max_text_len=max_text_len, device=device,
                             precision=precision)
    scores = exhaustive_scores(model, inputs, batch_size=batch_size, precision=precision, label=label)
    return scores, image_ids, text_to_image


@torch.no_grad()
def reference_retrieval_scores(model: TaskModel, captions: Sequence[CaptionExample], store: RegionStore,
                               tokenizer: Any, *, batch_size: int = 64, max_text_len: int = DEFAULT_MAX_TEXT_LEN,
                               device: torch.device | None = None) -> tuple[np.ndarray, list[Any], list[int]]:
    """The scoring path before ``retrieval_scores``, kept as the reference the tests and
    ``benchmarks/bench_retrieval_eval.py`` compare with: one full forward per pair, every caption
    padded to the longest, the region projection recomputed for every pair."""
    _check_itm(model)
    device = device or next(model.parameters()).device
    model.eval()
    image_ids, text_to_image = caption_index(captions)
    enc = tokenizer([c.caption for c in captions], padding="longest", truncation=True, max_length=max_text_len,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    scores = np.zeros((len(image_ids), len(captions)), dtype=np.float32)
    for row in range(len(image_ids)):
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
    """The scored subset: ITM logits [n_images, n_captions], the image ids (rows) and captions
    (columns); with two-stage retrieval ``scores`` ranks image->text and ``text_scores`` text->image."""

    scores: np.ndarray
    image_ids: list[Any]
    captions: list[CaptionExample]
    text_scores: np.ndarray | None = None

    @property
    def t2i_scores(self) -> np.ndarray:
        """The matrix text->image rankings come from."""
        return self.scores if self.text_scores is None else self.text_scores


def evaluate_retrieval(model: TaskModel, captions: Sequence[CaptionExample], report: LoadReport,
                       options: EvalOptions) -> Evaluation:
    """Recall@1/5/10 both ways over the first ``max_images`` images (and their captions): every pair
    scored (``rerank_k`` 0) or the first stage's top ``rerank_k`` each way re-scored."""
    _check_itm(model)
    model.eval()
    started = time.perf_counter()
    subset = select_retrieval_subset(captions, options.max_images, options.max_captions_per_image)
    image_ids, t2i = caption_index(subset)
    inputs = prepare_scoring(model, subset, image_ids, options.store, options.tokenizer,
                             max_text_len=options.max_text_len, device=options.device, precision=options.precision)
    info: dict[str, Any] = {"precision": options.precision, "rerank_k": options.rerank_k}
    text_scores = None
    if options.rerank_k == 0:
        scores = exhaustive_scores(model, inputs, batch_size=options.batch_size, precision=options.precision,
                                   label=options.label)
        info["pairs_scored"] = scores.size
    else:
        first = time.perf_counter()
        similarity = first_stage_similarity(options.store, inputs.image_keys, subset, options.rerank_query,
                                            "cuda" if options.device.type == "cuda" else "cpu")
        info.update(rerank_query=options.rerank_query, first_stage_s=round(time.perf_counter() - first, 3))
        scores, text_scores, info["pairs_scored"] = two_stage_scores(
            model, inputs, similarity, options.rerank_k, batch_size=options.batch_size, precision=options.precision,
            label=options.label)
    info["scoring_s"] = round(time.perf_counter() - started, 3)
    metrics: dict[str, Any] = retrieval_recall(scores, t2i, text_scores=text_scores)
    low, high = np.percentile(mean_recall_bootstrap(scores, t2i, text_scores=text_scores), [2.5, 97.5])
    metrics.update({"mean_recall_ci_low": float(low), "mean_recall_ci_high": float(high),
                    "n_images": len(image_ids), "n_captions": len(subset), "zero_shot": options.zero_shot})
    return Evaluation(metrics, RetrievalPredictions(scores, image_ids, subset, text_scores), info)


def write_retrieval_predictions(path: Path, scores: np.ndarray, image_ids: Sequence[Any],
                                captions: Sequence[CaptionExample], k: int = 10,
                                text_scores: np.ndarray | None = None) -> Path:
    """Top-k caption ids per image and top-k image ids per caption (there is no official format);
    the latter from ``text_scores`` when given (two-stage retrieval ranks each way in its own matrix)."""
    k_t = min(k, scores.shape[1])
    k_i = min(k, scores.shape[0])
    i2t = np.argsort(-scores, axis=1, kind="stable")[:, :k_t]
    t2i = np.argsort(-(scores if text_scores is None else text_scores), axis=0, kind="stable")[:k_i].T
    rows = {"image_to_text": [{"image_id": image_ids[i], "caption_ids": [captions[j].caption_id for j in i2t[i]]}
                              for i in range(len(image_ids))],
            "text_to_image": [{"caption_id": captions[j].caption_id, "image_ids": [image_ids[i] for i in t2i[j]]}
                              for j in range(len(captions))]}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_predictions(path: Path, predictions: RetrievalPredictions) -> Path:
    """The spec's writer."""
    return write_retrieval_predictions(path, predictions.scores, predictions.image_ids, predictions.captions,
                                       text_scores=predictions.text_scores)


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
    """What ``muvla evaluate`` adds: the score matrix (scores_<stem>.npy [n_images, n_captions]; with
    two-stage retrieval the image->text one, and scores_t2i_<stem>.npy the text->image one), the
    caption -> image row map (text_to_image_<stem>.npy, so two models' scores can be compared with a
    paired bootstrap) and the recall figure."""
    preds: RetrievalPredictions = evaluation.predictions
    np.save(folder / f"scores_{stem}.npy", preds.scores)
    if preds.text_scores is not None:
        np.save(folder / f"scores_t2i_{stem}.npy", preds.text_scores)
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
