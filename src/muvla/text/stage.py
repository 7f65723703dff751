"""Text stage: turn raw text-only corpora into one clean, de-duplicated ``sentences.parquet``.

The retrieval stage indexes these sentences; ``sentence_id`` is the row number, so it must be
contiguous and stable. Nothing is lost silently: empty lines and exact duplicates are counted per
source in ``summary.json``; every other dropped line (invalid UTF-8 in ``reject`` mode, too short,
too long, a malformed TSV row, an annotation without a caption) is counted AND recorded in
``rejected.jsonl`` with its file and line; a file that is not in its format at all is recorded
there too and skipped, while the other files still go through (the run fails only when no file is
usable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from muvla.corpus.captions import normalise_caption
from muvla.corpus.layout import TextOutput
from muvla.corpus.provenance import OutputPolicy, Step, StepResult, digest_file, run_step
from muvla.text.readers import (
    FORMATS,
    READERS,
    BadCorpusFile,
    detect_format,
    fix_utf8,
    parse_corpus_entry,
)
from muvla.utils.config import ConfigError, check_choices, output_settings, setting
from muvla.utils.shards import atomic_file, clean_stale_tmp

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TextSettings:
    """Inputs and cleaning rules of the text stage.

    ``corpus`` entries may carry a format prefix (``book:path``); ``formats``, when given, is a
    per-file list parallel to ``corpus``; otherwise ``format`` (default ``auto``) applies.
    """

    corpus: list[Path] = setting(default_factory=list,
                                 help="text files: plain (a sentence a line), CC3M .tsv, COCO captions .json, "
                                      "book .txt; prefix one with 'book:' etc. to force its format")
    format: str = setting("auto", choices=("auto", *FORMATS), help="format of every corpus file")
    formats: list[str] | None = setting(None, choices=("auto", *FORMATS),
                                        help="one format per corpus file (overrides --format)")
    invalid_utf8: str = setting("replace", choices=("replace", "reject"),
                                help="replace: repair bad bytes with U+FFFD and count them; reject: drop "
                                     "the line and record it")
    min_words: int = setting(1, help="shorter items are dropped and recorded")
    max_chars: int = setting(1000, help="longer items are dropped and recorded (a runaway 'sentence' is not a "
                                        "caption)")
    dedupe: bool = setting(True, help="drop exact duplicates after whitespace normalisation (counted)")

    def validate(self) -> None:
        check_choices(self, "text")
        if not self.corpus:
            raise ConfigError("text: give at least one corpus file (--corpus FILE ...)")
        if self.formats is not None and len(self.formats) != len(self.corpus):
            raise ConfigError(f"text: 'formats' has {len(self.formats)} entries for {len(self.corpus)} corpus files")
        if self.min_words < 1:
            raise ConfigError(f"text: min_words must be >= 1, got {self.min_words}")
        if self.max_chars < 1:
            raise ConfigError(f"text: max_chars must be >= 1, got {self.max_chars}")
        for entry in self.corpus:
            prefix, path = parse_corpus_entry(entry)
            if not path.exists():
                raise ConfigError(f"text: corpus file {path} does not exist")
            if not path.is_file():
                raise ConfigError(f"text: corpus entry {path} is not a file")

    def inputs(self) -> list[tuple[str, Path]]:
        """(format, path) of every corpus file, with ``auto`` resolved."""
        result = []
        for i, entry in enumerate(self.corpus):
            prefix, path = parse_corpus_entry(entry)
            fmt = prefix or (self.formats[i] if self.formats is not None else self.format)
            if fmt == "auto":
                fmt = detect_format(path) if path.is_file() else "auto"
            result.append((fmt, path))
        return result


@dataclass
class TextConfig(TextSettings, OutputPolicy):
    """``muvla text``: the settings plus where the sentence store goes."""

    out: Path = setting(help="output folder (sentences.parquet, rejected.jsonl, summary.json)")


def _new_counts(fmt: str) -> dict[str, Any]:
    return {"format": fmt, "items_read": 0, "empty_dropped": 0, "invalid_utf8_repaired": 0,
            "invalid_utf8_rejected": 0, "too_short_dropped": 0, "too_long_dropped": 0, "malformed_dropped": 0,
            "duplicates_dropped": 0, "kept": 0}


@dataclass
class _Cleaner:
    """Applies the cleaning rules to one item at a time, counting and recording every drop."""

    cfg: TextSettings
    rejected: TextIO
    seen: set[bytes] = field(default_factory=set)

    def _reject(self, counts: dict[str, Any], key: str, source: str, line: int, reason: str) -> None:
        counts[key] += 1
        self.rejected.write(json.dumps({"file": source, "line": line, "reason": reason}, ensure_ascii=False) + "\n")

    def clean(self, item: Any, source: str, counts: dict[str, Any]) -> str | None:
        counts["items_read"] += 1
        if item.problem is not None:
            self._reject(counts, "malformed_dropped", source, item.line, item.problem)
            return None
        text = item.text
        if item.bad_utf8:
            if self.cfg.invalid_utf8 == "reject":
                self._reject(counts, "invalid_utf8_rejected", source, item.line, "invalid UTF-8")
                return None
            text = fix_utf8(text)
            counts["invalid_utf8_repaired"] += 1
        text = normalise_caption(text)  # the one normal form of every stored sentence
        if not text:
            counts["empty_dropped"] += 1
            return None
        if len(text.split(" ")) < self.cfg.min_words:
            self._reject(counts, "too_short_dropped", source, item.line, f"fewer than {self.cfg.min_words} word(s)")
            return None
        if len(text) > self.cfg.max_chars:
            self._reject(counts, "too_long_dropped", source, item.line,
                         f"too long ({len(text)} characters > max_chars={self.cfg.max_chars})")
            return None
        if self.cfg.dedupe:
            key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if key in self.seen:
                counts["duplicates_dropped"] += 1
                return None
            self.seen.add(key)
        counts["kept"] += 1
        return text


def run_text(cfg: TextConfig) -> dict[str, Any]:
    """Read, clean and de-duplicate every corpus file into ``<out>/sentences.parquet``."""
    cfg.validate()
    output = TextOutput(Path(cfg.out))
    inputs = cfg.inputs()
    step = Step("text", output.root, output_settings(cfg, exclude=("corpus",)),
                {f"{i}:{fmt}:{path.name}": digest_file(path) for i, (fmt, path) in enumerate(inputs)},
                output.outputs(), cfg, sources={f"{i}:{fmt}:{path.name}": path for i, (fmt, path) in enumerate(inputs)},
                work=[output.rejected])
    return run_step(step, lambda _start: StepResult(_read_corpora(cfg, output, inputs)), overwrite=cfg.overwrite)


def _read_corpora(cfg: TextConfig, output: TextOutput, inputs: list[tuple[str, Path]]) -> dict[str, Any]:
    clean_stale_tmp(output.root)
    t0 = time.time()
    per_source: dict[str, dict[str, Any]] = {}
    bad_files: list[dict[str, str]] = []
    with atomic_file(output.rejected) as rej_tmp, open(rej_tmp, "w", encoding="utf-8") as rejected, \
            output.writer() as writer:
        cleaner = _Cleaner(cfg, rejected)
        for fmt, path in inputs:
            source = str(path)
            counts = per_source.setdefault(source, _new_counts(fmt))
            try:
                for item in READERS[fmt](path):
                    text = cleaner.clean(item, source, counts)
                    if text is not None:
                        writer.add(text, source)
            except BadCorpusFile as err:
                logger.warning("text: skipping %s", err)
                counts["file_rejected"] = str(err)
                bad_files.append({"file": source, "reason": str(err)})
                rejected.write(json.dumps({"file": source, "line": None, "reason": str(err)}) + "\n")
    n_sentences = writer.count
    if len(bad_files) == len(inputs):
        raise ConfigError(f"text: no usable corpus file ({'; '.join(b['reason'] for b in bad_files)})")
    return {
        "sentences": n_sentences,
        "sources": per_source,
        "files_rejected": bad_files,
        "dropped_and_recorded": sum(c[k] for c in per_source.values() for k in
                                    ("invalid_utf8_rejected", "too_short_dropped", "too_long_dropped",
                                     "malformed_dropped")),
        "invalid_utf8": cfg.invalid_utf8,
        "seconds": round(time.time() - t0, 3),
    }


def describe(summary: dict[str, Any]) -> list[str]:
    """The few lines ``muvla text`` prints at the end (details in summary.json)."""
    drops: Counter[str] = Counter()
    for counts in summary.get("sources", {}).values():
        for key in ("empty_dropped", "duplicates_dropped", "too_short_dropped", "too_long_dropped",
                    "malformed_dropped", "invalid_utf8_rejected"):
            drops[key] += counts.get(key, 0)
    lines = [f"text: {summary.get('sentences')} sentences from {len(summary.get('sources', {}))} file(s)"
             + (" (reused: already built)" if summary.get("reused") else "")]
    dropped = ", ".join(f"{n} {k.replace('_dropped', '').replace('_', ' ')}" for k, n in drops.items() if n)
    if dropped:
        lines.append(f"  dropped: {dropped} (all but empty lines and duplicates are listed in rejected.jsonl)")
    for bad in summary.get("files_rejected", []):
        lines.append(f"  skipped file: {bad['reason']}")
    return lines
