"""COCO captions JSON: the one reader, writer and caption normaliser of the format.

Format: ``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", "id"}, ...]}``.
The text stage reads it as a text corpus, the baseline pairings and the experiment find an image's own
captions in it, the retrieval development sets hide them in a pool, and the image-text retrieval task
evaluates on it. They all go through this module, so a caption is read, named and compared one way.

Image ids are file stems, as in the region store: ``images[].file_name`` gives the stem of an image
id; an annotation whose image is not listed is named ``str(image_id)``.

Captions are compared by ``caption_key`` (the stored normal form, lowercased); the sentence store keeps
``normalise_caption`` (the normal form with its case), so matching never changes the stored text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muvla.utils.shards import atomic_file

_WS = re.compile(r"\s+")


class CaptionsFileError(ValueError):
    """A captions file that cannot be read or is not COCO captions JSON; the message names the file."""


def normalise_caption(text: str) -> str:
    """Whitespace runs collapsed to one space, stripped: the text the sentence store keeps (and its
    dedupe key), so every sentence read from any corpus format goes through this one rule."""
    return _WS.sub(" ", text).strip()


def caption_key(text: str) -> str:
    """Comparison key of a caption: ``normalise_caption`` lowercased, so a caption finds its stored
    sentence whatever its spacing or case. Only for comparing; the store keeps the cased text."""
    return normalise_caption(text).lower()


@dataclass(frozen=True)
class Caption:
    """One annotation: ``index`` is its position in the file; ``image_id`` is None when missing (or
    not an int / str), ``text`` (as written, not normalised) is None when the caption is not a string,
    ``caption_id`` is None when the annotation has no integer ``id``."""

    index: int
    image_id: int | str | None
    text: str | None
    caption_id: int | None


def _id(value: Any) -> int | str | None:
    """An image id as the file gives it (int or str); anything else names no image."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value


def _stem(image: Any) -> str | None:
    """The file stem of an ``images`` entry with an id and a file name; None for any other entry."""
    if isinstance(image, dict) and _id(image.get("id")) is not None and isinstance(image.get("file_name"), str):
        return Path(image["file_name"]).stem
    return None


def _int_id(value: Any) -> int | None:
    """An optional integer caption id (an int or a string of digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


@dataclass
class CaptionsFile:
    """A COCO captions file: its ``images`` and ``annotations`` entries as read (unvalidated, so a
    subset writes them back unchanged); ``captions()`` gives the annotations typed."""

    path: Path
    images: list[Any]
    annotations: list[Any]

    @functools.cached_property
    def stems(self) -> dict[int | str, str]:
        """image id -> file stem, for every ``images`` entry with an id and a file name."""
        return {image["id"]: stem for image in self.images if (stem := _stem(image)) is not None}

    def stem_of(self, image_id: int | str) -> str:
        """The region-store name of an image: its file stem, or ``str(image_id)`` when not listed."""
        return self.stems.get(image_id, str(image_id))

    def captions(self) -> Iterator[Caption]:
        """Every annotation in file order (malformed ones too: the caller decides what they mean)."""
        for i, ann in enumerate(self.annotations):
            if not isinstance(ann, dict):
                yield Caption(i, None, None, None)
                continue
            text = ann.get("caption")
            yield Caption(i, _id(ann.get("image_id")), text if isinstance(text, str) else None,
                          _int_id(ann.get("id")))

    def texts_by_image(self) -> dict[int | str, list[str]]:
        """image id -> its non-empty normalised captions, images and captions in file order."""
        out: dict[int | str, list[str]] = {}
        for caption in self.captions():
            if caption.image_id is None or caption.text is None:
                continue
            text = normalise_caption(caption.text)
            if text:
                out.setdefault(caption.image_id, []).append(text)
        return out

    def texts_by_stem(self) -> dict[str, list[str]]:
        """file stem -> its non-empty normalised captions (``texts_by_image`` named as in the region store)."""
        out: dict[str, list[str]] = {}
        for image_id, texts in self.texts_by_image().items():
            out.setdefault(self.stem_of(image_id), []).extend(texts)
        return out

    def subset(self, stems: Iterable[str], per_image: int | None = None) -> CaptionsFile:
        """The images whose file stem is in ``stems`` and their annotations (the first ``per_image``
        of each when given), entries unchanged and in file order."""
        wanted = set(stems)
        images = [image for image in self.images if _stem(image) in wanted]
        ids = {im["id"] for im in images}
        count: dict[int | str, int] = {}
        annotations = []
        for ann, caption in zip(self.annotations, self.captions()):
            if caption.image_id not in ids:
                continue
            if per_image is not None and count.get(caption.image_id, 0) >= per_image:
                continue
            count[caption.image_id] = count.get(caption.image_id, 0) + 1
            annotations.append(ann)
        return CaptionsFile(self.path, images, annotations)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON: ``images`` and ``annotations`` only (a subset drops ``info``, ``licenses``)."""
        return {"images": self.images, "annotations": self.annotations}


def read_captions_file(path: str | Path, require_images: bool = False, errors: str = "strict") -> CaptionsFile:
    """Read a COCO captions JSON; anything else is one ``CaptionsFileError`` naming the file.

    ``errors="surrogateescape"`` keeps invalid UTF-8 bytes as lone surrogates (the text stage repairs
    or rejects such captions one by one); by default a file that is not UTF-8 is unreadable. A leading
    BOM is ignored. ``require_images``: the ``images`` list must be there (needed to name images).
    """
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8", errors=errors).lstrip("\ufeff")
    except OSError as err:
        raise CaptionsFileError(f"{path}: cannot read the captions file ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise CaptionsFileError(f"{path}: not valid UTF-8 (byte {err.start}: {err.reason})") from err
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CaptionsFileError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionsFileError(f"{path}: not a COCO captions file (no top-level 'annotations' list)")
    images = data.get("images")
    if not isinstance(images, list):
        if require_images:
            raise CaptionsFileError(f"{path}: not a COCO captions file (no top-level 'images' list)")
        images = []  # only the annotations are needed: images are then named by their ids
    return CaptionsFile(path, images, data["annotations"])


def write_captions_file(path: str | Path, captions: CaptionsFile) -> Path:
    """Write ``{"images", "annotations"}`` atomically (a reader never sees half a file)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(captions.to_json(), indent=1), encoding="utf-8")
    return path
