"""``muvla demo``: the whole pipeline on an embedded default, with no arguments and no downloads.

Images: natural sample photos shipped with scikit-image. Text: ``muvla/data/demo_captions.txt``, a
caption corpus written for this project (some sentences describe scenes like the sample images,
most are unrelated), so retrieval has to find the right ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from muvla.utils.config import ConfigError, save_config

# skimage.data loaders that ship inside the wheel (no pooch download); colour photos first.
SAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field",
                 "immunohistochemistry", "camera", "clock", "coins", "moon", "page", "horse")


def demo_captions_path() -> Path:
    return Path(str(resources.files("muvla") / "data" / "demo_captions.txt"))


def _sample_image(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    array = getattr(skimage.data, name)()
    if array.dtype == bool:  # the horse silhouette is a binary mask
        array = (~array).astype(np.uint8) * 255
    return array


def write_sample_images(folder: Path, names: tuple[str, ...] = SAMPLE_IMAGES) -> list[Path]:
    """Write the scikit-image samples as PNG files (skipping ones already written)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(_sample_image(name)).save(tmp, format="PNG")
            tmp.replace(path)
        paths.append(path)
    return paths


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")  # run folder; rerunning reuses finished stages
    k: int = 5  # sentences retrieved per image
    max_regions: int = 16  # regions kept per image
    query_mode: str = "counted"  # official | counted

    def validate(self) -> None:
        if self.k < 1 or self.max_regions < 1:
            raise ConfigError("k and max_regions must be >= 1")


def run_demo(cfg: DemoConfig) -> dict:
    from muvla.corpus import CorpusConfig, run_corpus

    start = time.perf_counter()
    out = Path(cfg.out)
    save_config(cfg, out / "demo", inputs={"images": list(SAMPLE_IMAGES), "corpus": str(demo_captions_path())})
    write_sample_images(out / "images")
    corpus_cfg = CorpusConfig(out=out, images=out / "images", corpus=[demo_captions_path()], k=cfg.k,
                              query_mode=cfg.query_mode, regions={"max_regions": cfg.max_regions})
    corpus_cfg.validate()
    result = run_corpus(corpus_cfg)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\nmuvla demo finished in {result['seconds']}s. Open the report: {result.get('report')}")
    return result
