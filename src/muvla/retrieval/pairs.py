"""Pairings other than retrieval, for the paper's baselines (METHOD §7).

Each writes a folder in the retrieval stage's format (``topk.parquet``: image_id, rank, sentence_id,
score), so the phrases stage and the pre-training code need no special case for a baseline:

- ``random``: every image gets K random sentences (the *joint unaligned* baseline);
- ``aligned``: every image gets its own ground-truth captions (the supervised upper bound);
- ``aligned_ratio``: a fraction ``p`` of the images get their captions, the rest random sentences
  (the alignment-ratio analysis).

Ground-truth captions come from a COCO captions JSON and must be in the sentence store (build it with
``muvla text --corpus captions.json ...``); they are found by their normalised text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muvla.utils.config import ConfigError, save_config
from muvla.utils.shards import atomic_file

PAIRING_MODES = ("random", "aligned", "aligned_ratio")


@dataclass
class PairsConfig:
    out: Path
    regions: Path
    text: Path
    mode: str = "random"
    captions: Path | None = None  # COCO captions JSON (aligned, aligned_ratio)
    p: float = 1.0  # aligned_ratio: fraction of images paired with their own captions
    k: int = 5
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in PAIRING_MODES:
            raise ConfigError(f"pairs: mode must be one of {PAIRING_MODES}, got {self.mode!r}")
        if self.mode != "random" and self.captions is None:
            raise ConfigError(f"pairs: mode {self.mode!r} needs --captions (a COCO captions JSON)")
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"pairs: p must be in [0, 1], got {self.p}")
        if self.k < 1:
            raise ConfigError(f"pairs: k must be >= 1, got {self.k}")


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def caption_sentence_ids(captions_json: Path, text_dir: Path) -> dict[str, list[int]]:
    """image id (file stem, as in the region store) -> sentence ids of its captions."""
    table = pq.read_table(Path(text_dir) / "sentences.parquet", columns=["sentence_id", "text"]).to_pydict()
    by_text = {_normalise(t): int(s) for s, t in zip(table["sentence_id"], table["text"])}
    data = json.loads(Path(captions_json).read_text(encoding="utf-8"))
    stems = {img["id"]: Path(img["file_name"]).stem for img in data.get("images", [])}
    out: dict[str, list[int]] = {}
    for ann in data.get("annotations", []):
        sid = by_text.get(_normalise(ann["caption"]))
        image = stems.get(ann["image_id"], str(ann["image_id"]))
        if sid is not None and sid not in out.setdefault(image, []):
            out[image].append(sid)
    return out


def run_pairs(cfg: PairsConfig) -> dict:
    cfg.validate()
    image_ids = pq.read_table(Path(cfg.regions) / "index.parquet", columns=["image_id"]).column("image_id").to_pylist()
    n_sentences = pq.read_metadata(Path(cfg.text) / "sentences.parquet").num_rows
    if n_sentences == 0:
        raise ConfigError(f"pairs: {cfg.text} holds no sentences")
    own = caption_sentence_ids(cfg.captions, cfg.text) if cfg.captions is not None else {}
    rng = np.random.default_rng(cfg.seed)
    aligned_images = set()
    if cfg.mode == "aligned":
        aligned_images = set(image_ids)
    elif cfg.mode == "aligned_ratio":
        n_aligned = int(round(cfg.p * len(image_ids)))
        aligned_images = {image_ids[i] for i in rng.permutation(len(image_ids))[:n_aligned]}

    rows: dict[str, list] = {"image_id": [], "rank": [], "sentence_id": [], "score": []}
    no_caption: list[str] = []
    for image in image_ids:
        if image in aligned_images:
            chosen = own.get(image, [])[: cfg.k]
            if not chosen:
                no_caption.append(image)
                continue
        else:
            chosen = rng.choice(n_sentences, size=min(cfg.k, n_sentences), replace=False).tolist()
        for rank, sid in enumerate(chosen):
            rows["image_id"].append(image)
            rows["rank"].append(rank)
            rows["sentence_id"].append(int(sid))
            rows["score"].append(float("nan"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, inputs={"regions": cfg.regions, "text": cfg.text, "captions": cfg.captions})
    with atomic_file(out / "topk.parquet") as tmp:
        pq.write_table(pa.table({"image_id": pa.array(rows["image_id"], pa.string()),
                                 "rank": pa.array(rows["rank"], pa.int32()),
                                 "sentence_id": pa.array(rows["sentence_id"], pa.int64()),
                                 "score": pa.array(rows["score"], pa.float32())}), tmp)
    summary = {"stage": "pairs", "mode": cfg.mode, "p": cfg.p, "images": len(image_ids),
               "aligned_images": len(aligned_images) - len(no_caption),
               "images_without_caption_skipped": len(no_caption), "examples": no_caption[:20],
               "pairs": len(rows["image_id"])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
