"""Any HuggingFace detector as a region backend: closed-set (DETR, Conditional/Deformable DETR, RT-DETR,
YOLOS, ... through ``AutoModelForObjectDetection``) or zero-shot with a vocabulary (OWL-ViT, OWLv2,
Grounding DINO through ``AutoModelForZeroShotObjectDetection``).

The model is a local folder (``save_pretrained``) or a hub name (downloaded by transformers when the
machine is online). Zero-shot detectors query a vocabulary file, one class name per line; the
default is a Visual-Genome-size object list (``muvla/data/vg_objects.txt``), closer to the paper's
VinVL tags than COCO's 80. Large vocabularies are sent in chunks (Grounding DINO reads at most 256
text tokens); OWL scores every class independently, so chunking does not change its scores.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from muvla.regions.backends import CropFeaturizer
from muvla.regions.object_regions import Detections, ObjectDetectorBackend, RegionSelection
from muvla.regions.weights import WeightsError
from muvla.utils.device import pick_device

ZERO_SHOT_TYPES = ("owlvit", "owlv2", "grounding-dino", "mm-grounding-dino")
GROUNDING_TYPES = ("grounding-dino", "mm-grounding-dino")
GROUNDING_MAX_TOKENS = 250  # of the model's 256, leaving room for [CLS]/[SEP]


def default_vocabulary_path() -> Path:
    return Path(str(resources.files("muvla") / "data" / "vg_objects.txt"))


def read_vocabulary(path: Path | None) -> list[str]:
    """Class names, one per line ('#' comments and blank lines skipped, duplicates dropped)."""
    path = default_vocabulary_path() if path is None else Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"vocabulary file {path} cannot be read: {err.strerror or err}") from err
    names = list(dict.fromkeys(" ".join(line.split()) for line in lines
                               if line.strip() and not line.lstrip().startswith("#")))
    if not names:
        raise ValueError(f"vocabulary file {path} has no class names (one per line)")
    return names


class HFDetector:
    """A transformers detector: RGB images -> Detections (image pixels), scores >= ``min_score``."""

    def __init__(self, model: str, vocabulary: list[str] | None = None, device: str = "auto",
                 min_score: float = 0.1, chunk_size: int = 100):
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForObjectDetection,
            AutoModelForZeroShotObjectDetection,
            AutoProcessor,
        )

        self.device = pick_device(device)
        self.min_score = min_score
        self.chunk_size = chunk_size
        try:
            config = AutoConfig.from_pretrained(model)
            self.model_type = str(config.model_type)
            self.zero_shot = self.model_type in ZERO_SHOT_TYPES
            if self.zero_shot:
                self.processor = AutoProcessor.from_pretrained(model)
                net = AutoModelForZeroShotObjectDetection.from_pretrained(model)
            else:
                self.processor = AutoImageProcessor.from_pretrained(model)
                net = AutoModelForObjectDetection.from_pretrained(model)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsError(f"cannot load detector {model!r} ({first}); pass a folder written by "
                               "save_pretrained, or a hub name on a machine with network access") from err
        self.model = net.to(self.device).eval()
        if self.zero_shot:
            self.classes = list(vocabulary) if vocabulary is not None else read_vocabulary(None)
        else:
            if vocabulary is not None:
                raise ValueError(f"detector {model!r} ({self.model_type}) has fixed classes; a vocabulary "
                                 "only applies to zero-shot detectors (OWL-ViT, OWLv2, Grounding DINO)")
            id2label = {int(k): str(v) for k, v in config.id2label.items()}
            self.classes = [id2label.get(i, f"class {i}") for i in range(max(id2label) + 1)]

    def chunks(self) -> list[tuple[int, list[str]]]:
        """(offset, class names) per forward pass over the vocabulary."""
        if self.model_type not in GROUNDING_TYPES:
            return [(s, self.classes[s:s + self.chunk_size]) for s in range(0, len(self.classes), self.chunk_size)]
        tokenizer = self.processor.tokenizer
        out, start, budget = [], 0, 0
        for i, name in enumerate(self.classes):
            cost = len(tokenizer.tokenize(name)) + 1  # the name and its " ." separator
            if i > start and budget + cost > GROUNDING_MAX_TOKENS:
                out.append((start, self.classes[start:i]))
                start, budget = i, 0
            budget += cost
        out.append((start, self.classes[start:]))
        return out

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        if not images:
            return []
        pil = [Image.fromarray(np.ascontiguousarray(image)) for image in images]
        sizes = [(image.shape[0], image.shape[1]) for image in images]
        if not self.zero_shot:
            inputs = self.processor(images=pil, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            results = self.processor.post_process_object_detection(outputs, threshold=self.min_score,
                                                                   target_sizes=sizes)
            return [_to_detections(r["boxes"], r["scores"], r["labels"]) for r in results]
        parts: list[list[Detections]] = []
        for offset, names in self.chunks():
            if self.model_type in GROUNDING_TYPES:
                found = self._grounding(pil, sizes, names)
            else:
                max_len = int(self.model.config.text_config.max_position_embeddings)
                inputs = self.processor(text=[names] * len(pil), images=pil, return_tensors="pt", padding="max_length",
                                        truncation=True, max_length=max_len).to(self.device)
                outputs = self.model(**inputs)
                results = self.processor.post_process_grounded_object_detection(
                    outputs, threshold=self.min_score, target_sizes=sizes)
                found = [_to_detections(r["boxes"], r["scores"], r["labels"]) for r in results]
            parts.append([Detections(d.boxes, d.scores, d.class_ids + offset) for d in found])
        return [Detections(np.concatenate([p[i].boxes for p in parts]), np.concatenate([p[i].scores for p in parts]),
                           np.concatenate([p[i].class_ids for p in parts])) for i in range(len(pil))]

    def _grounding(self, pil: list[Image.Image], sizes: list[tuple[int, int]], names: list[str]) -> list[Detections]:
        """Grounding DINO: a class's score is the highest token probability within its phrase of the prompt."""
        prompt = " . ".join(n.lower() for n in names) + " ."
        inputs = self.processor(images=pil, text=[prompt] * len(pil), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        offsets = self.processor.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        spans, pos = [], 0
        for name in names:
            start = prompt.index(name.lower(), pos)
            end = start + len(name)
            spans.append([t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end])
            pos = end
        probs = outputs.logits.sigmoid()  # [B, queries, text tokens]
        per_class = torch.stack([probs[..., toks].amax(dim=-1) if toks else torch.zeros_like(probs[..., 0])
                                 for toks in spans], dim=-1)
        scores, labels = per_class.max(dim=-1)
        cx, cy, w, h = outputs.pred_boxes.unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        out = []
        for i, (height, width) in enumerate(sizes):
            keep = scores[i] >= self.min_score
            scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
            out.append(_to_detections(boxes[i][keep] * scale, scores[i][keep], labels[i][keep]))
        return out


def _to_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Detections:
    return Detections(boxes.detach().float().cpu().numpy().reshape(-1, 4),
                      scores.detach().float().cpu().numpy().reshape(-1),
                      labels.detach().cpu().numpy().astype(np.int64).reshape(-1))


class HFDetectorBackend(ObjectDetectorBackend):
    """Regions from a transformers detector: whole image + detections, Lite0 crop features, caption-word tags."""

    name = "transformers"

    def __init__(self, images: Path, featurizer: CropFeaturizer, selection: RegionSelection, model: str,
                 vocabulary: Path | None = None, device: str = "auto", tag_words: dict[str, str] | None = None,
                 batch_images: int = 4):
        super().__init__(images, featurizer, selection, tag_words, batch_images)
        from transformers import AutoConfig

        try:
            zero_shot = AutoConfig.from_pretrained(model).model_type in ZERO_SHOT_TYPES
        except (OSError, ValueError, KeyError) as err:
            raise WeightsError(f"cannot load detector {model!r} ({str(err).strip().splitlines()[0]}); pass a "
                               "folder written by save_pretrained, or a hub name on a machine with network "
                               "access") from err
        names = read_vocabulary(vocabulary) if zero_shot or vocabulary is not None else None
        self.detector = HFDetector(model, names, device=device, min_score=selection.min_score)
        self.detector_classes = list(self.detector.classes)

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        return self.detector(images)
