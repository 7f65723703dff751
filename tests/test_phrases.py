"""Phrases stage: noun chunks, char/token spans, region-phrase matching, resume and shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muvla.corpus.layout import RegionsOutput, TextOutput, TopK
from muvla.corpus.region_store import ImageRegions
from muvla.corpus.synthetic import write_pairs, write_region_store, write_sentence_store
from muvla.encoders import load_wordpiece_tokenizer
from muvla.phrases import PhrasesConfig, extract_phrases, run_phrases, token_span
from muvla.utils.config import ConfigError

SENTENCES = [
    "Two dogs are playing with a red frisbee in the park.",
    "Running quickly!",  # no noun chunk
    "A young woman sits on a sofa next to a café table.",
    "The Eiffel Tower at night.",
]
TAGS = {"img-a": ["dog", "dog", "frisbee", ""], "img-b": ["woman", "couch"], "img-c": []}
TOPK = [("img-a", 0, 0), ("img-a", 1, 1), ("img-b", 0, 2), ("img-b", 1, 3), ("img-c", 0, 3)]


def _setup(root: Path) -> Path:
    """Text, regions and retrieval outputs written by hand (the retrieval build record names the other two)."""
    text, regions, retrieval = root / "text", root / "regions", root / "retrieval"
    write_sentence_store(text, SENTENCES)
    images = [ImageRegions(i, f"{i}.jpg", 50, 50, np.tile([0, 0, 9, 9], (len(t), 1)).astype(np.float32), t,
                           np.ones(len(t), np.float32), np.full(len(t), -1, np.int32), np.zeros((len(t), 4), np.float16))
              for i, t in TAGS.items()]
    write_region_store(regions, images)
    topk = TopK([r[0] for r in TOPK], np.array([r[1] for r in TOPK], np.int32), np.array([r[2] for r in TOPK], np.int64),
                np.full(len(TOPK), 0.5, np.float32))
    write_pairs(retrieval, topk, RegionsOutput(regions), TextOutput(text), k=2)
    return retrieval


def test_token_span_overlap() -> None:
    offsets = [(0, 3), (4, 8), (8, 9), (10, 11), (12, 14), (14, 16), (16, 19)]
    assert token_span(offsets, 0, 8) == (0, 2)
    assert token_span(offsets, 10, 19) == (3, 7)
    assert token_span(offsets, 13, 15) == (4, 6)  # partial overlap takes whole word pieces
    assert token_span(offsets, 9, 10) == (-1, -1)


def test_extract_phrases_spans_map_back() -> None:
    rows = extract_phrases(SENTENCES)
    tok = load_wordpiece_tokenizer()
    assert rows[0].phrases == ["Two dogs", "a red frisbee", "the park"]
    assert rows[1].phrases == []
    for text, row in zip(SENTENCES, rows):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for phrase, (cs, ce), (ts, te) in zip(row.phrases, row.char_spans, row.token_spans):
            assert text[cs:ce] == phrase
            assert 0 <= ts < te <= len(ids)
            decoded = tok.decode(ids[ts:te]).replace(" ", "")
            assert decoded == tok.decode(tok(phrase, add_special_tokens=False)["input_ids"]).replace(" ", "")
            assert decoded == phrase.lower().replace(" ", "").replace("é", "e")


def test_run_phrases_end_to_end(tmp_path: Path) -> None:
    retrieval = _setup(tmp_path)
    out = tmp_path / "phrases"
    summary = run_phrases(PhrasesConfig(out=out, retrieval=retrieval, unit_size=2))
    assert summary["status"] == "done"
    assert summary["sentences_parsed"] == 4 and summary["sentences_without_phrase"] == 1
    sp = pq.read_table(out / "sentence_phrases.parquet").to_pylist()
    assert [r["sentence_id"] for r in sp] == [0, 1, 2, 3]
    assert sp[1]["phrases"] == [] and sp[1]["token_spans"] == []

    matches = pq.read_table(out / "matches.parquet").to_pylist()
    assert [(m["image_id"], m["rank"], m["sentence_id"]) for m in matches] == TOPK
    for m in matches:
        n_regions = len(TAGS[m["image_id"]])
        assert len(m["region_phrase"]) == len(m["region_sim"]) == n_regions
        assert all(0.0 <= s <= 1.0 for s in m["region_sim"])
    a0 = matches[0]
    phrases0 = sp[0]["phrases"]
    assert phrases0[a0["region_phrase"][0]] == "Two dogs"
    assert phrases0[a0["region_phrase"][2]] == "a red frisbee"
    assert a0["region_phrase"][3] == -1 and a0["region_sim"][3] == 0.0  # empty tag
    assert a0["region_sim"][0] > 0.5
    no_phrase = matches[1]  # sentence without noun chunks
    assert no_phrase["region_phrase"] == [-1] * 4 and no_phrase["region_sim"] == [0.0] * 4
    b0 = matches[2]
    assert sp[2]["phrases"][b0["region_phrase"][0]] == "A young woman"
    assert matches[4]["region_phrase"] == []  # image without regions
    assert 0 < summary["mean_best_similarity"] <= 1
    best = [s for m in matches for p, s in zip(m["region_phrase"], m["region_sim"]) if p >= 0]
    assert summary["regions_matched"] == len(best)  # counted unit by unit while merging
    assert summary["mean_best_similarity"] == round(float(np.mean(best)), 4)
    assert json.loads((out / "summary.json").read_text())["pairs"] == 5

    # resume: a lost unit is recomputed and the merged outputs are identical
    before = pq.read_table(out / "matches.parquet")
    again = run_phrases(PhrasesConfig(out=out, retrieval=retrieval, unit_size=2))
    assert again["reused"] is True  # complete and up to date
    (out / "matches.parquet").unlink()  # a run killed before its merge, with two units lost
    (out / "parts" / "matches-00000.parquet").unlink()
    (out / "parts" / "phrases-00001.parquet").unlink()
    again = run_phrases(PhrasesConfig(out=out, retrieval=retrieval, unit_size=2))
    assert again["sentences_parsed_now"] == 2 and again["pairs_matched_now"] == 4
    assert pq.read_table(out / "matches.parquet").equals(before)


def test_two_shards_equal_one(tmp_path: Path) -> None:
    retrieval = _setup(tmp_path)
    run_phrases(PhrasesConfig(out=tmp_path / "one", retrieval=retrieval, unit_size=1, strings_unit_size=3))

    def cfg(out: Path, shard: int) -> PhrasesConfig:
        return PhrasesConfig(out=out, retrieval=retrieval, unit_size=1, strings_unit_size=3, shard=shard,
                             num_shards=2)

    # rank 0 first: it waits for rank 1's phrase units; rank 1 then parses and encodes its own units
    out = tmp_path / "two"
    assert run_phrases(cfg(out, 0))["status"] == "waiting_for_shards"
    second = run_phrases(cfg(out, 1))
    assert second["status"] == "waiting_for_shards" and second["strings_encoded_now"] > 0
    assert not (out / "matches.parquet").exists()
    assert run_phrases(cfg(out, 0))["status"] == "done"
    # rank 1 first (too early to match): rank 0 must still finish everything without another rank-1 run
    late = tmp_path / "late"
    assert run_phrases(cfg(late, 1))["status"] == "waiting_for_shards"
    assert run_phrases(cfg(late, 0))["status"] == "done"
    for name in ("sentence_phrases.parquet", "matches.parquet"):  # byte for byte: similarities included
        expected = (tmp_path / "one" / name).read_bytes()
        assert (out / name).read_bytes() == expected
        assert (late / name).read_bytes() == expected


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="topk.parquet"):
        run_phrases(PhrasesConfig(out=tmp_path / "o", retrieval=tmp_path / "nothing"))
    retrieval = _setup(tmp_path)
    with pytest.raises(ConfigError, match="not a finished regions output"):
        run_phrases(PhrasesConfig(out=tmp_path / "o", retrieval=retrieval, regions=tmp_path / "nowhere"))


def test_encoders_offline_loading() -> None:
    from muvla.encoders import default_sbert_path, embedding_dim, encode, load_spacy

    assert (default_sbert_path() / "vocab.txt").exists()
    emb = encode(["a dog", "a dog", "a pizza"])
    assert emb.dtype == "float32" and emb.shape == (3, embedding_dim())
    assert abs(float(emb[0] @ emb[1]) - 1.0) < 1e-5 and float(emb[0] @ emb[2]) < 0.9
    assert encode([]).shape == (0, embedding_dim())
    with pytest.raises(RuntimeError, match="no usable spaCy English model"):
        load_spacy("no_such_spacy_model_xyz")
    with pytest.raises(RuntimeError, match="cannot load Sentence-BERT"):
        encode(["x"], model="no-such-org/no-such-model-xyz")


@pytest.mark.shared_data
def test_real_cc3m_captions_smoke(shared_data: Path) -> None:
    """A few hundred real CC3M captions: every phrase's spans map back to its text and tokens."""
    shared = shared_data
    lines = (shared / "text" / "cc3m_validation.tsv").read_text(encoding="utf-8").splitlines()[:300]
    texts = [" ".join(line.split("\t")[0].split()) for line in lines]
    rows = extract_phrases(texts)
    tok = load_wordpiece_tokenizer()
    with_phrase = 0
    for text, row in zip(texts, rows):
        with_phrase += bool(row.phrases)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for phrase, (cs, ce), (ts, te) in zip(row.phrases, row.char_spans, row.token_spans):
            assert text[cs:ce] == phrase
            assert 0 <= ts < te <= len(ids)
            phrase_ids = tok(phrase, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids[ts:te]).replace(" ", "") == tok.decode(phrase_ids).replace(" ", "")
    assert with_phrase > 0.8 * len(texts)


def test_table_writer_streams_row_groups_and_publishes_atomically(tmp_path: Path) -> None:
    """The phrases merge appends its units to matches.parquet without holding them all."""
    from muvla.corpus.layout import MATCHES_SCHEMA, PairMatch, PhrasesOutput, TableWriter

    units = [PhrasesOutput.matches_table([PairMatch(f"img{u}", r, u, [0, -1], [0.5, 0.0]) for r in range(3)])
             for u in range(5)]
    path = tmp_path / "matches.parquet"
    with TableWriter(path, MATCHES_SCHEMA, group_rows=6) as writer:
        for table in units:
            writer.write(table)
        assert not path.exists()  # published only on close
    parquet = pq.ParquetFile(path)
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)] == [6, 6, 3]
    assert pq.read_table(path).equals(pa.concat_tables(units))
    with pytest.raises(RuntimeError), TableWriter(tmp_path / "broken.parquet", MATCHES_SCHEMA) as writer:
        writer.write(units[0])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == [path]  # no half file, no temporary left
