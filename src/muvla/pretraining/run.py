"""``muvla pretrain``: build corpus data, model and objectives, train with the generic Trainer, save the model.

One entry point for μ-VLA and every baseline (METHOD §7); a baseline is a config:
- ``mode: base``        save the initialised model only (no V+L pre-training);
- ``mode: round_robin`` U-VisualBERT: text-only and image-only batches alternate;
- ``mode: muvla``       the three granularities + curriculum; joint_unaligned / aligned / aligned_ratio
  are this mode on a corpus whose retrieval folder came from ``muvla pairs`` (``retrieval``/``phrases``
  override the folders); ablations set ``tasks`` or ``k``.

Outputs (rank 0): ``<out>/model/`` (``Model.from_pretrained``), ``config.yaml``, ``summary.json``,
``training_curves.png``, plus the trainer's ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``.
Under torchrun every rank runs this function; DDP is handled by the Trainer.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muvla.corpus.layout import CorpusCheck, CorpusLayout
from muvla.corpus.provenance import (
    BuildRecord,
    OutputPolicy,
    StageStart,
    Step,
    StepResult,
    digest_model,
    run_step,
)
from muvla.encoders import vocab_digest
from muvla.model import Model, ModelConfig
from muvla.pretraining.data import ITM_NEGATIVES, PretrainCollator, PretrainCorpus, PretrainDataset
from muvla.pretraining.objectives import ITM_WEIGHTS, TASKS, TRAINING_MODES
from muvla.training import SCHEDULE_SETTINGS, TrainConfig, Trainer, TrainerSettings
from muvla.training.distributed import barrier, init_distributed
from muvla.utils.config import (
    ConfigError,
    check_choices,
    check_max_text_len,
    output_settings,
    setting,
    to_dict,
)
from muvla.utils.device import resolve_precision

logger = logging.getLogger(__name__)

PRETRAIN_MODES = (*TRAINING_MODES, "base")  # base: no V+L pre-training, the initialised model
REGION_INITS = ("tags", "random")  # how a fresh region projection starts
# ITM loss scale for an init without an MLM head (the bundled MiniLM): its fresh MLM heads start at
# ~10 nats each and drown the ITM term otherwise. The shipped MiniLM YAML configs carry the same value.
MINILM_ITM_LOSS_SCALE = 10.0


@dataclass
class PretrainConfig(TrainerSettings, OutputPolicy):
    """Pre-training run; the trainer's settings are inherited flat, so the CLI has one flag per setting."""

    out: Path = setting(help="run folder: model/, metrics.jsonl, checkpoints/, training_curves.png")
    corpus: Path | None = setting(None, help="corpus folder (regions/, text/, retrieval/, phrases/); not needed "
                                            "for mode base")
    init: str = setting("default", help="HuggingFace BERT folder or cached name, 'default' (the bundled "
                                        "MiniLM-L6-H384) or 'random'")
    model: dict[str, Any] = setting(default_factory=dict,
                                    help="ModelConfig overrides, e.g. --set model.hidden_size=64 (init random)")
    tokenizer: str | None = setting(None, help="WordPiece tokenizer folder (default: the init folder's)")
    mode: str = setting("muvla", choices=PRETRAIN_MODES,
                        help="muvla: the three granularities + curriculum; round_robin: U-VisualBERT; "
                             "base: save the initialised model only")
    tasks: list[str] = setting(default_factory=lambda: list(TASKS), choices=TASKS,
                               help="granularities trained together (rt region-tag, rn region-phrase, "
                                    "is image-sentence)")
    k: int | None = setting(None, help="use only the first k retrieved sentences per image (default: all the "
                                       "corpus retrieved)")
    warmup_samples: int = setting(100_000, help="m, in training samples over all ranks: plain loss sum before the "
                                                "ITM-weighted curriculum (the paper's one CC3M epoch is ~3M)")
    itm_negatives: str = setting("corpus", choices=ITM_NEGATIVES,
                                 help="corpus: an ITM negative is any sentence of the text store (METHOD's random "
                                      "sentence); retrieved: only sentences some image retrieved (near-positives "
                                      "when the images are alike)")
    itm_loss_scale: float = setting(1.0, help="multiplies the ITM loss term (METHOD: 1); the shipped MiniLM "
                                              "configs use 10 because MiniLM has no MLM head (README "
                                              "'Pre-training')")
    itm_weight: str = setting("per_sample", choices=ITM_WEIGHTS,
                              help="per_sample (METHOD) or batch_mean (what the reference code effectively did)")
    region_init: str = setting("tags", choices=REGION_INITS,
                               help="tags: fit a fresh region projection to the detector tags' word embeddings "
                                    "before the first step; random: BERT's N(0, 0.02)")
    mask_prob: float = setting(0.15, help="masking probability of tokens and regions")
    max_text_len: int = setting(36, help="tokens incl. [CLS]/[SEP]; also the tag-sequence limit")
    max_regions: int = setting(50, help="regions per image fed to the model (the first ones)")
    retrieval: Path | None = setting(None, help="use this retrieval (or `muvla pairs`) folder instead of "
                                                "<corpus>/retrieval")
    phrases: Path | None = setting(None, help="use this phrases folder instead of <corpus>/phrases")

    def validate(self) -> None:
        check_choices(self, "pretrain")
        if self.mode != "base" and self.corpus is None:
            raise ConfigError(f"pretrain: mode {self.mode!r} needs --corpus (a folder built by `muvla corpus`)")
        if self.corpus is not None and not Path(self.corpus).is_dir():
            raise ConfigError(f"pretrain: corpus folder {self.corpus} does not exist")
        if not self.tasks:
            raise ConfigError(f"pretrain: tasks must be a non-empty subset of {list(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"pretrain: tasks has duplicates: {self.tasks}")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"pretrain: k must be >= 1 (or null for all retrieved sentences), got {self.k}")
        if self.warmup_samples < 0:
            raise ConfigError(f"pretrain: warmup_samples must be >= 0, got {self.warmup_samples}")
        if not self.itm_loss_scale > 0:
            raise ConfigError(f"pretrain: itm_loss_scale must be > 0, got {self.itm_loss_scale}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"pretrain: mask_prob must be in (0, 1), got {self.mask_prob}")
        check_max_text_len(self.max_text_len, "pretrain: max_text_len")
        if self.max_regions < 1:
            raise ConfigError(f"pretrain: max_regions must be >= 1, got {self.max_regions}")
        if not isinstance(self.model, dict):
            raise ConfigError("pretrain: model must be a mapping of ModelConfig fields")
        unknown = set(self.model) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"pretrain: unknown model field(s) {sorted(unknown)}")
        self.train_config().validate()

    def train_config(self) -> TrainConfig:
        """The Trainer's settings; round robin and task subsets leave some heads without gradient."""
        unused = self.find_unused_parameters or self.mode == "round_robin" or set(self.tasks) != set(TASKS)
        return super().train_config(self.out, find_unused_parameters=unused)


def build_model(cfg: PretrainConfig, feature_dim: int | None, num_classes: int | None) -> Model:
    """Initialise the model (same seed on every rank; DDP broadcasts rank 0's weights anyway)."""
    overrides = dict(cfg.model)
    if feature_dim is not None:
        overrides.setdefault("region_feature_dim", feature_dim)
    if num_classes is not None:
        overrides.setdefault("num_region_classes", num_classes)
    torch.manual_seed(cfg.seed)
    if cfg.init == "random":
        return Model(ModelConfig(**overrides))
    return Model.from_bert(cfg.init, **overrides)


def load_tokenizer(cfg: PretrainConfig, model: Model) -> Any:
    from muvla.encoders import load_wordpiece_tokenizer

    if cfg.tokenizer is not None:
        return load_wordpiece_tokenizer(cfg.tokenizer)
    if model.source_path is not None:
        return load_wordpiece_tokenizer(str(model.source_path))
    return load_wordpiece_tokenizer("default")


def _num_classes(store: Any) -> int | None:
    """Region classes: classes.json names, else None (the model default)."""
    return len(store.classes) if store.classes else None


def check_corpus(cfg: PretrainConfig, layout: CorpusLayout) -> CorpusCheck:
    """Refuse (one line) a corpus whose parts disagree, or a ``k`` the corpus cannot give."""
    check = layout.verify()
    if cfg.k is not None and cfg.k > check.k:
        raise ConfigError(f"pretrain: k={cfg.k} but the corpus's {check.pairing} stage gave K={check.k} sentences "
                          f"per image ({layout.retrieval.root}); rebuild it with --k {cfg.k} or use k <= {check.k}")
    return check


def check_vocabulary(layout: CorpusLayout, tokenizer: Any) -> None:
    """Refuse (one line) a corpus whose phrase token spans were computed with another vocabulary."""
    record = BuildRecord.read(layout.phrases.root)
    recorded = record.inputs.get("tokenizer_vocab") if record is not None else None
    if recorded is not None and recorded != vocab_digest(tokenizer):
        raise ConfigError(f"pretrain: the phrase token spans of {layout.phrases.root} were computed with another "
                          "WordPiece vocabulary than this model's tokenizer; rebuild the phrases stage with "
                          "--tokenizer set to the init's tokenizer, or pre-train from a model with that vocabulary")


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or, for mode=base, just initialise) and save ``<out>/model``; returns the summary.

    A step of the protocol (``muvla.corpus.provenance``): a rerun with the same settings and corpus
    reuses the model, an interrupted one resumes from its newest checkpoint, changed settings are
    refused unless ``overwrite`` (``resume`` may lengthen the schedule: ``SCHEDULE_SETTINGS``), and a
    changed corpus or init retrains."""
    cfg.validate()
    out = Path(cfg.out)
    dist = init_distributed(cfg.device)
    layout = CorpusLayout.at(cfg.corpus, cfg.retrieval, cfg.phrases) if cfg.corpus is not None else None
    inputs = {"init": digest_model(cfg.init)}
    if layout is not None:
        inputs.update(check_corpus(cfg, layout).digests)
    sources = {"init": cfg.init, "corpus": cfg.corpus, "retrieval": cfg.retrieval, "phrases": cfg.phrases}
    settings = output_settings(cfg, exclude=("corpus", "retrieval", "phrases", "init"))
    settings["precision"] = resolve_precision(cfg.precision, dist.device)  # what auto means here is recorded
    model_dir = out / "model"
    step = Step("pretrain", out, settings, inputs, [model_dir / "config.json", model_dir / "model.safetensors"], cfg,
                sources=sources, work=[out / "checkpoints", model_dir, out / "metrics.jsonl", out / "tensorboard",
                                       out / "training_curves.png"],
                resume_may_change=SCHEDULE_SETTINGS)
    summary = run_step(step, lambda start: StepResult(_pretrain(cfg, start, layout, dist)), overwrite=cfg.overwrite,
                       rank=dist.rank, resume_requested=cfg.resume)
    barrier()
    return summary


def _pretrain(cfg: PretrainConfig, start: StageStart, layout: CorpusLayout | None, dist: Any) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, resume=start.status == "resume")  # the protocol decides, not a flag
    model_dir = Path(cfg.out) / "model"
    feature_dim = num_classes = None
    if layout is not None:
        store = layout.regions.store()
        feature_dim, num_classes = store.feature_dim, _num_classes(store)
    model = build_model(cfg, feature_dim, num_classes)
    tokenizer = load_tokenizer(cfg, model)
    if len(tokenizer) != model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model vocabulary is "
                          f"{model.config.vocab_size}; use the init checkpoint's tokenizer")

    summary: dict[str, Any] = {"mode": cfg.mode, "tasks": list(cfg.tasks),
                               "model_parameters": model.num_parameters(), "model": str(model_dir)}
    if cfg.mode == "base":
        if dist.is_main:
            model.save_pretrained(model_dir, tokenizer=tokenizer)
        return summary

    from muvla.pretraining.grounding import ground_region_projection
    from muvla.pretraining.objectives import PretrainObjectives

    assert layout is not None  # validate() requires a corpus for every mode but base
    check_vocabulary(layout, tokenizer)
    corpus = PretrainCorpus(layout, tokenizer, cfg.max_text_len, cfg.max_regions, cfg.k,
                            negatives=cfg.itm_negatives)
    if cfg.region_init == "tags" and "encoder.embeddings.region_feature_proj.weight" in model.loading_info.initialised:
        summary["region_projection_fit_regions"] = ground_region_projection(model, corpus)
    dataset = PretrainDataset(corpus)
    collate = PretrainCollator(corpus, cfg.mask_prob, neg_fraction=0.0 if cfg.mode == "round_robin" else 0.5)
    objectives = PretrainObjectives(model, cfg.tasks, cfg.mode, cfg.warmup_samples, cfg.itm_weight,
                                    cfg.itm_loss_scale)
    if dist.is_main:
        logger.info("pre-training %s on %d images (%s)", cfg.mode, len(dataset), corpus.summary()["skipped"])
    trainer = Trainer(objectives, dataset, collate, cfg.train_config(), dist_info=dist)
    train_summary = trainer.train()
    summary.update(corpus=corpus.summary(), train=train_summary,
                   training_curves=train_summary.get("training_curves"))
    if dist.is_main:
        model.save_pretrained(model_dir, tokenizer=tokenizer)
    return to_dict(summary)


def describe(summary: dict[str, Any]) -> list[str]:
    """The few lines ``muvla pretrain`` prints at the end (details in summary.json)."""
    reused = " (reused: same settings and corpus)" if summary.get("reused") else ""
    train = summary.get("train") or {}
    if not train:
        return [f"pretrain [{summary.get('mode')}]: model saved to {summary.get('model')}{reused}"]
    loss = train.get("final_loss")
    loss_text = f"{loss:.3f}" if isinstance(loss, (int, float)) else "n/a"
    lines = [f"pretrain [{summary.get('mode')}, {'+'.join(summary.get('tasks', []))}]: {train.get('steps')} steps, "
             f"final loss {loss_text}, {train.get('precision')} on {train.get('device')}{reused}",
             f"  model: {summary.get('model')}"]
    if train.get("resumed_from"):
        lines.append(f"  resumed from {train['resumed_from']}")
    if summary.get("training_curves"):
        lines.append(f"  training curves: {summary['training_curves']}")
    return lines
