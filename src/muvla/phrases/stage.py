"""Phrases stage: noun phrases of retrieved sentences and region-phrase matching (METHOD.md section 3).

Three phases of work units, each resumable and shardable like the other stages:

1. ``phrases`` units over the sorted distinct retrieved sentence ids: spaCy ``noun_chunks`` with
   their character spans and the WordPiece token span of each phrase;
2. ``strings`` units over the sorted distinct strings to compare (every region tag of a retrieved
   image and every phrase): Sentence-BERT embeddings, encoded in large batches, once each;
3. ``matches`` units over images in top-K order: for each (image, rank) every region tag is
   compared with every phrase of the sentence by cosine; a region keeps its best phrase and that
   similarity clipped to [0, 1].

Once the parse units are all there, the main process also does the strings and matches units no
other process has written yet, so it can finish the stage alone.

A string's embedding depends only on the strings unit it falls in, never on which process or
which other images came before, so a sharded run writes exactly the same bytes as one process.
A phase starts once every unit of the previous one exists; a process that gets there first
reports ``waiting_for_shards`` and a rerun continues.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muvla import encoders
from muvla.corpus.layout import (
    MATCHES_SCHEMA,
    PairMatch,
    PhrasesOutput,
    RegionsOutput,
    RetrievalOutput,
    SentencePhrases,
    TableWriter,
    TextOutput,
    write_parquet,
)
from muvla.corpus.provenance import BUILD_FILE, StageRun, Step, StepResult, recorded_source, run_step
from muvla.utils.config import ConfigError, output_settings, setting
from muvla.utils.progress import progress
from muvla.utils.shards import ShardSpec, UnitPlan, clean_stale_tmp, unit_ranges


@dataclass(kw_only=True)
class PhrasesSettings:
    """Which models parse and compare, and how the work is cut into units."""

    spacy_model: str = setting("auto", help="spaCy English pipeline with a parser ('auto' = the installed small one)")
    model: str = setting("default", help="Sentence-BERT used for tag-phrase similarity ('default' = bundled)")
    tokenizer: str = setting("default", help="WordPiece tokenizer whose token spans pre-training uses")
    unit_size: int = setting(512, help="sentences (parse units) or images (match units) per work unit")
    strings_unit_size: int = setting(20_000, help="distinct tags and phrases per embedding unit")
    encoder_backend: str = setting("auto", choices=encoders.BACKENDS,
                                   help="auto: ONNX Runtime on CPU when installed, else PyTorch (fp16 on CUDA); "
                                        "the backend used is recorded, and a rerun must use the same one")
    batch_size: int = setting(256, help="texts per spaCy / encoder batch", runtime=True)
    device: str = setting("cpu", help="device of the sentence encoder (cpu, cuda)", runtime=True)

    def validate(self) -> None:
        for name in ("batch_size", "unit_size", "strings_unit_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"phrases.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PhrasesConfig(PhrasesSettings, StageRun):
    """``muvla phrases``. ``regions`` / ``text`` default to the folders the retrieval stage read."""

    out: Path = setting(help="output folder (sentence_phrases.parquet, matches.parquet)")
    retrieval: Path = setting(help="retrieval (or `muvla pairs`) output folder")
    regions: Path | None = setting(None, help="regions stage output (default: the one the retrieval stage read)")
    text: Path | None = setting(None, help="text stage output (default: the one the retrieval stage read)")

    def validate(self) -> None:
        super().validate()
        self.shard_spec()
        if not RetrievalOutput(Path(self.retrieval)).topk.exists():
            raise ConfigError(f"phrases: {RetrievalOutput(Path(self.retrieval)).topk} not found "
                              "(run the retrieval stage)")

    def resolved_inputs(self) -> tuple[RegionsOutput, TextOutput]:
        """(regions, text): explicit values, else the folders the retrieval (or pairs) step read, from
        its build record."""
        regions = self.regions if self.regions is not None else recorded_source(Path(self.retrieval), "regions")
        text = self.text if self.text is not None else recorded_source(Path(self.retrieval), "text")
        if regions is None or text is None:
            raise ConfigError(f"phrases: give --regions and --text, or a retrieval folder whose build.json records "
                              f"them ({Path(self.retrieval) / BUILD_FILE})")
        return RegionsOutput(Path(regions)), TextOutput(Path(text))


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens whose character offsets overlap [start, end); (-1, -1) if none."""
    hit = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    return (hit[0], hit[-1] + 1) if hit else (-1, -1)


