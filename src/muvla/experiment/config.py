"""``muvla experiment`` settings: the data, the compared models, the shared budget, the evaluation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muvla.corpus.provenance import OutputPolicy
from muvla.experiment.recipes import RECIPES
from muvla.phrases.stage import PhrasesSettings
from muvla.pretraining.run import PretrainConfig
from muvla.regions.stage import RegionsSettings
from muvla.retrieval.stage import RetrievalSettings
from muvla.utils.config import ConfigError, check_choices, check_max_text_len, from_dict, setting
from muvla.utils.device import PRECISION_HELP, PRECISIONS

TEXT_SETTINGS = ("cc", "bc")
DEFAULT_MODELS = ("base", "joint_unaligned", "muvla", "aligned")


REPORT_ON = ("dev", "test")


@dataclass(kw_only=True)
class EvaluationSettings:
    """How the held-out images are used. They are split three ways: probe-train (trains a short
    retrieval fine-tuning probe, the same budget for every model, so models whose ITM head never
    trained still get a number that means the same thing), dev (where anything chosen by looking at
    results is chosen) and test (reported once, untouched while tuning: ``report_on: dev``)."""

    held_out: float = setting(0.2, help="fraction of the images held out of pre-training (never seen by any model)")
    split_seed: int = setting(0, help="seed of the train / held-out split")
    probe_fraction: float = setting(0.5, help="part of the held-out images that trains the retrieval probe")
    dev_fraction: float = setting(0.5, help="part of the other held-out images that is the dev split (the rest: test)")
    max_images: int = setting(100, help="test images scored (zero-shot and probe): n images x n captions pairs")
    max_dev_images: int = setting(100, help="dev images scored (zero-shot and probe)")
    captions_per_image: int = setting(5, help="captions per dev/test image among the retrieval candidates (5 as in "
                                              "the Flickr30k / COCO benchmarks: image->text hits when any of an "
                                              "image's captions is in the top k, text->image ranks every caption)")
    report_on: str = setting("test", choices=REPORT_ON,
                             help="dev: score dev only and leave test untouched (while tuning); test: score dev and "
                                  "test, and report test")
    tuned: dict[str, str] = setting(default_factory=dict,
                                    help="settings chosen by looking at results -> on which images they were chosen "
                                         "(stated in results.md beside the numbers)")
    probe_steps: int = setting(60, help="fine-tuning steps of the retrieval probe")
    probe_batch_size: int = setting(8, help="batch size of the retrieval probe")
    probe_lr: float = setting(5e-5, help="learning rate of the retrieval probe")
    max_text_len: int = setting(32, help="tokens per caption when evaluating and probing")
    bootstrap: int = setting(2000, help="paired bootstrap resamples (test images and seeds together) of every gap",
                             runtime=True)
    batch_size: int = setting(64, help="pairs per batch when scoring", runtime=True)

    def validate(self) -> None:
        check_choices(self, "evaluation")
        if not 0.0 < self.held_out < 1.0:
            raise ConfigError(f"evaluation.held_out must be in (0, 1), got {self.held_out}")
        if not 0.0 <= self.probe_fraction < 1.0:
            raise ConfigError(f"evaluation.probe_fraction must be in [0, 1), got {self.probe_fraction}")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ConfigError(f"evaluation.dev_fraction must be in (0, 1), got {self.dev_fraction}")
        check_max_text_len(self.max_text_len, "evaluation.max_text_len")
        for name in ("max_images", "max_dev_images", "captions_per_image", "probe_batch_size", "batch_size",
                     "bootstrap"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name} must be >= 1, got {getattr(self, name)}")
        if self.probe_steps < 0 or self.probe_lr <= 0:
            raise ConfigError("evaluation.probe_steps must be >= 0 and probe_lr > 0")

    @property
    def scored_splits(self) -> tuple[str, ...]:
        """The held-out splits every model is scored on."""
        return ("dev",) if self.report_on == "dev" else ("dev", "test")


@dataclass
class ExperimentConfig(OutputPolicy):
    """``muvla experiment``: build each corpus once, pre-train every compared model with the same
    budget and seeds, evaluate all of them the same way on held-out images."""

    out: Path = setting(help="experiment folder: results.md, results.csv, plots/, report.html and every run")
    images: Path = setting(help="folder of the experiment's images (split into training and held-out images)")
    captions: Path = setting(help="COCO captions JSON of those images: used ONLY for evaluation, the aligned "
                                  "baselines and (text setting cc) to hide the training images' captions in the pool")
    pool: list[Path] = setting(default_factory=list,
                               help="text corpora: cc = captions of other images, in which the training images' own "
                                    "captions are hidden (unpaired); bc = text never written for these images")
    text_setting: str = setting("cc", choices=TEXT_SETTINGS, help="cc or bc (METHOD §0)")
    models: list[str] = setting(default_factory=lambda: list(DEFAULT_MODELS), choices=tuple(RECIPES),
                                help="compared models")
    seeds: list[int] = setting(default_factory=lambda: [0, 1, 2], help="pre-training seeds of every model")
    regions: RegionsSettings = setting(default_factory=RegionsSettings, help="regions stage settings (images is set)")
    retrieval: RetrievalSettings = setting(default_factory=RetrievalSettings, help="retrieval stage settings")
    phrases: PhrasesSettings = setting(default_factory=PhrasesSettings, help="phrases stage settings")
    pretrain: dict[str, Any] = setting(default_factory=dict,
                                       help="pre-training settings shared by every model (any muvla pretrain setting, "
                                            "e.g. --set pretrain.max_steps=300)")
    evaluation: EvaluationSettings = setting(default_factory=EvaluationSettings, help="evaluation settings")
    precision: str = setting("auto", choices=PRECISIONS, help=PRECISION_HELP + "; pre-training, zero-shot scoring "
                                                                               "and the probe alike")
    report: bool = setting(True, help="write report.html at the end", runtime=True)

    def validate(self) -> None:
        check_choices(self, "experiment")
        if not Path(self.images).is_dir():
            raise ConfigError(f"experiment: image folder {self.images} not found")
        if not Path(self.captions).is_file():
            raise ConfigError(f"experiment: captions file {self.captions} not found")
        for path in self.pool:
            if not Path(path).is_file():
                raise ConfigError(f"experiment: text file {path} not found")
        if self.text_setting == "bc" and not self.pool:
            raise ConfigError("experiment: text setting bc needs a text corpus (pool)")
        if not self.models or len(set(self.models)) != len(self.models):
            raise ConfigError(f"experiment: models must be distinct, got {self.models}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiment: seeds must be distinct, got {self.seeds}")
        dataclasses.replace(self.regions, images=Path(self.images)).validate()  # the split folders replace images
        self.retrieval.validate()
        self.phrases.validate()
        self.evaluation.validate()
        self.pretrain_config("base", Path(self.out) / "check", None, 0)  # the shared settings are valid
        if self.regions.backend == "coco-instances" and self.regions.coco_instances is None:
            raise ConfigError("experiment: the coco-instances backend needs regions.coco_instances")

    def pretrain_config(self, model: str, out: Path, corpus: Path | None, seed: int) -> PretrainConfig:
        """The pre-training config of one compared model: the shared settings + the recipe."""
        recipe = RECIPES[model]
        reserved = {"out", "corpus", "mode", "tasks", "k", "seed", "retrieval", "phrases", "resume", "overwrite",
                    "precision"}
        clash = sorted(reserved & set(self.pretrain))
        if clash:
            raise ConfigError(f"experiment: pretrain.{clash[0]} is set by the experiment for each model")
        values = {**self.pretrain, "out": out, "corpus": corpus, "mode": recipe.mode, "tasks": list(recipe.tasks),
                  "k": recipe.k, "seed": seed, "overwrite": self.overwrite, "precision": self.precision}
        return from_dict(PretrainConfig, values, where="pretrain")

    def section_values(self, section: Any) -> dict[str, Any]:
        return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
