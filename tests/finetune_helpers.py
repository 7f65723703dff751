"""Shared fixtures-as-functions for the fine-tuning / evaluation tests: a tiny random muvla model
with the real WordPiece tokenizer, and tiny synthetic region stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from muvla.corpus.region_store import ImageRegions
from muvla.corpus.synthetic import write_region_store
from muvla.encoders import default_sbert_path
from muvla.model import Model, ModelConfig
from muvla.utils.device import torch_num_threads as torch_threads  # noqa: F401 (the tests' name for it)

FEATURE_DIM = 16
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(feature_dim: int = FEATURE_DIM) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       max_position_embeddings=64, region_feature_dim=feature_dim, num_region_classes=10,
                       hidden_dropout=0.0, attention_dropout=0.0)


def tiny_model_dir(folder: Path, feature_dim: int = FEATURE_DIM, seed: int = 0) -> Path:
    """A random tiny muvla model folder with the MiniLM (bert-base-uncased) tokenizer files."""
    torch.manual_seed(seed)
    Model(tiny_config(feature_dim)).save_pretrained(folder, tokenizer=default_sbert_path())
    return folder


def write_store(root: Path, images: dict[str, dict], feature_dim: int = FEATURE_DIM, max_regions: int = 4,
                seed: int = 0) -> Path:
    """Region store with one part. images: image_id -> {"boxes": [[x1, y1, x2, y2], ...], "size": (w, h)};
    features are random (but fixed by seed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for image_id, spec in images.items():
        boxes = np.asarray(spec["boxes"], dtype=np.float32).reshape(-1, 4)
        w, h = spec.get("size", (100, 100))
        n = len(boxes)
        rows.append(ImageRegions(image_id=image_id, file=f"{image_id}.jpg", width=w, height=h, boxes=boxes,
                                 tags=["thing"] * n, scores=np.ones(n, np.float32),
                                 class_ids=np.zeros(n, np.int32),
                                 features=rng.normal(size=(n, feature_dim)).astype(np.float16)))
    return write_region_store(root, rows, max_regions=max_regions, images_per_part=max(len(rows), 1))


def grid_boxes(n: int, size: int = 100) -> list[list[float]]:
    """n boxes along the diagonal, the first one the whole image."""
    boxes = [[0.0, 0.0, float(size), float(size)]]
    step = size / max(n - 1, 1)
    for i in range(n - 1):
        boxes.append([i * step, i * step, (i + 1) * step, (i + 1) * step])
    return boxes


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
