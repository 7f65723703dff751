"""Text stage: turn raw text-only corpora into one clean, de-duplicated ``sentences.parquet``.

The retrieval stage indexes these sentences; ``sentence_id`` is the row number, so it must be
contiguous and stable. Every dropped line is counted per source in ``summary.json`` (and invalid
UTF-8 rejections are listed in ``rejected.jsonl``) so nothing is lost silently.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from muvla.text.readers import (
    FORMATS,
    READERS,
    detect_format,
    fix_utf8,
    normalise,
    parse_corpus_entry,
)
from muvla.utils.config import ConfigError, save_config
from muvla.utils.shards import atomic_file, clean_stale_tmp

SCHEMA = pa.schema([("sentence_id", pa.int64()), ("text", pa.string()), ("source", pa.string())])
_FLUSH_ROWS = 100_000


@dataclass
class TextConfig:
    """Inputs and cleaning rules of the text stage.

    ``corpus`` entries may carry a format prefix (``book:path``); ``formats``, when given, is a
    per-file list parallel to ``corpus``; otherwise ``format`` (default ``auto``) applies.
    """

    out: Path
    corpus: list[Path] = field(default_factory=list)
    format: str = "auto"
    formats: list[str] | None = None
    invalid_utf8: str = "replace"  # "replace": repair with U+FFFD and count; "reject": drop the line, record it
    min_words: int = 1
    max_chars: int = 1000  # longer items are dropped and counted (a runaway "sentence" is not a caption)
    dedupe: bool = True

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("text: 'corpus' needs at least one input file")
        allowed = ("auto", *FORMATS)
        if self.format not in allowed:
            raise ConfigError(f"text: format {self.format!r} not in {allowed}")
        if self.formats is not None:
            if len(self.formats) != len(self.corpus):
                raise ConfigError(f"text: 'formats' has {len(self.formats)} entries for {len(self.corpus)} corpus files")
            bad = [f for f in self.formats if f not in allowed]
            if bad:
                raise ConfigError(f"text: unknown format(s) {bad}; allowed {allowed}")
        if self.invalid_utf8 not in ("replace", "reject"):
            raise ConfigError(f"text: invalid_utf8 must be 'replace' or 'reject', got {self.invalid_utf8!r}")
        if self.min_words < 1:
            raise ConfigError(f"text: min_words must be >= 1, got {self.min_words}")
        if self.max_chars < 1:
            raise ConfigError(f"text: max_chars must be >= 1, got {self.max_chars}")
        for _, path in self.inputs():
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


def _new_counts(fmt: str) -> dict[str, Any]:
    return {"format": fmt, "items_read": 0, "empty_dropped": 0, "invalid_utf8_repaired": 0,
            "invalid_utf8_rejected": 0, "too_short_dropped": 0, "too_long_dropped": 0,
            "duplicates_dropped": 0, "kept": 0}


def run_text(cfg: TextConfig) -> dict[str, Any]:
    """Read, clean and de-duplicate every corpus file into ``<out>/sentences.parquet``."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    inputs = cfg.inputs()
    save_config(cfg, out, inputs={"corpus": [{"format": f, "path": str(p)} for f, p in inputs]})

    t0 = time.time()
    seen: set[bytes] = set()
    per_source: dict[str, dict[str, Any]] = {}
    next_id = 0
    buf_text: list[str] = []
    buf_source: list[str] = []

    def flush(writer: pq.ParquetWriter) -> None:
        nonlocal next_id
        if not buf_text:
            return
        ids = pa.array(range(next_id, next_id + len(buf_text)), type=pa.int64())
        writer.write_table(pa.Table.from_arrays([ids, pa.array(buf_text, pa.string()),
                                                 pa.array(buf_source, pa.string())], schema=SCHEMA))
        next_id += len(buf_text)
        buf_text.clear()
        buf_source.clear()

    with atomic_file(out / "rejected.jsonl") as rej_tmp, open(rej_tmp, "w", encoding="utf-8") as rej, \
            atomic_file(out / "sentences.parquet") as tmp, pq.ParquetWriter(tmp, SCHEMA) as writer:
        for fmt, path in inputs:
            source = str(path)
            counts = per_source.setdefault(source, _new_counts(fmt))
            for item in READERS[fmt](path):
                counts["items_read"] += 1
                text = item.text
                if item.bad_utf8:
                    if cfg.invalid_utf8 == "reject":
                        counts["invalid_utf8_rejected"] += 1
                        rej.write(json.dumps({"file": source, "line": item.line, "reason": "invalid UTF-8"}) + "\n")
                        continue
                    text = fix_utf8(text)
                    counts["invalid_utf8_repaired"] += 1
                text = normalise(text)
                if not text:
                    counts["empty_dropped"] += 1
                    continue
                if len(text.split(" ")) < cfg.min_words:
                    counts["too_short_dropped"] += 1
                    continue
                if len(text) > cfg.max_chars:
                    counts["too_long_dropped"] += 1
                    continue
                if cfg.dedupe:
                    key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                    if key in seen:
                        counts["duplicates_dropped"] += 1
                        continue
                    seen.add(key)
                counts["kept"] += 1
                buf_text.append(text)
                buf_source.append(source)
                if len(buf_text) >= _FLUSH_ROWS:
                    flush(writer)
            flush(writer)

    summary = {
        "stage": "text",
        "sentences": next_id,
        "sources": per_source,
        "invalid_utf8": cfg.invalid_utf8,
        "seconds": round(time.time() - t0, 3),
    }
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def read_sentences(text_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """The text stage's ``sentences.parquet`` (clear error when the stage has not run)."""
    path = Path(text_dir) / "sentences.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the text stage first (muvla text ...)")
    return pq.read_table(path, columns=columns)
