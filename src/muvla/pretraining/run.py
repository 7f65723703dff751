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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from muvla.model import Model, ModelConfig
from muvla.pretraining.objectives import ITM_WEIGHTS, TASKS
from muvla.training import TrainConfig, Trainer, TrainerSettings
from muvla.training.distributed import barrier, init_distributed
from muvla.utils.config import ConfigError, save_config, to_dict
from muvla.utils.shards import atomic_file

logger = logging.getLogger(__name__)

PRETRAIN_MODES = ("muvla", "round_robin", "base")
REGION_INITS = ("tags", "random")


@dataclass
class PretrainConfig(TrainerSettings):
    """Pre-training run; the trainer's settings are inherited flat, so the CLI has one flag per setting."""

    out: Path
    corpus: Path | None = None  # corpus folder (regions/, text/, retrieval/, phrases/); not needed for base
    init: str = "default"  # HF BERT folder or cached name, 'default' (bundled MiniLM-L6-H384) or 'random'
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (sizes for init=random)
    tokenizer: str | None = None  # WordPiece tokenizer folder; None = the init folder (random: 'default')
    mode: str = "muvla"  # muvla | round_robin | base
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # subset of rt, rn, is
    k: int | None = None  # use only the first k retrieved sentences per image (None = all)
    warmup_samples: int = 0  # m, in training samples (all ranks): plain loss sum before the curriculum
    itm_weight: str = "per_sample"  # per_sample | batch_mean (the reference code's effective weight)
    region_init: str = "tags"  # tags: fit a fresh region projection to the tags' word embeddings | random
    mask_prob: float = 0.15
    max_text_len: int = 36  # tokens incl. [CLS]/[SEP]; also the tag-sequence limit
    max_regions: int = 50
    retrieval: Path | None = None  # override <corpus>/retrieval (baseline pairings from `muvla pairs`)
    phrases: Path | None = None  # override <corpus>/phrases
    def validate(self) -> None:
        if self.mode not in PRETRAIN_MODES:
            raise ConfigError(f"pretrain: mode must be one of {PRETRAIN_MODES}, got {self.mode!r}")
        if self.mode != "base" and self.corpus is None:
            raise ConfigError(f"pretrain: mode {self.mode!r} needs --corpus (a folder built by `muvla corpus`)")
        if self.corpus is not None and not Path(self.corpus).is_dir():
            raise ConfigError(f"pretrain: corpus folder {self.corpus} does not exist")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"pretrain: tasks must be a non-empty subset of {list(TASKS)}, got {self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"pretrain: tasks has duplicates: {self.tasks}")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"pretrain: k must be >= 1 (or null for all retrieved sentences), got {self.k}")
        if self.warmup_samples < 0:
            raise ConfigError(f"pretrain: warmup_samples must be >= 0, got {self.warmup_samples}")
        if self.region_init not in REGION_INITS:
            raise ConfigError(f"pretrain: region_init must be one of {REGION_INITS}, got {self.region_init!r}")
        if self.itm_weight not in ITM_WEIGHTS:
            raise ConfigError(f"pretrain: itm_weight must be one of {ITM_WEIGHTS}, got {self.itm_weight!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"pretrain: mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.max_text_len < 3:
            raise ConfigError(f"pretrain: max_text_len must be >= 3, got {self.max_text_len}")
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
    dim = overrides.pop("region_feature_dim", 1280)
    classes = overrides.pop("num_region_classes", 1000)
    return Model.from_bert(cfg.init, region_feature_dim=dim, num_region_classes=classes, **overrides)


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


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or, for mode=base, just initialise) and save ``<out>/model``; returns the summary."""
    cfg.validate()
    out = Path(cfg.out)
    dist = init_distributed(cfg.device)
    model_dir = out / "model"

    corpus = None
    feature_dim = num_classes = None
    if cfg.corpus is not None:
        from muvla.corpus.regions import RegionStore

        store = RegionStore(Path(cfg.corpus) / "regions")
        feature_dim, num_classes = store.feature_dim, _num_classes(store)
    model = build_model(cfg, feature_dim, num_classes)
    tokenizer = load_tokenizer(cfg, model)
    if len(tokenizer) != model.config.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the model vocabulary is "
                          f"{model.config.vocab_size}; use the init checkpoint's tokenizer")

    summary: dict[str, Any] = {"stage": "pretrain", "mode": cfg.mode, "tasks": list(cfg.tasks),
                               "model_parameters": model.num_parameters(), "model": str(model_dir)}
    if cfg.mode == "base":
        if dist.is_main:
            model.save_pretrained(model_dir, tokenizer=tokenizer)
            _finish(cfg, out, summary)
        barrier()
        return summary

    from muvla.pretraining.data import PretrainCollator, PretrainCorpus, PretrainDataset
    from muvla.pretraining.objectives import PretrainObjectives

    corpus = PretrainCorpus(cfg.corpus, tokenizer, cfg.max_text_len, cfg.max_regions, cfg.k,
                            retrieval_dir=cfg.retrieval, phrases_dir=cfg.phrases)
    if cfg.region_init == "tags" and "encoder.embeddings.region_feature_proj.weight" in model.loading_info.initialised:
        from muvla.pretraining.grounding import ground_region_projection

        summary["region_projection_fit_regions"] = ground_region_projection(model, corpus)
    dataset = PretrainDataset(corpus)
    collate = PretrainCollator(corpus, cfg.mask_prob, neg_fraction=0.0 if cfg.mode == "round_robin" else 0.5)
    objectives = PretrainObjectives(model, cfg.tasks, cfg.mode, cfg.warmup_samples, cfg.itm_weight)
    if dist.is_main:
        logger.info("pre-training %s on %d images (%s)", cfg.mode, len(dataset), corpus.summary()["skipped"])
    trainer = Trainer(objectives, dataset, collate, cfg.train_config(), dist_info=dist)
    train_summary = trainer.train()
    summary.update(corpus=corpus.summary(), train=train_summary,
                   training_curves=train_summary.get("training_curves"))
    if dist.is_main:
        model.save_pretrained(model_dir, tokenizer=tokenizer)
        _finish(cfg, out, summary)
    barrier()
    return summary


def _finish(cfg: PretrainConfig, out: Path, summary: dict[str, Any]) -> None:
    inputs = {"corpus": cfg.corpus, "retrieval": cfg.retrieval, "phrases": cfg.phrases, "init": cfg.init}
    save_config(cfg, out, inputs=inputs)
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(to_dict(summary), indent=2, default=str) + "\n", encoding="utf-8")
