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

from muvla.corpus.provenance import OutputPolicy, write_summary
from muvla.utils.config import ConfigError, check_choices, save_config, setting
from muvla.utils.device import PRECISION_HELP, PRECISIONS

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
class DemoConfig(OutputPolicy):
    """``muvla demo``: no arguments needed; every stage uses its library defaults except these sizes."""

    out: Path = setting(Path("runs/demo"), help="run folder; a rerun reuses every step whose settings and inputs "
                                                "are unchanged")
    max_regions: int = setting(16, help="regions kept per image (small, so the demo is quick)")
    pretrain_steps: int = setting(40, help="pre-training steps on the demo corpus (0 = skip pre-training)")
    batch_size: int = setting(8, help="pre-training batch size")
    lr: float = setting(1e-4, help="pre-training learning rate")
    precision: str = setting("auto", choices=PRECISIONS, help=PRECISION_HELP)

    def validate(self) -> None:
        check_choices(self, "demo")
        if self.max_regions < 2:
            raise ConfigError("max_regions must be >= 2")
        if self.pretrain_steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("pretrain_steps must be >= 0, batch_size >= 1 and lr > 0")


def run_demo(cfg: DemoConfig) -> dict:
    from muvla.corpus.build import CorpusConfig, run_corpus
    from muvla.regions.stage import RegionsSettings
    from muvla.text.stage import TextSettings

    cfg.validate()
    start = time.perf_counter()
    out = Path(cfg.out).resolve()
    save_config(cfg, out / "demo", inputs={"images": list(SAMPLE_IMAGES), "corpus": str(demo_captions_path())})
    write_sample_images(out / "images")
    regions = RegionsSettings(backend="auto", images=out / "images", max_regions=cfg.max_regions)
    corpus_cfg = CorpusConfig(out=out, regions=regions, text=TextSettings(corpus=[demo_captions_path()]), report=False,
                              overwrite=cfg.overwrite)
    result = run_corpus(corpus_cfg)
    if cfg.pretrain_steps:
        result["pretrain"] = _pretrain(cfg, out)
        evaluation = out / "evaluation"
        result["zero_shot_retrieval"] = {
            "base": _zero_shot(out, "default", evaluation / "retrieval_base", "base", cfg.precision, cfg.overwrite),
            "muvla": _zero_shot(out, str(out / "pretrain" / "model"), evaluation / "retrieval_muvla", "muvla",
                                cfg.precision, cfg.overwrite),
        }
        result["comparison"] = compare_zero_shot(evaluation / "retrieval_base", evaluation / "retrieval_muvla")
        from muvla.tasks.table import run_table

        table = run_table(sorted(evaluation.glob("retrieval_*/results.json")), evaluation)
        result["table"] = table["files"]
    from muvla.report.html import write_report

    result["report"] = str(write_report(out))
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_summary(out / "summary.json", result)
    return result


def describe(summary: dict) -> list[str]:
    """The short ending of ``muvla demo``: what was built, the key figures, where the report is."""
    stages = summary.get("stages", {})
    regions, text, retrieval = stages.get("regions", {}), stages.get("text", {}), stages.get("retrieval", {})
    lines = [f"muvla demo finished in {summary.get('seconds')} s",
             f"  corpus: {regions.get('images_written')} images, {text.get('sentences')} sentences, "
             f"top-{retrieval.get('k')} retrieved per image"]
    pretrain = summary.get("pretrain")
    if pretrain:
        loss = pretrain.get("final_loss")
        loss_text = f"{loss:.2f}" if isinstance(loss, (int, float)) else "n/a"
        lines.append(f"  pre-training: {pretrain.get('steps')} steps, final loss {loss_text}")
    zero_shot = summary.get("zero_shot_retrieval", {})
    for name, m in zero_shot.items():
        lines.append(f"  zero-shot retrieval, {name}: mean recall {m['mean_recall']:.3f} (95% CI "
                     f"{m['mean_recall_ci_low']:.3f}-{m['mean_recall_ci_high']:.3f}, {m['n_images']} images x "
                     f"{m['n_captions']} held-out captions)")
    comparison = summary.get("comparison")
    if comparison:
        verdict = ("a real difference" if comparison["significant"] else
                   "within noise: this demo is far too small to show what pre-training does; "
                   "`muvla experiment` measures it on hundreds of held-out images")
        lines.append(f"  muvla - base: {comparison['difference']:+.3f} (95% CI {comparison['ci_low']:+.3f} to "
                     f"{comparison['ci_high']:+.3f}): {verdict}")
    lines.append(f"  details: {Path(summary['report']).parent / 'summary.json'}")
    lines.append(f"Open the report: {summary['report']}")
    return lines


def _pretrain(cfg: DemoConfig, out: Path) -> dict:
    """Pre-train on the demo corpus (a step of the protocol: reused when nothing changed)."""
    from muvla.pretraining.run import MINILM_ITM_LOSS_SCALE, PretrainConfig, run_pretrain

    pcfg = PretrainConfig(out=out / "pretrain", corpus=out, max_steps=cfg.pretrain_steps, batch_size=cfg.batch_size,
                          lr=cfg.lr, max_regions=cfg.max_regions, log_every=5, save_every=20,
                          tensorboard=False, itm_loss_scale=MINILM_ITM_LOSS_SCALE, precision=cfg.precision,
                          overwrite=cfg.overwrite)
    summary = run_pretrain(pcfg)
    train = summary.get("train", {})
    return {"model": summary.get("model"), "steps": train.get("steps"), "final_loss": train.get("final_loss"),
            "training_curves": train.get("training_curves"), "reused": bool(summary.get("reused"))}


def _zero_shot(out: Path, model: str, eval_out: Path, name: str, precision: str, overwrite: bool) -> dict:
    """Mean recall (R@1/5/10 both ways) of the held-out demo captions scored by the ITM head, with its
    95% bootstrap interval over images."""
    from muvla.tasks.evaluate import EvaluateConfig, run_evaluate

    ecfg = EvaluateConfig(out=eval_out, task="retrieval", model=model, regions=out / "regions",
                          captions=demo_eval_captions_path(), model_name=name, precision=precision,
                          overwrite=overwrite)
    metrics = run_evaluate(ecfg)["metrics"]
    keys = ("mean_recall", "mean_recall_ci_low", "mean_recall_ci_high", "n_images", "n_captions")
    return {k: metrics[k] for k in keys}


def compare_zero_shot(base: Path, other: Path, n_boot: int = 2000) -> dict:
    """Paired bootstrap over the same images: the difference in mean recall and its 95% interval."""
    from muvla.tasks.metrics import mean_recall_bootstrap

    t2i = np.load(base / "text_to_image_retrieval_val.npy")
    a = mean_recall_bootstrap(np.load(base / "scores_retrieval_val.npy"), t2i, n_boot=n_boot)
    b = mean_recall_bootstrap(np.load(other / "scores_retrieval_val.npy"), t2i, n_boot=n_boot)
    low, high = np.percentile(b - a, [2.5, 97.5])
    return {"difference": float(b.mean() - a.mean()), "ci_low": float(low), "ci_high": float(high),
            "significant": bool(low > 0 or high < 0)}
