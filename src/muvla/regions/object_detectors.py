"""Construction of the real-detector backends from the regions config, and the ``auto`` choice.

``auto`` = the offline COCO detector (``centernet``) when its verified weights are in the cache,
else the ImageNet-classifier fallback (``proposals``) with one warning line saying how to get them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from muvla.regions.backends import CropFeaturizer
from muvla.regions.object_regions import ObjectDetectorBackend, RegionSelection
from muvla.regions.tags import load_tag_words
from muvla.regions.weights import FETCH_HINT, WeightsError, find_centernet, model_dir
from muvla.utils.config import ConfigError

logger = logging.getLogger(__name__)


def resolve_auto_backend() -> str:
    """"centernet" when verified weights are cached, else "proposals" after one warning line."""
    if find_centernet() is not None:
        return "centernet"
    folder = model_dir()
    state = "corrupt" if folder.exists() else "not found"
    logger.warning(f"COCO detector weights {state} in {folder}: using the ImageNet-classifier fallback "
                   f"(backend 'proposals'); to get the real detector {FETCH_HINT}")
    return "proposals"


class DetectorSettings(Protocol):
    """The regions settings these backends read (a Protocol: the stage imports this module, not the reverse)."""

    backend: str
    images: Path | None
    max_regions: int
    nms_iou: float
    min_score: float
    detector_weights: Path | None
    detector_model: str | None
    vocabulary: Path | None
    tag_words: Path | None
    detector_batch_size: int
    device: str


def build_detector_backend(cfg: DetectorSettings, featurizer: CropFeaturizer) -> ObjectDetectorBackend:
    """The ``centernet`` or ``transformers`` backend; a bad weight file or model is one ConfigError line."""
    selection = RegionSelection(min_score=cfg.min_score, max_regions=cfg.max_regions, nms_iou=cfg.nms_iou)
    try:
        tag_words = load_tag_words(cfg.tag_words)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    try:
        if cfg.backend == "centernet":
            from muvla.regions.centernet import CenterNetBackend

            return CenterNetBackend(cfg.images, featurizer, selection, weights=cfg.detector_weights,
                                    tag_words=tag_words, batch_images=1)
        from muvla.regions.hf_detector import HFDetectorBackend

        return HFDetectorBackend(cfg.images, featurizer, selection, model=str(cfg.detector_model),
                                 vocabulary=cfg.vocabulary, device=cfg.device, tag_words=tag_words,
                                 batch_images=cfg.detector_batch_size)
    except (WeightsError, ValueError) as err:
        raise ConfigError(str(err)) from err
