"""Phrases stage: noun phrases of retrieved sentences and region-phrase matching (METHOD.md section 3).

Two unit kinds, both resumable and shardable like the other stages:
- phrase units over the sorted distinct retrieved sentence ids: spaCy ``noun_chunks`` with their
  character spans, and the WordPiece token span of each phrase (tokens whose offsets overlap the
  phrase; no special tokens) -> ``parts/phrases-part-XXXXX.parquet``;
- match units over images: for each (image, rank) every region tag is compared with every phrase of
  the sentence by Sentence-BERT cosine; a region keeps its best phrase and that similarity clipped
  to [0, 1] -> ``parts/matches-part-XXXXX.parquet``.
Match units need all phrase units: a rank matches its own units only once every phrase unit exists
(otherwise its summary says ``waiting_for_shards``); rank 0, once phrases are complete, also matches
any unit still missing and merges. A rank-0 rerun after the other shards finished completes the job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from muvla import encoders
from muvla.retrieval.stage import read_region_tags, region_index_path
from muvla.text.stage import read_sentences
from muvla.utils.config import ConfigError, save_config
from muvla.utils.progress import progress
from muvla.utils.shards import atomic_file, clean_stale_tmp, resolve_shard, unit_name, unit_ranges

PHRASES_SCHEMA = pa.schema([
    ("sentence_id", pa.int64()),
    ("phrases", pa.list_(pa.string())),
    ("char_spans", pa.list_(pa.list_(pa.int32(), 2))),
    ("token_spans", pa.list_(pa.list_(pa.int32(), 2))),
])
MATCHES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("rank", pa.int32()),
    ("sentence_id", pa.int64()),
    ("region_phrase", pa.list_(pa.int32())),
    ("region_sim", pa.list_(pa.float32())),
])


@dataclass
class PhrasesConfig:
    """Inputs default to the regions/text folders recorded in the retrieval folder's config.yaml."""

    out: Path
    retrieval: Path
    regions: Path | None = None
    text: Path | None = None
    spacy_model: str = "auto"
    model: str = "default"  # Sentence-BERT for tag-phrase similarity
    tokenizer: str = "default"  # WordPiece tokenizer whose token spans the pre-training model uses
    batch_size: int = 256
    unit_size: int = 512
    device: str = "cpu"
    shard: int | None = None
    num_shards: int | None = None

    def validate(self) -> None:
        if self.batch_size < 1 or self.unit_size < 1:
            raise ConfigError("phrases: batch_size and unit_size must be >= 1")
        if not (Path(self.retrieval) / "topk.parquet").exists():
            raise ConfigError(f"phrases: {Path(self.retrieval) / 'topk.parquet'} not found (run the retrieval stage)")
        try:
            resolve_shard(self.shard, self.num_shards)
        except ValueError as err:
            raise ConfigError(f"phrases: {err}") from err

    def resolved_inputs(self) -> tuple[Path, Path]:
        """(regions, text): explicit values, else those recorded by the retrieval stage."""
        regions, text = self.regions, self.text
        if regions is None or text is None:
            cfg_path = Path(self.retrieval) / "config.yaml"
            if not cfg_path.exists():
                raise ConfigError(f"phrases: give regions and text, or a retrieval folder with config.yaml ({cfg_path})")
            recorded = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}).get("config", {})
            regions = regions if regions is not None else Path(recorded["regions"])
            text = text if text is not None else Path(recorded["text"])
        if not region_index_path(regions).exists():
            raise ConfigError(f"phrases: region index {region_index_path(regions)} not found")
        if not (Path(text) / "sentences.parquet").exists():
            raise ConfigError(f"phrases: {Path(text) / 'sentences.parquet'} not found")
        return Path(regions), Path(text)


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens whose character offsets overlap [start, end); (-1, -1) if none."""
    hit = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    return (hit[0], hit[-1] + 1) if hit else (-1, -1)


def extract_phrases(texts: list[str], spacy_model: str = "auto", tokenizer: str = "default",
                    batch_size: int = 256) -> list[dict[str, Any]]:
    """Noun chunks with char spans and WordPiece token spans for each text (same order as ``texts``)."""
    nlp = encoders.load_spacy(spacy_model)
    tok = encoders.load_wordpiece_tokenizer(tokenizer)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False) if texts else None
    results = []
    for j, doc in enumerate(nlp.pipe(texts, batch_size=batch_size)):
        offsets = [tuple(o) for o in enc["offset_mapping"][j]]
        phrases, chars, toks = [], [], []
        for chunk in doc.noun_chunks:
            span = token_span(offsets, chunk.start_char, chunk.end_char)
            if span[0] < 0:  # a chunk of characters the tokenizer drops entirely (e.g. control chars)
                continue
            phrases.append(chunk.text)
            chars.append([chunk.start_char, chunk.end_char])
            toks.append(list(span))
        results.append({"phrases": phrases, "char_spans": chars, "token_spans": toks})
    return results


class EmbeddingCache:
    """Sentence-BERT embeddings of short strings (tags, phrases), each encoded once per process."""

    def __init__(self, model: str, device: str, batch_size: int) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.vectors: dict[str, np.ndarray] = {}

    def get(self, strings: list[str]) -> np.ndarray:
        new = [s for s in dict.fromkeys(strings) if s not in self.vectors]
        if new:
            emb = encoders.encode(new, batch_size=self.batch_size, model=self.model, device=self.device)
            self.vectors.update(zip(new, emb))
        if not strings:
            return np.zeros((0, encoders.embedding_dim(self.model, self.device)), dtype=np.float32)
        return np.stack([self.vectors[s] for s in strings])


def match_regions(tags: list[str], phrases: list[str], cache: EmbeddingCache) -> tuple[list[int], list[float]]:
    """Per region: index of the most similar phrase (-1 if none / empty tag) and its cosine clipped to [0, 1]."""
    if not tags:
        return [], []
    if not phrases:
        return [-1] * len(tags), [0.0] * len(tags)
    valid = [i for i, t in enumerate(tags) if t and t.strip()]
    best = [-1] * len(tags)
    sims = [0.0] * len(tags)
    if valid:
        sim = cache.get([tags[i] for i in valid]) @ cache.get(phrases).T
        arg = sim.argmax(axis=1)
        top = np.clip(sim[np.arange(len(valid)), arg], 0.0, 1.0)
        for row, i in enumerate(valid):
            best[i] = int(arg[row])
            sims[i] = float(top[row])
    return best, sims


def _write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def run_phrases(cfg: PhrasesConfig) -> dict[str, Any]:
    """Parse every retrieved sentence, then match each image's region tags to its sentences' phrases."""
    cfg.validate()
    regions, text = cfg.resolved_inputs()
    spec = resolve_shard(cfg.shard, cfg.num_shards)
    out = Path(cfg.out)
    parts = out / "parts"
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(parts)
    clean_stale_tmp(out)
    if spec.is_main:
        save_config(cfg, out, inputs={"retrieval": str(cfg.retrieval), "regions": str(regions), "text": str(text)})

    topk = pq.read_table(Path(cfg.retrieval) / "topk.parquet")
    sentence_ids = np.unique(topk.column("sentence_id").to_numpy()).astype(np.int64)
    all_texts = read_sentences(text, columns=["text"]).column("text")
    if sentence_ids.size and sentence_ids[-1] >= len(all_texts):
        raise ConfigError(f"phrases: topk.parquet refers to sentence {sentence_ids[-1]} but {text} has "
                          f"{len(all_texts)} sentences; retrieval and text folders do not belong together")

    # Phase 1: phrase units (sentences).
    t0 = time.time()
    phrase_ranges = unit_ranges(len(sentence_ids), cfg.unit_size)
    parsed_now = 0
    for u in progress(range(len(phrase_ranges)), desc="noun phrases", unit="unit"):
        path = parts / f"phrases-{unit_name(u)}.parquet"
        if not spec.owns(u) or path.exists():
            continue
        start, stop = phrase_ranges[u]
        ids = sentence_ids[start:stop]
        texts = [all_texts[int(i)].as_py() for i in ids]
        rows = extract_phrases(texts, cfg.spacy_model, cfg.tokenizer, cfg.batch_size)
        _write_parquet(path, pa.Table.from_pylist(
            [{"sentence_id": int(i), **r} for i, r in zip(ids, rows)], schema=PHRASES_SCHEMA))
        parsed_now += len(ids)
    parse_seconds = time.time() - t0

    summary: dict[str, Any] = {"stage": "phrases", "shard": spec.rank, "num_shards": spec.world,
                               "sentences_parsed_now": parsed_now,
                               "parse_sentences_per_s": round(parsed_now / parse_seconds, 1) if parsed_now else None}
    missing = [u for u in range(len(phrase_ranges)) if not (parts / f"phrases-{unit_name(u)}.parquet").exists()]
    if missing:
        summary.update(status="waiting_for_shards", missing_phrase_units=missing)
        _write_summary(out, spec.rank, summary)
        return summary

    phrase_tables = [pq.read_table(parts / f"phrases-{unit_name(u)}.parquet") for u in range(len(phrase_ranges))]
    phrase_table = pa.concat_tables(phrase_tables) if phrase_tables else PHRASES_SCHEMA.empty_table()
    phrases_of = dict(zip(phrase_table.column("sentence_id").to_pylist(), phrase_table.column("phrases").to_pylist()))

    # Phase 2: match units over images in topk order.
    image_ids, image_tags = read_region_tags(regions)
    tags_of = dict(zip(image_ids, image_tags))
    topk_images = topk.column("image_id").to_pylist()
    ordered_images = list(dict.fromkeys(topk_images))
    unknown = [i for i in ordered_images if i not in tags_of]
    if unknown:
        raise ConfigError(f"phrases: {len(unknown)} image(s) of topk.parquet are not in the region index "
                          f"{region_index_path(regions)} (e.g. {unknown[:3]})")
    rows_of: dict[str, list[tuple[int, int]]] = {}
    for image_id, rank, sid in zip(topk_images, topk.column("rank").to_pylist(), topk.column("sentence_id").to_pylist()):
        rows_of.setdefault(image_id, []).append((rank, sid))
    cache = EmbeddingCache(cfg.model, cfg.device, cfg.batch_size)
    match_ranges = unit_ranges(len(ordered_images), cfg.unit_size)
    t0 = time.time()
    matched_now = 0
    # Own units first; rank 0 then also does any unit still missing, because a rank that ran before
    # all phrase units existed could not match (no rank ever waits on another one's rerun).
    own = [u for u in range(len(match_ranges)) if spec.owns(u)]
    others = [u for u in range(len(match_ranges)) if not spec.owns(u)] if spec.is_main else []
    for u in progress(own + others, desc="region-phrase matching", unit="unit"):
        path = parts / f"matches-{unit_name(u)}.parquet"
        if path.exists():
            continue
        start, stop = match_ranges[u]
        records = []
        for image_id in ordered_images[start:stop]:
            tags = [str(t) if t is not None else "" for t in tags_of[image_id]]
            for rank, sid in sorted(rows_of[image_id]):
                best, sims = match_regions(tags, phrases_of[sid], cache)
                records.append({"image_id": image_id, "rank": rank, "sentence_id": sid,
                                "region_phrase": best, "region_sim": sims})
        _write_parquet(path, pa.Table.from_pylist(records, schema=MATCHES_SCHEMA))
        matched_now += len(records)
    match_seconds = time.time() - t0
    summary["pairs_matched_now"] = matched_now
    summary["match_pairs_per_s"] = round(matched_now / match_seconds, 1) if matched_now else None

    if not spec.is_main:
        summary["status"] = "shard_done"
        _write_summary(out, spec.rank, summary)
        return summary

    _write_parquet(out / "sentence_phrases.parquet", phrase_table)
    match_tables = [pq.read_table(parts / f"matches-{unit_name(u)}.parquet") for u in range(len(match_ranges))]
    matches = pa.concat_tables(match_tables) if match_tables else MATCHES_SCHEMA.empty_table()
    _write_parquet(out / "matches.parquet", matches)

    n_phrases = [len(p) for p in phrases_of.values()]
    best_sims = [s for row_p, row_s in zip(matches.column("region_phrase").to_pylist(),
                                          matches.column("region_sim").to_pylist())
                 for p, s in zip(row_p, row_s) if p >= 0]
    summary.update(
        status="done",
        sentences_parsed=len(phrases_of),
        phrases_per_sentence=round(float(np.mean(n_phrases)), 4) if n_phrases else 0.0,
        sentences_without_phrase=int(sum(1 for c in n_phrases if c == 0)),
        images=len(ordered_images),
        pairs=matches.num_rows,
        regions_matched=len(best_sims),
        mean_best_similarity=round(float(np.mean(best_sims)), 4) if best_sims else None,
    )
    _write_summary(out, spec.rank, summary)
    return summary


def _write_summary(out: Path, rank: int, summary: dict[str, Any]) -> None:
    name = "summary.json" if rank == 0 else f"summary.rank-{rank:05d}.json"
    with atomic_file(out / name) as tmp:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
