"""``muvla corpus``: build the weakly-aligned corpus in one command.

regions -> text -> retrieve -> phrases (-> report). Every setting of every stage is validated
before any work starts (a typo in a retrieval setting must not surface after hours of detection).
Each stage is resumable on its own and records what it was built from, so rerunning the command
redoes only what is unfinished or stale: if retrieval is rebuilt (``--overwrite`` with new
retrieval settings), the phrases stage sees its input changed and is redone too; a stage whose own
settings differ from what is on disk is refused unless ``--overwrite`` is given.

Under several processes (torchrun, or ``--shard i --num-shards n`` on machines sharing a file
system) every process works on its own units of each stage; the main process merges a stage once
all units exist and the others wait for the merged output before the next stage, so no network
rendezvous is needed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muvla.corpus.layout import CorpusLayout
from muvla.corpus.provenance import BuildRecord, StageRun
from muvla.phrases.stage import PhrasesConfig, PhrasesSettings, run_phrases
from muvla.phrases.stage import describe as describe_phrases
from muvla.regions.stage import RegionsConfig, RegionsSettings, run_regions
from muvla.regions.stage import describe as describe_regions
from muvla.retrieval.stage import RetrievalConfig, RetrievalSettings, run_retrieval
from muvla.retrieval.stage import describe as describe_retrieval
from muvla.text.stage import TextConfig, TextSettings, run_text
from muvla.text.stage import describe as describe_text
from muvla.utils.config import ConfigError, save_config, setting
from muvla.utils.shards import ShardSpec


@dataclass
class CorpusConfig(StageRun):
    """All four stages; every stage setting lives in its section (``--set retrieval.k=10`` or ``--k 10``)."""

    out: Path = setting(help="run folder: regions/, text/, retrieval/, phrases/ and report.html go inside")
    regions: RegionsSettings = setting(default_factory=RegionsSettings, help="regions stage settings")
    text: TextSettings = setting(default_factory=TextSettings, help="text stage settings")
    retrieval: RetrievalSettings = setting(default_factory=RetrievalSettings, help="retrieval stage settings")
    phrases: PhrasesSettings = setting(default_factory=PhrasesSettings, help="phrases stage settings")
    report: bool = setting(True, help="write report.html at the end", runtime=True)
    wait_timeout_s: float = setting(7 * 24 * 3600.0, help="how long a shard waits for the others' units",
                                    runtime=True)

    def validate(self) -> None:
        """Every stage's settings and inputs, before any work."""
        for section in (self.regions, self.text, self.retrieval, self.phrases):
            section.validate()
        self.regions.check_inputs()
        self.shard_spec()

    def stage_configs(self) -> dict[str, Any]:
        """Each stage's full config, its inputs wired to the previous stage's outputs."""
        layout = CorpusLayout.at(self.out)
        run = {"overwrite": self.overwrite}
        sharded = {**run, "shard": self.shard, "num_shards": self.num_shards}

        def values(section: Any) -> dict[str, Any]:
            return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}

        return {
            "regions": RegionsConfig(out=layout.regions.root, **values(self.regions), **sharded),
            "text": TextConfig(out=layout.text.root, **values(self.text), **run),
            "retrieval": RetrievalConfig(out=layout.retrieval.root, regions=layout.regions.root,
                                         text=layout.text.root, **values(self.retrieval), **sharded),
            "phrases": PhrasesConfig(out=layout.phrases.root, retrieval=layout.retrieval.root,
                                     regions=layout.regions.root, text=layout.text.root,
                                     **values(self.phrases), **sharded),
        }


STAGES: dict[str, tuple[Callable[[Any], dict], Callable[[dict], list[str]], bool]] = {
    # name: (run, describe, sharded)
    "regions": (run_regions, describe_regions, True),
    "text": (run_text, describe_text, False),
    "retrieval": (run_retrieval, describe_retrieval, True),
    "phrases": (run_phrases, describe_phrases, True),
}


def finished(folder: Path) -> bool:
    """True once a stage output's build record says it is complete."""
    record = BuildRecord.read(folder) if Path(folder).is_dir() else None
    return record is not None and record.complete


def run_everywhere(run: Callable[[Any], dict], cfg: Any, shard: ShardSpec, sharded: bool, timeout_s: float,
                   poll_s: float = 2.0) -> dict:
    """Run one stage in this process and return once its merged output (``cfg.out``) is finished.

    Sharded stages run on every process, which then reruns them while waiting (a rerun only does
    units that became possible, and the main process merges); an unsharded stage runs on the main
    process only and the others wait for it.
    """
    deadline = time.monotonic() + timeout_s
    summary: dict = {}
    if sharded or shard.is_main:
        summary = run(cfg)
    delay = poll_s
    while not finished(Path(cfg.out)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {cfg.out}; are all shards running?")
        time.sleep(delay)
        delay = min(delay * 1.5, 30.0)
        if sharded:
            summary = run(cfg)
    return summary


def run_corpus(cfg: CorpusConfig) -> dict:
    cfg.validate()
    configs = cfg.stage_configs()  # builds (and so checks) every stage config before any work
    shard = cfg.shard_spec()
    if shard.is_main:
        save_config(cfg, cfg.out, inputs={"images": cfg.regions.images, "corpus": cfg.text.corpus,
                                          "num_shards": shard.world})
    summaries = {name: run_everywhere(run, configs[name], shard, sharded, cfg.wait_timeout_s)
                 for name, (run, _, sharded) in STAGES.items()}
    result: dict[str, Any] = {"out": str(cfg.out), "stages": summaries}
    if cfg.report and shard.is_main:
        from muvla.report.html import write_report

        result["report"] = str(write_report(Path(cfg.out)))
    return result


def describe(summary: dict) -> list[str]:
    """The few lines ``muvla corpus`` prints at the end (details in each stage's summary.json)."""
    lines = [f"corpus {summary['out']}:"]
    for name, (_, describe_stage, _) in STAGES.items():
        stage_summary = summary["stages"].get(name) or {}
        lines += ["  " + line for line in describe_stage(stage_summary)] if stage_summary else [f"  {name}: done"]
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return lines


__all__ = ["CorpusConfig", "ConfigError", "describe", "run_corpus"]
