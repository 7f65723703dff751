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


def demo_eval_captions_path() -> Path:
    """Held-out captions of the sample images (COCO captions JSON), used only to evaluate retrieval."""
    return Path(str(resources.files("muvla") / "data" / "demo_eval_captions.json"))


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
    pretrain_steps: int = 40  # pre-training steps on the demo corpus (0 = skip pre-training)
    batch_size: int = 8
    lr: float = 1e-4

    def validate(self) -> None:
        if self.k < 1 or self.max_regions < 2:
            raise ConfigError("k must be >= 1 and max_regions >= 2")
        if self.pretrain_steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("pretrain_steps must be >= 0, batch_size >= 1 and lr > 0")


def run_demo(cfg: DemoConfig) -> dict:
    from muvla.corpus.build import CorpusConfig, run_corpus

    start = time.perf_counter()
    out = Path(cfg.out).resolve()
    save_config(cfg, out / "demo", inputs={"images": list(SAMPLE_IMAGES), "corpus": str(demo_captions_path())})
    write_sample_images(out / "images")
    corpus_cfg = CorpusConfig(out=out, images=out / "images", corpus=[demo_captions_path()], k=cfg.k, backend="auto",
                              query_mode=cfg.query_mode, regions={"max_regions": cfg.max_regions}, report=False)
    result = run_corpus(corpus_cfg)
    if cfg.pretrain_steps:
        result["pretrain"] = _pretrain(cfg, out)
        result["zero_shot_retrieval"] = {
            "base (no pre-training)": _zero_shot(out, "default", out / "evaluation" / "retrieval_base", "base"),
            "muvla demo": _zero_shot(out, str(out / "pretrain" / "model"), out / "evaluation" / "retrieval_muvla",
                                     "muvla"),
        }
        from muvla.tasks.table import run_table

        table = run_table(sorted((out / "evaluation").glob("retrieval_*/results.json")), out / "evaluation")
        result["table"] = table["files"]
        result["table_markdown"] = table["markdown"]
    from muvla.report.html import write_report

    result["report"] = str(write_report(out))
    result["seconds"] = round(time.perf_counter() - start, 1)
    for name, metrics in result.get("zero_shot_retrieval", {}).items():
        print(f"zero-shot retrieval, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    if "table_markdown" in result:
        print(result.pop("table_markdown"), end="")
    print(f"muvla demo finished in {result['seconds']}s. Open the report: {result['report']}")
    return result


def _pretrain(cfg: DemoConfig, out: Path) -> dict:
    from muvla.pretraining.run import PretrainConfig, run_pretrain

    pretrain_out = out / "pretrain"
    resume = (pretrain_out / "checkpoints").exists() and not (pretrain_out / "model" / "config.json").exists()
    if (pretrain_out / "model" / "config.json").exists():
        return {"status": "reused", "model": str(pretrain_out / "model")}
    pcfg = PretrainConfig(out=pretrain_out, corpus=out, max_steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
                          lr=cfg.lr, max_regions=cfg.max_regions, log_every=5, save_every=20, resume=resume,
                          tensorboard=False)
    pcfg.validate()
    summary = run_pretrain(pcfg)
    train = summary.get("train", {})
    return {"model": summary.get("model"), "steps": train.get("steps"), "final_loss": train.get("final_loss"),
            "training_curves": train.get("training_curves")}


def _zero_shot(out: Path, model: str, eval_out: Path, name: str) -> dict:
    """R@1/5/10 (both directions) of the held-out demo captions, scored by the ITM head."""
    from muvla.tasks.evaluate import EvaluateConfig, run_evaluate

    ecfg = EvaluateConfig(out=eval_out, task="retrieval", model=model, regions=out / "regions",
                          captions=demo_eval_captions_path(), model_name=name)
    summary = run_evaluate(ecfg)
    metrics = summary.get("metrics", summary)
    return {k: float(v) for k, v in metrics.items() if k.startswith(("i2t_r", "t2i_r"))}
