"""Robust image loading: any PIL-readable file becomes an RGB uint8 array, bad files a `RejectedImage`.

Why: real image folders hold grayscale, CMYK, palette/alpha, 16-bit and EXIF-rotated files next to
truncated downloads and HTML error pages saved as .jpg. The stage must turn every file into either a
correct RGB image or a recorded rejection, never crash halfway through a shard.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Refuse absurd sizes before decoding (decompression bombs); ~ 16k x 16k.
MAX_PIXELS = 16384 * 16384


class RejectedImage(Exception):
    """An input file that cannot be used; ``reason`` is recorded in rejected.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension, case-insensitive), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white (not black, which reads as 'dark')."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=1.0))
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), mode="L")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` fully into an RGB uint8 array [H, W, 3] with EXIF orientation applied.

    Raises RejectedImage for empty, non-image, truncated or corrupt files and absurd sizes.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise RejectedImage(f"unreadable file: {err.strerror or err}") from err
    if size == 0:
        raise RejectedImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w < 1 or h < 1:
                    raise RejectedImage(f"invalid size {w}x{h}")
                if w * h > MAX_PIXELS:
                    raise RejectedImage(f"image too large: {w}x{h}")
                img.load()  # full decode now: truncated data must fail here, not later
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
                arr = np.asarray(rgb, dtype=np.uint8)
    except RejectedImage:
        raise
    except UnidentifiedImageError as err:
        raise RejectedImage("not an image (unidentified format)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RejectedImage(f"image too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, TypeError, struct.error) as err:
        # PIL signals bad data (including malformed EXIF) with any of these; all mean 'unusable file'.
        raise RejectedImage(f"corrupt image: {type(err).__name__}: {err}") from err
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise RejectedImage(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)