def extract_phrases(texts: list[str], spacy_model: str = "auto", tokenizer: str = "default",
                    batch_size: int = 256) -> list[SentencePhrases]:
    """Noun chunks with char spans and WordPiece token spans for each text (same order as ``texts``)."""
    nlp = encoders.load_spacy(spacy_model)
    tok = encoders.load_wordpiece_tokenizer(tokenizer)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False) if texts else None
    results = []
    for j, doc in enumerate(nlp.pipe(texts, batch_size=batch_size)):
        offsets = [tuple(o) for o in enc["offset_mapping"][j]]
        row = SentencePhrases([], [], [])
        for chunk in doc.noun_chunks:
            span = token_span(offsets, chunk.start_char, chunk.end_char)
            if span[0] < 0:  # a chunk of characters the tokenizer drops entirely (e.g. control chars)
                continue
            row.phrases.append(chunk.text)
            row.char_spans.append([chunk.start_char, chunk.end_char])
            row.token_spans.append(list(span))
        results.append(row)
    return results


class StringEmbeddings:
    """Embeddings of the stage's distinct strings, read from the memory-mapped ``strings`` units."""

    def __init__(self, strings: list[str], plan: UnitPlan, unit_size: int) -> None:
        self.index = {s: i for i, s in enumerate(strings)}
        self.unit_size = unit_size
        self.parts = [np.load(plan.path(u), mmap_mode="r") for u in range(plan.n_units)]

    def __call__(self, strings: list[str]) -> np.ndarray:
        rows = [self.index[s] for s in strings]
        return np.stack([self.parts[r // self.unit_size][r % self.unit_size] for r in rows]).astype(np.float32)


def match_regions(tags: list[str], phrases: list[str],
                  embed: StringEmbeddings) -> tuple[list[int], list[float]]:
    """Per region: index of the most similar phrase (-1 if none / empty tag) and its cosine clipped to [0, 1]."""
    if not tags:
        return [], []
    if not phrases:
        return [-1] * len(tags), [0.0] * len(tags)
    valid = [i for i, t in enumerate(tags) if t and t.strip()]
    best = [-1] * len(tags)
    sims = [0.0] * len(tags)
    if valid:
        sim = embed([tags[i] for i in valid]) @ embed(phrases).T
        arg = sim.argmax(axis=1)
        top = np.clip(sim[np.arange(len(valid)), arg], 0.0, 1.0)
        for row, i in enumerate(valid):
            best[i] = int(arg[row])
            sims[i] = float(top[row])
    return best, sims


@dataclass
class _Work:
    """What every phase reads: retrieved pairs, their sentences and the images' tags."""

    sentence_ids: np.ndarray  # sorted distinct retrieved sentence ids
    images: list[str]  # images in top-K order
    pairs: dict[str, list[tuple[int, int]]]  # image -> [(rank, sentence id)]
    tags: dict[str, list[str]]


def _load_work(retrieval: RetrievalOutput, regions: RegionsOutput, text: TextOutput) -> _Work:
    topk = retrieval.read_topk()
    sentence_ids = np.unique(topk.sentence_id).astype(np.int64)
    n_text = text.count()
    if sentence_ids.size and sentence_ids[-1] >= n_text:
        raise ConfigError(f"phrases: topk.parquet refers to sentence {sentence_ids[-1]} but {text.root} has "
                          f"{n_text} sentences; retrieval and text folders do not belong together")
    ids, tags = regions.image_tags()
    tags_of = dict(zip(ids, tags))
    images = list(dict.fromkeys(topk.image_id))
    unknown = [i for i in images if i not in tags_of]
    if unknown:
        raise ConfigError(f"phrases: {len(unknown)} image(s) of topk.parquet are not in the region index "
                          f"{regions.index} (e.g. {unknown[:3]})")
    return _Work(sentence_ids, images, topk.by_image(), {i: tags_of[i] for i in images})


def _parse_phase(cfg: PhrasesSettings, plan: UnitPlan, work: _Work, text: TextOutput) -> int:
    ranges = unit_ranges(len(work.sentence_ids), cfg.unit_size)
    parsed = 0
    for u in progress(plan.todo(), desc="extract noun phrases", unit="unit"):
        start, stop = ranges[u]
        ids = [int(i) for i in work.sentence_ids[start:stop]]
        texts = text.texts(ids)
        rows = extract_phrases([texts[i] for i in ids], cfg.spacy_model, cfg.tokenizer, cfg.batch_size)
        with plan.write(u) as tmp:
            pq.write_table(PhrasesOutput.phrases_table(list(zip(ids, rows))), tmp)
        parsed += len(ids)
    return parsed


def _read_phrase_units(plan: UnitPlan) -> pa.Table:
    return pa.concat_tables([pq.read_table(plan.path(u)) for u in range(plan.n_units)]) if plan.n_units \
        else PhrasesOutput.phrases_table([])


def _distinct_strings(phrases_of: dict[int, list[str]], work: _Work) -> list[str]:
    strings = {t for tags in work.tags.values() for t in tags if t and t.strip()}
    strings.update(p for phrases in phrases_of.values() for p in phrases)
    return sorted(strings)


def _strings_phase(cfg: PhrasesSettings, plan: UnitPlan, strings: list[str], include_others: bool) -> int:
    ranges = unit_ranges(len(strings), cfg.strings_unit_size)
    encoded = 0
    for u in progress(plan.todo(include_others), desc="encode tags and phrases", unit="unit"):
        if plan.done(u):  # another process finished it meanwhile
            continue
        start, stop = ranges[u]
        emb = encoders.encode(strings[start:stop], batch_size=cfg.batch_size, model=cfg.model, device=cfg.device,
                              backend=cfg.encoder_backend)
        with plan.write(u) as tmp, open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float32))
        encoded += stop - start
    return encoded


def _match_phase(plan: UnitPlan, units: list[int], work: _Work, phrases_of: dict[int, list[str]],
                 embed: StringEmbeddings, unit_size: int) -> int:
    ranges = unit_ranges(len(work.images), unit_size)
    matched = 0
    for u in progress(units, desc="match regions to phrases", unit="unit"):
        if plan.done(u):
            continue
        start, stop = ranges[u]
        rows = []
        for image_id in work.images[start:stop]:
            tags = work.tags[image_id]
            for rank, sid in work.pairs[image_id]:
                best, sims = match_regions(tags, phrases_of[sid], embed)
                rows.append(PairMatch(image_id, rank, sid, best, sims))
        with plan.write(u) as tmp:
            pq.write_table(PhrasesOutput.matches_table(rows), tmp)
        matched += len(rows)
    return matched


def run_phrases(cfg: PhrasesConfig) -> dict[str, Any]:
    """Parse every retrieved sentence, embed every distinct tag and phrase, match each image's
    region tags to its sentences' phrases."""
    cfg.validate()
    shard = cfg.shard_spec()
    retrieval, output = RetrievalOutput(Path(cfg.retrieval)), PhrasesOutput(Path(cfg.out))
    regions, text = cfg.resolved_inputs()
    inputs = {"retrieval": retrieval.digest(), "regions": regions.digest(), "text": text.digest()}
    settings = output_settings(cfg, exclude=("retrieval", "regions", "text"))
    settings["encoder_backend"] = encoders.get_encoder(cfg.model, cfg.device, cfg.encoder_backend).backend
    cfg = dataclasses.replace(cfg, encoder_backend=settings["encoder_backend"])  # the backend that really runs
    inputs["tokenizer_vocab"] = encoders.vocab_digest(encoders.load_wordpiece_tokenizer(cfg.tokenizer))
    step = Step("phrases", output.root, settings, inputs, output.outputs(), cfg,
                sources={"retrieval": retrieval.root, "regions": regions.root, "text": text.root},
                work=[output.parts])
    return run_step(step, lambda _start: _phrases(cfg, shard, output, retrieval, regions, text),
                    overwrite=cfg.overwrite, rank=shard.rank)


def _phrases(cfg: PhrasesConfig, shard: ShardSpec, output: PhrasesOutput, retrieval: RetrievalOutput,
             regions: RegionsOutput, text: TextOutput) -> StepResult:
    output.parts.mkdir(parents=True, exist_ok=True)
    if shard.world == 1:
        clean_stale_tmp(output.parts)
    work = _load_work(retrieval, regions, text)
    summary: dict[str, Any] = {"shard": shard.rank, "num_shards": shard.world}

    t0 = time.time()
    parse_plan = UnitPlan(output.parts, "phrases", len(unit_ranges(len(work.sentence_ids), cfg.unit_size)), shard,
                          ".parquet")
    summary["sentences_parsed_now"] = _parse_phase(cfg, parse_plan, work, text)
    summary["parse_seconds"] = round(time.time() - t0, 3)
    if not parse_plan.complete():
        return StepResult({**summary, **parse_plan.waiting("phrases")}, complete=False)
    phrase_table = _read_phrase_units(parse_plan)
    phrases_of = dict(zip(phrase_table.column("sentence_id").to_pylist(), phrase_table.column("phrases").to_pylist()))

    t0 = time.time()
    strings = _distinct_strings(phrases_of, work)
    strings_plan = UnitPlan(output.parts, "strings", len(unit_ranges(len(strings), cfg.strings_unit_size)), shard,
                            ".npy")
    summary["strings_encoded_now"] = _strings_phase(cfg, strings_plan, strings, include_others=shard.is_main)
    summary["encode_seconds"] = round(time.time() - t0, 3)
    if not strings_plan.complete():
        return StepResult({**summary, **strings_plan.waiting("phrases")}, complete=False)

    t0 = time.time()
    match_plan = UnitPlan(output.parts, "matches", len(unit_ranges(len(work.images), cfg.unit_size)), shard,
                          ".parquet")
    embed = StringEmbeddings(strings, strings_plan, cfg.strings_unit_size)
    summary["pairs_matched_now"] = _match_phase(match_plan, match_plan.todo(include_others=shard.is_main), work,
                                                phrases_of, embed, cfg.unit_size)
    summary["match_seconds"] = round(time.time() - t0, 3)
    if not shard.is_main or not match_plan.complete():
        return StepResult({**summary, "status": "shard_done"}, complete=False)

    write_parquet(output.sentence_phrases, phrase_table)
    summary.update(status="done", strings=len(strings), **_phrase_statistics(phrases_of),
                   images=len(work.images), **_merge_matches(match_plan, output.matches))
    return StepResult(summary)


def _phrase_statistics(phrases_of: dict[int, list[str]]) -> dict[str, Any]:
    n_phrases = [len(p) for p in phrases_of.values()]
    return {"sentences_parsed": len(phrases_of),
            "phrases_per_sentence": round(float(np.mean(n_phrases)), 4) if n_phrases else 0.0,
            "sentences_without_phrase": int(sum(1 for c in n_phrases if c == 0))}


def _merge_matches(plan: UnitPlan, path: Path) -> dict[str, Any]:
    """Stream the match units into ``matches.parquet`` and count matched regions unit by unit.

    WHY: at CC3M size the merged table holds 15M pairs x their regions; as one in-memory table,
    and worse as Python lists of every region's similarity, that is several GB."""
    matched, sim_sum = 0, 0.0
    with TableWriter(path, MATCHES_SCHEMA) as writer:
        for u in range(plan.n_units):
            table = pq.read_table(plan.path(u))
            writer.write(table)
            best = pc.list_flatten(table.column("region_phrase")).to_numpy()
            sims = pc.list_flatten(table.column("region_sim")).to_numpy()
            matched += int(np.count_nonzero(best >= 0))
            sim_sum += float(sims[best >= 0].sum(dtype=np.float64))
        pairs = writer.rows
    return {"pairs": pairs, "regions_matched": matched,
            "mean_best_similarity": round(sim_sum / matched, 4) if matched else None}


def describe(summary: dict[str, Any]) -> list[str]:
    """The few lines ``muvla phrases`` prints at the end (details in summary.json)."""
    if summary.get("status") != "done":
        return [f"phrases: {summary.get('status')}: {summary.get('note', '')}".rstrip(": ")]
    return [f"phrases: {summary['sentences_parsed']} sentences parsed ({summary['phrases_per_sentence']:.2f} noun "
            f"phrases each), {summary['regions_matched']} regions matched over {summary['pairs']} pairs "
            f"(mean similarity {summary['mean_best_similarity']})"
            + (" (reused: already built)" if summary.get("reused") else "")]
