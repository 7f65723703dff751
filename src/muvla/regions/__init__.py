"""Regions stage (METHOD.md §1): per image, up to N boxes with tags, scores and features."""

from muvla.corpus.region_store import ImageRegions, RegionPartWriter, RegionStore, merge_region_parts
from muvla.regions.backends import (
    ButdBackend,
    CocoInstancesBackend,
    CropFeaturizer,
    InputItem,
    ProposalsBackend,
    VinVLBackend,
)
from muvla.regions.efficientnet import (
    EfficientNetLite0,
    imagenet_class_names,
    imagenet_tags,
    load_lite0,
    preprocess,
    short_tag,
)
from muvla.regions.images import IMAGE_EXTENSIONS, RejectedImage, list_images, load_rgb
from muvla.regions.proposals import ProposalConfig, box_area, box_iou, nms, propose_boxes
from muvla.regions.stage import BACKENDS, RegionsConfig, build_backend, run_regions

__all__ = [
    "BACKENDS",
    "IMAGE_EXTENSIONS",
    "ButdBackend",
    "CocoInstancesBackend",
    "CropFeaturizer",
    "EfficientNetLite0",
    "ImageRegions",
    "InputItem",
    "ProposalConfig",
    "ProposalsBackend",
    "RegionPartWriter",
    "RegionStore",
    "RegionsConfig",
    "RejectedImage",
    "VinVLBackend",
    "box_area",
    "box_iou",
    "build_backend",
    "imagenet_class_names",
    "imagenet_tags",
    "list_images",
    "load_lite0",
    "load_rgb",
    "merge_region_parts",
    "nms",
    "preprocess",
    "propose_boxes",
    "run_regions",
    "short_tag",
]
