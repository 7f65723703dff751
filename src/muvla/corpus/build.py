"""``muvla corpus``: build the weakly-aligned corpus in one command.

regions -> text -> retrieve -> phrases (-> report). Each stage is resumable on its own, so rerunning
the command after a crash redoes only unfinished work units. Under several processes (torchrun, or
``--shard i --num-shards n`` started by hand on several machines sharing a file system) every process
works on its own units of each stage; the main process merges a stage once all units exist and the
others wait for the merged file before they start the next stage, so no network rendezvous is needed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muvla.utils.config import ConfigError, from_dict, save_config
from muvla.utils.shards import ShardSpec, resolve_shard


@dataclass
class CorpusConfig:
    """All four stages; per-stage settings go in the nested sections (any field of that stage's config)."""

    out: Path  # run folder: regions/, text/, retrieval/, phrases/ and report.html go inside
    images: Path | None = None  # folder of image files (detector and coco-instances backends)
    corpus: list[Path] = field(default_factory=list)  # text files: plain, CC3M .tsv, COCO .json, book .txt
    backend: str = "detector"  # detector | coco-instances | vinvl-tsv | butd-tsv
    coco_instances: Path | None = None  # COCO instances JSON (coco-instances backend)
    vinvl_features: Path | None = None  # VinVL features.tsv
    vinvl_predictions: Path | None = None  # VinVL predictions.tsv
    butd_tsv: Path | None = None  # bottom-up-attention TSV
    k: int = 5  # sentences retrieved per image
    query_mode: str = "official"  # official (de-duplicated tags) | counted (keeps tag counts)
    report: bool = True  # write report.html at the end
    shard: int | None = None  # this process's shard (default: RANK from torchrun, else 0)
    num_shards: int | None = None  # number of shards (default: WORLD_SIZE from torchrun, else 1)
    wait_timeout_s: float = 7 * 24 * 3600.0  # how long a shard waits for the others' units
    regions: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    retrieval: dict[str, Any] = field(default_factory=dict)
    phrases: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("corpus: give at least one text file with --corpus FILE ...")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")


def _with_shard(cfg_cls: type, values: dict[str, Any], shard: ShardSpec) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    if "shard" in names:
        values = {**values, "shard": shard.rank, "num_shards": shard.world}
    return values


def stage_settings(cfg: CorpusConfig, shard: ShardSpec) -> dict[str, tuple[type, dict[str, Any]]]:
    """Each stage's config class and values, wiring its inputs to the previous stage's outputs.

    The configs are built only when their stage starts, because validation checks that the
    inputs (the previous stage's outputs) exist.
    """
    from muvla.phrases.stage import PhrasesConfig
    from muvla.regions.stage import RegionsConfig
    from muvla.retrieval.stage import RetrievalConfig
    from muvla.text.stage import TextConfig

    out = Path(cfg.out)
    regions = {
        "backend": cfg.backend, "images": cfg.images, "coco_instances": cfg.coco_instances,
        "vinvl_features": cfg.vinvl_features, "vinvl_predictions": cfg.vinvl_predictions,
        "butd_tsv": cfg.butd_tsv,
        **cfg.regions, "out": out / "regions",
    }
    regions = {k: v for k, v in regions.items() if v is not None}
    text = {"corpus": cfg.corpus, **cfg.text, "out": out / "text"}
    retrieval = {"k": cfg.k, "query_mode": cfg.query_mode, **cfg.retrieval,
                 "regions": out / "regions", "text": out / "text", "out": out / "retrieval"}
    phrases = {**cfg.phrases, "retrieval": out / "retrieval", "regions": out / "regions",
               "text": out / "text", "out": out / "phrases"}
    return {
        "regions": (RegionsConfig, _with_shard(RegionsConfig, regions, shard)),
        "text": (TextConfig, text),
        "retrieval": (RetrievalConfig, _with_shard(RetrievalConfig, retrieval, shard)),
        "phrases": (PhrasesConfig, _with_shard(PhrasesConfig, phrases, shard)),
    }


# The file each stage writes last, once all its work units are merged.
STAGE_DONE_MARKER = {
    "regions": "index.parquet",
    "text": "sentences.parquet",
    "retrieval": "topk.parquet",
    "phrases": "matches.parquet",
}


def _run_stage(name: str, run: Callable[[Any], dict], settings: tuple[type, dict[str, Any]],
               shard: ShardSpec, timeout_s: float, poll_s: float = 2.0) -> dict:
    """Run one stage in this process and return once its merged output exists."""
    cfg_cls, values = settings
    stage_cfg = from_dict(cfg_cls, values)
    sharded = "shard" in values
    marker = Path(stage_cfg.out) / STAGE_DONE_MARKER[name]
    deadline = time.monotonic() + timeout_s
    summary: dict = {}
    if sharded or shard.is_main:
        summary = run(stage_cfg)
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: waited {timeout_s:.0f}s for {marker}; are all shards running?")
        time.sleep(poll_s)
        if shard.is_main and sharded:  # merge as soon as the other shards' units have appeared
            summary = run(stage_cfg)
    return summary


def run_corpus(cfg: CorpusConfig) -> dict:
    from muvla.phrases.stage import run_phrases
    from muvla.regions.stage import run_regions
    from muvla.retrieval.stage import run_retrieval
    from muvla.text.stage import run_text

    cfg.validate()
    shard = resolve_shard(cfg.shard, cfg.num_shards)
    settings = stage_settings(cfg, shard)
    if shard.is_main:
        save_config(cfg, cfg.out, inputs={"images": cfg.images, "corpus": cfg.corpus,
                                          "num_shards": shard.world})
    runs = {"regions": run_regions, "text": run_text, "retrieval": run_retrieval, "phrases": run_phrases}
    summaries = {name: _run_stage(name, run, settings[name], shard, cfg.wait_timeout_s)
                 for name, run in runs.items()}
    result: dict[str, Any] = {"out": str(cfg.out), "stages": summaries}
    if cfg.report and shard.is_main:
        from muvla.report.html import write_report

        result["report"] = str(write_report(Path(cfg.out)))
    return result
