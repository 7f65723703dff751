"""``muvla experiment``: does pre-training on a weakly aligned corpus give a better model?

One command, any data. The images are split once into training and held-out images (recorded in
``split.json``); nothing of the held-out images (regions, captions) ever reaches pre-training. Then:

1. corpora, each built once: the training images' regions, the text (``cc``: a caption pool with the
   training images' own captions hidden in it, unpaired; ``bc``: text never written for them), and
   one pairing per compared model family (retrieved, random, ground truth, a ratio of both);
2. every compared model is pre-trained with the same initialisation, steps, batch size and seeds;
3. every model is evaluated the same way on held-out images: zero-shot retrieval through the ITM
   head, and a short retrieval fine-tuning probe (same budget for all) on other held-out images;
4. ``results.csv`` (one row per model and seed), ``results.md`` (mean and spread over seeds), plots
   and a section in ``report.html``.

Every step (split, corpora, each model and seed, zero-shot, probe) writes its own folder and runs
under the step protocol (``muvla.corpus.provenance``): an unchanged rerun reuses every output and
says so, a killed experiment resumes where it stopped, a changed setting is refused with one line
naming it unless ``overwrite`` (then that step and everything downstream of it is redone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from muvla.corpus.build import CorpusConfig, finished, run_corpus, run_everywhere
from muvla.corpus.captions import (
    CaptionsFile,
    CaptionsFileError,
    caption_key,
    read_captions_file,
    write_captions_file,
)
from muvla.corpus.layout import CorpusLayout, TextOutput
from muvla.corpus.provenance import Step, StepResult, digest_file, digest_json, run_step, write_summary
from muvla.experiment.config import ExperimentConfig
from muvla.experiment.recipes import RECIPES, ModelRecipe
from muvla.phrases.stage import PhrasesConfig, run_phrases
from muvla.regions.images import list_images
from muvla.regions.stage import RegionsConfig, RegionsSettings, run_regions
from muvla.retrieval.pairs import PairsConfig, run_pairs
from muvla.text.stage import TextSettings
from muvla.utils.config import ConfigError, save_config
from muvla.utils.shards import atomic_file, resolve_shard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentLayout:
    """Where every part of an experiment lives (one folder per step, so each can be resumed)."""

    root: Path

    @property
    def split(self) -> Path:
        return self.root / "split"

    def images(self, part: str) -> Path:
        return self.split / "images" / part

    def captions(self, part: str) -> Path:
        return self.split / f"captions_{part}.json"

    @property
    def eval_regions(self) -> Path:
        return self.root / "eval_regions"

    def corpus(self, name: str) -> Path:
        return self.root / "corpora" / name

    def model(self, model: str, seed: int) -> Path:
        return self.root / "models" / model / f"seed-{seed}"

    def evaluation(self, model: str, seed: int, part: str, probe: bool = False) -> Path:
        """Retrieval of the held-out split ``part`` (dev or test), zero-shot or by the retrieval probe."""
        return self.model(model, seed) / ("probe_eval" if probe else "zero_shot") / part


# ---------------------------------------------------------------------------------------------- split


def _read_captions(path: Path) -> CaptionsFile:
    """A captions file of the experiment (its images list is needed to split them); unusable: ConfigError."""
    try:
        return read_captions_file(path, require_images=True)
    except CaptionsFileError as err:
        raise ConfigError(f"experiment: {err}") from err


def make_split(cfg: ExperimentConfig, layout: ExperimentLayout) -> dict[str, Any]:
    """Split the images with captions into train / probe_train / dev / test (a step of the protocol:
    reused while its settings and inputs are unchanged; a changed split setting is refused unless
    ``overwrite``, and then every later step sees its inputs changed)."""
    ev = cfg.evaluation
    files = {p.stem: p for p in list_images(cfg.images)}
    settings = {name: getattr(ev, name) for name in SPLIT_SETTINGS}
    inputs = {"captions": digest_file(Path(cfg.captions)), "images": digest_json(sorted(p.name for p in files.values()))}
    if cfg.regions.coco_instances is not None:
        inputs["coco_instances"] = digest_file(Path(cfg.regions.coco_instances))
    outputs = [layout.split / "split.json", *(layout.captions(part) for part in SPLIT_PARTS)]
    step = Step("split", layout.split, settings, inputs, outputs, SplitRecord(**settings),
                sources={"images": cfg.images, "captions": cfg.captions, "coco_instances": cfg.regions.coco_instances},
                work=[layout.split / "images", *(layout.split / f"instances_{part}.json" for part in ("train", "eval"))])
    return run_step(step, lambda _start: StepResult(_split(cfg, layout, files)), overwrite=cfg.overwrite)


@dataclass
class SplitRecord:
    """The split step's own settings, as its ``config.yaml`` records them (they live in
    ``ExperimentConfig.evaluation``)."""

    held_out: float
    split_seed: int
    probe_fraction: float
    dev_fraction: float
    max_images: int
    max_dev_images: int
    captions_per_image: int


SPLIT_SETTINGS = tuple(f.name for f in dataclasses.fields(SplitRecord))
SPLIT_PARTS = ("train", "probe_train", "dev", "test")
HELD_OUT_PARTS = ("probe_train", "dev", "test")


def _split(cfg: ExperimentConfig, layout: ExperimentLayout, files: dict[str, Path]) -> dict[str, Any]:
    data = _read_captions(cfg.captions)
    captioned = set(data.stems.values())
    stems = sorted(captioned & set(files))
    if len(stems) < 10:
        raise ConfigError(f"experiment: only {len(stems)} images of {cfg.images} have captions in {cfg.captions}")
    ev = cfg.evaluation
    order = [stems[i] for i in np.random.default_rng(ev.split_seed).permutation(len(stems))]
    n_held = max(2, int(round(ev.held_out * len(stems))))
    held, train = sorted(order[:n_held]), sorted(order[n_held:])
    n_probe = int(round(ev.probe_fraction * len(held)))
    probe_train, rest = held[:n_probe], held[n_probe:]
    n_dev = int(round(ev.dev_fraction * len(rest)))
    if n_dev < 1 or len(rest) - n_dev < 1:
        raise ConfigError(f"experiment: {len(rest)} held-out images outside the probe cannot make both a dev and a "
                          f"test split (raise evaluation.held_out or lower probe_fraction)")
    dev, test = rest[:n_dev][: ev.max_dev_images], rest[n_dev:][: ev.max_images]
    scored = set(dev) | set(test)
    split = {"train": train, "probe_train": probe_train, "dev": dev, "test": test,
             "unused_held_out": [stem for stem in rest if stem not in scored]}
    for part, members in (("train", train), ("eval", probe_train + dev + test)):
        folder = layout.images(part)
        folder.mkdir(parents=True, exist_ok=True)
        for stem in members:
            link = folder / files[stem].name
            if not link.is_symlink():  # a resumed split keeps the links it made
                os.symlink(files[stem].resolve(), link)
    for part in ("train", "probe_train"):
        write_captions_file(layout.captions(part), data.subset(split[part]))
    for part in ("dev", "test"):
        write_captions_file(layout.captions(part), data.subset(split[part], ev.captions_per_image))
    if cfg.regions.coco_instances is not None:
        for part, members in (("train", set(train)), ("eval", set(probe_train) | scored)):
            _write_instances_subset(cfg, layout, part, members)
    _write_json(layout.split / "split.json", split)
    return {"images": len(stems), **{part: len(members) for part, members in split.items()}}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def _write_instances_subset(cfg: ExperimentConfig, layout: ExperimentLayout, part: str, stems: set[str]) -> None:
    """The coco-instances oracle restricted to one split (so no held-out box reaches pre-training)."""
    data = json.loads(Path(cfg.regions.coco_instances).read_text(encoding="utf-8"))
    images = [im for im in data["images"] if Path(str(im["file_name"])).stem in stems]
    ids = {im["id"] for im in images}
    _write_json(layout.split / f"instances_{part}.json",
                {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]})


def _regions_settings(cfg: ExperimentConfig, layout: ExperimentLayout, part: str) -> RegionsSettings:
    values = cfg.section_values(cfg.regions)
    values["images"] = layout.images(part)
    if cfg.regions.coco_instances is not None:
        values["coco_instances"] = layout.split / f"instances_{part}.json"
    return RegionsSettings(**values)


# ---------------------------------------------------------------------------------------------- corpora


@dataclass
class StepLog:
    """Which steps of one experiment run did work and which reused an up-to-date output."""

    redone: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def add(self, label: str, summary: dict[str, Any]) -> dict[str, Any]:
        (self.reused if summary.get("reused") else self.redone).append(label)
        return summary


def build_corpora(cfg: ExperimentConfig, layout: ExperimentLayout, log: StepLog) -> dict[str, Path]:
    """The retrieved corpus (regions, text, retrieval, phrases) and one corpus per baseline pairing,
    sharing its regions and text; returns corpus name -> folder."""
    shard = resolve_shard()
    main = layout.corpus("retrieval")
    text = [*cfg.pool, layout.captions("train")] if cfg.text_setting == "cc" else list(cfg.pool)
    built = run_corpus(CorpusConfig(out=main, regions=_regions_settings(cfg, layout, "train"),
                                    text=TextSettings(corpus=text), retrieval=cfg.retrieval, phrases=cfg.phrases,
                                    report=False, overwrite=cfg.overwrite))
    for stage, summary in built["stages"].items():
        log.add(f"corpora/retrieval/{stage}", summary)
    corpora = {"retrieval": main}
    for recipe in {RECIPES[m].corpus: RECIPES[m] for m in cfg.models if RECIPES[m].pairing not in ("none", "retrieval")
                   }.values():
        corpora[recipe.corpus] = _pairing_corpus(cfg, layout, recipe, main, shard, log)
    return corpora


def _pairing_corpus(cfg: ExperimentConfig, layout: ExperimentLayout, recipe: ModelRecipe, main: Path,
                    shard: Any, log: StepLog) -> Path:
    """A baseline corpus: the same regions; the same text (bc + aligned pairs: the text plus the
    training captions, which the pairs need); the pairing from ``muvla pairs``; its phrases."""
    root = layout.corpus(recipe.corpus)
    root.mkdir(parents=True, exist_ok=True)
    _link(root / "regions", main / "regions")
    label = f"corpora/{recipe.corpus}"
    needs_captions = recipe.pairing in ("aligned", "aligned_ratio") and cfg.text_setting == "bc"
    if needs_captions:
        from muvla.text.stage import TextConfig, run_text

        text_cfg = TextConfig(out=root / "text", corpus=[*cfg.pool, layout.captions("train")], overwrite=cfg.overwrite)
        log.add(f"{label}/text", run_everywhere(run_text, text_cfg, shard, sharded=False, timeout_s=7 * 24 * 3600))
    else:
        _link(root / "text", main / "text")
    mode = "aligned_ratio" if recipe.pairing == "aligned_ratio" else recipe.pairing
    pairs = PairsConfig(out=root / "retrieval", regions=root / "regions", text=root / "text", mode=mode,
                        captions=layout.captions("train") if mode != "random" else None,
                        p=recipe.p if recipe.p is not None else 1.0, k=cfg.retrieval.k, seed=0,
                        overwrite=cfg.overwrite)
    log.add(f"{label}/pairs", run_everywhere(run_pairs, pairs, shard, sharded=False, timeout_s=7 * 24 * 3600))
    phrases = PhrasesConfig(out=root / "phrases", retrieval=root / "retrieval", regions=root / "regions",
                            text=root / "text", overwrite=cfg.overwrite, **cfg.section_values(cfg.phrases))
    log.add(f"{label}/phrases", run_everywhere(run_phrases, phrases, shard, sharded=True, timeout_s=7 * 24 * 3600))
    return root


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    os.symlink(target.resolve(), link, target_is_directory=True)


def corpus_quality(cfg: ExperimentConfig, layout: ExperimentLayout, corpora: dict[str, Path]) -> dict[str, Any]:
    """How often the retrieved pairs hold one of the image's true captions (cc only: in bc the text
    was never written for these images), and how much of the text was used."""
    corpus = CorpusLayout.at(corpora["retrieval"])
    topk = corpus.retrieval.read_topk()
    pairs = topk.by_image()
    out: dict[str, Any] = {"images": len(pairs), "pairs": len(topk),
                           "distinct_sentences": int(len(set(topk.sentence_id.tolist())))}
    if cfg.text_setting != "cc":
        return out
    own = {stem: {caption_key(t) for t in texts}
           for stem, texts in _read_captions(layout.captions("train")).texts_by_stem().items()}
    texts = TextOutput(corpus.text.root).texts(topk.sentence_id.tolist())
    hit_any = hit_first = 0
    for image, ranked in pairs.items():
        found = [caption_key(texts[sid]) in own.get(image, set()) for _, sid in ranked]
        hit_any += any(found)
        hit_first += bool(found and found[0])
    out.update(own_caption_at_1=hit_first / max(len(pairs), 1), own_caption_at_k=hit_any / max(len(pairs), 1),
               k=cfg.retrieval.k)
    return out


# ---------------------------------------------------------------------------------------------- models


def pretrain_model(cfg: ExperimentConfig, layout: ExperimentLayout, model: str, seed: int,
                   corpora: dict[str, Path]) -> dict[str, Any]:
    """Pre-train one model: reused when its settings and corpus are unchanged, resumed after a kill."""
    from muvla.pretraining.run import run_pretrain

    recipe = RECIPES[model]
    corpus = corpora["retrieval"] if recipe.pairing == "none" else corpora[recipe.corpus]
    return run_pretrain(cfg.pretrain_config(model, layout.model(model, seed), corpus, seed))


def evaluate_model(cfg: ExperimentConfig, layout: ExperimentLayout, model: str, seed: int, part: str,
                   probe: bool = False) -> dict[str, Any]:
    """Retrieval of one held-out split (dev or test: every caption of an image against every image)
    through the ITM head of the pre-trained model (zero-shot) or of its retrieval probe (summary)."""
    from muvla.tasks.evaluate import EvaluateConfig, run_evaluate

    ev = cfg.evaluation
    folder = layout.model(model, seed)
    ecfg = EvaluateConfig(out=layout.evaluation(model, seed, part, probe), task="retrieval",
                          model=str(folder / "probe" / "model" if probe else folder), regions=layout.eval_regions,
                          captions=layout.captions(part), split=part, max_text_len=ev.max_text_len,
                          batch_size=ev.batch_size, model_name=f"{model} {'probe' if probe else 'zero-shot'}",
                          device="auto", precision=cfg.precision, overwrite=cfg.overwrite)
    return run_evaluate(ecfg)


def probe_model(cfg: ExperimentConfig, layout: ExperimentLayout, model: str, seed: int) -> dict[str, Any]:
    """Retrieval fine-tuning on the probe-train images (the same budget for every model); it is
    scored on dev and test by :func:`evaluate_model` (summary)."""
    from muvla.tasks.finetune import FinetuneConfig, run_finetune

    ev = cfg.evaluation
    fcfg = FinetuneConfig(out=layout.model(model, seed) / "probe", task="retrieval",
                          train=[layout.captions("probe_train")], val=[],
                          regions=layout.eval_regions, model=str(layout.model(model, seed)),
                          max_steps=max(ev.probe_steps, 1), batch_size=ev.probe_batch_size, lr=ev.probe_lr, seed=seed,
                          max_text_len=ev.max_text_len, eval_batch_size=ev.batch_size, model_name=model, plot=False,
                          save_every=max(ev.probe_steps, 1), log_every=max(1, ev.probe_steps // 5), device="auto",
                          precision=cfg.precision, overwrite=cfg.overwrite)
    return run_finetune(fcfg)


# ---------------------------------------------------------------------------------------------- run


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    from muvla.experiment.results import write_results
    from muvla.training.distributed import barrier, is_main

    cfg.validate()
    start = time.perf_counter()
    layout = ExperimentLayout(Path(cfg.out))
    shard = resolve_shard()
    log = StepLog()
    if shard.is_main:
        save_config(cfg, layout.root, inputs={"images": cfg.images, "captions": cfg.captions, "pool": cfg.pool})
        log.add("split", make_split(cfg, layout))
    else:
        while not finished(layout.split):
            time.sleep(2.0)
    split = json.loads((layout.split / "split.json").read_text(encoding="utf-8"))
    eval_regions = RegionsConfig(out=layout.eval_regions, overwrite=cfg.overwrite,
                                 **cfg.section_values(_regions_settings(cfg, layout, "eval")))
    log.add("eval_regions", run_everywhere(run_regions, eval_regions, shard, sharded=True, timeout_s=7 * 24 * 3600))
    corpora = build_corpora(cfg, layout, log)
    runs: list[dict[str, Any]] = []
    parts = cfg.evaluation.scored_splits
    for model in cfg.models:
        for seed in cfg.seeds:
            label = f"models/{model}/seed-{seed}"
            t0 = time.perf_counter()
            pretrain = log.add(label, pretrain_model(cfg, layout, model, seed, corpora))
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"model": model, "seed": seed, "pretrain": pretrain, "zero_shot": {}, "probe": {}}
            if is_main():
                for part in parts:
                    row["zero_shot"][part] = log.add(f"{label}/zero_shot/{part}",
                                                     evaluate_model(cfg, layout, model, seed, part))["metrics"]
            barrier()
            if cfg.evaluation.probe_steps > 0:
                log.add(f"{label}/probe", probe_model(cfg, layout, model, seed))
                if is_main():
                    for part in parts:
                        row["probe"][part] = log.add(f"{label}/probe/{part}", evaluate_model(
                            cfg, layout, model, seed, part, probe=True))["metrics"]
            row["pretrain_seconds"] = round(seconds, 1)
            runs.append(row)
            barrier()
    if not is_main():
        return {"out": str(layout.root), "rank": shard.rank}
    quality = corpus_quality(cfg, layout, corpora)
    summary = write_results(cfg, layout, runs, quality, split)
    if cfg.report:
        from muvla.report.html import write_report

        summary["report"] = str(write_report(layout.root))
    summary["steps"] = {"redone": log.redone, "reused": log.reused}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_summary(layout.root / "summary.json", summary)
    return summary


def describe(summary: dict[str, Any]) -> list[str]:
    """The short ending of ``muvla experiment``: the headline table and where everything is."""
    if "table" not in summary:
        return [f"experiment: rank {summary.get('rank')} done"]
    steps = summary.get("steps", {})
    redone, reused = steps.get("redone", []), steps.get("reused", [])
    if redone:
        work = f"{len(redone)} step(s) run, {len(reused)} reused (same settings and inputs)"
    else:
        work = f"nothing to do: all {len(reused)} steps were up to date (same settings and inputs), results re-rendered"
    part = summary.get("report_on", "test")
    lines = [f"muvla experiment finished in {summary.get('seconds')} s ({summary['n_train_images']} training images, "
             f"{summary['n_test_images']} held-out {part} images, seeds {summary['seeds']}); {work}", summary["table"]]
    for sentence in summary.get("findings", []):
        lines.append(f"- {sentence}")
    lines.append(f"details: {summary['results_md']} and {summary['results_csv']}")
    if summary.get("report"):
        lines.append(f"Open the report: {summary['report']}")
    return lines


__all__ = ["ExperimentConfig", "ExperimentLayout", "corpus_quality", "describe", "finished", "make_split",
           "run_experiment"]
