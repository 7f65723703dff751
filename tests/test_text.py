"""Text stage: readers, UTF-8 handling, cleaning counts, format detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from muvla.corpus import layout
from muvla.corpus.layout import SentenceWriter, TextOutput
from muvla.text import TextConfig, detect_format, run_text
from muvla.text.readers import BadCorpusFile, read_book, read_cc3m, read_coco, read_plain
from muvla.utils.config import ConfigError

GUTENBERG = """\ufeffThe Project Gutenberg EBook of Tiny Tale, by Nobody

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALE ***

Chapter 1

It was a dark and stormy
night. The dog slept by
the _warm_ fire.

Mr. Smith opened the door. "Who is
there?" he asked.

*** END OF THIS PROJECT GUTENBERG EBOOK TINY TALE ***

Licence text that must not become sentences.
"""


def _texts(out: Path) -> list[str]:
    return TextOutput(out).all_texts()


def _rejected(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]


def test_plain_reader_counts_empty_duplicates_and_whitespace(tmp_path: Path) -> None:
    src = tmp_path / "c.txt"
    src.write_text("a dog  runs\n\n   \na dog runs\nA cat sleeps.\r\n  a  dog runs \n", encoding="utf-8")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src]))
    assert _texts(tmp_path / "out") == ["a dog runs", "A cat sleeps."]
    counts = summary["sources"][str(src)]
    assert counts["format"] == "plain"
    assert counts["items_read"] == 6
    assert counts["empty_dropped"] == 2
    assert counts["duplicates_dropped"] == 2
    assert counts["kept"] == 2
    table = pq.read_table(tmp_path / "out" / "sentences.parquet")
    assert table.column("sentence_id").to_pylist() == [0, 1]
    assert table.column("source").to_pylist() == [str(src)] * 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["sentences"] == 2
    assert (tmp_path / "out" / "config.yaml").exists()


def test_dedupe_off_keeps_duplicates(tmp_path: Path) -> None:
    src = tmp_path / "c.txt"
    src.write_text("same\nsame\n", encoding="utf-8")
    run_text(TextConfig(out=tmp_path / "out", corpus=[src], dedupe=False))
    assert _texts(tmp_path / "out") == ["same", "same"]


def test_invalid_utf8_repaired(tmp_path: Path) -> None:
    src = tmp_path / "bad.txt"
    src.write_bytes(b"good line\ncaf\xe9 au lait\nbad \xff\xfe bytes\n")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src], invalid_utf8="replace"))
    assert _texts(tmp_path / "out") == ["good line", "caf\ufffd au lait", "bad \ufffd\ufffd bytes"]
    assert summary["sources"][str(src)]["invalid_utf8_repaired"] == 2
    assert summary["sources"][str(src)]["invalid_utf8_rejected"] == 0


def test_invalid_utf8_rejected_and_recorded(tmp_path: Path) -> None:
    src = tmp_path / "bad.tsv"
    src.write_bytes(b"a red bus\thttp://x/1.jpg\ncaf\xe9\thttp://x/2.jpg\na green tree\thttp://x/3.jpg\n")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src], invalid_utf8="reject"))
    assert _texts(tmp_path / "out") == ["a red bus", "a green tree"]
    assert summary["sources"][str(src)]["invalid_utf8_rejected"] == 1
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [{"file": str(src), "line": 2, "reason": "invalid UTF-8"}]


def test_cc3m_reader_keeps_caption_only(tmp_path: Path) -> None:
    src = tmp_path / "cc.tsv"
    src.write_text("an angler fishes river .\thttp://a/b.jpg\n", encoding="utf-8")
    items = list(read_cc3m(src))
    assert [i.text for i in items] == ["an angler fishes river ."]
    assert [i.line for i in items] == [1]


def test_malformed_tsv_rows_are_counted_and_recorded(tmp_path: Path) -> None:
    src = tmp_path / "cc.tsv"
    src.write_text("a good caption\thttp://a/b.jpg\nno url here\nthree\tfields\there\n\n", encoding="utf-8")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src]))
    assert _texts(tmp_path / "out") == ["a good caption"]
    counts = summary["sources"][str(src)]
    assert counts["malformed_dropped"] == 2 and counts["empty_dropped"] == 1
    rejected = _rejected(tmp_path / "out")
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "expected caption<TAB>url, got 1 tab-separated field(s)"),
        (3, "expected caption<TAB>url, got 3 tab-separated field(s)")]


def test_coco_reader_and_bad_json(tmp_path: Path) -> None:
    src = tmp_path / "caps.json"
    src.write_text(json.dumps({"annotations": [{"caption": "A man riding a horse."}, {"caption": ""},
                                               {"id": 3}]}), encoding="utf-8")
    items = list(read_coco(src))
    assert [i.text for i in items] == ["A man riding a horse.", "", ""]
    assert items[2].problem == "annotation without a 'caption' string"
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src]))
    assert summary["sources"][str(src)]["empty_dropped"] == 1
    assert summary["sources"][str(src)]["malformed_dropped"] == 1
    assert _rejected(tmp_path / "out") == [{"file": str(src), "line": 2,
                                            "reason": "annotation without a 'caption' string"}]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"images": []}), encoding="utf-8")
    with pytest.raises(BadCorpusFile, match="annotations"):
        list(read_coco(wrong))


def test_bad_file_is_recorded_and_good_files_still_go_through(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("a dog runs\n", encoding="utf-8")
    no_annotations = tmp_path / "no_annotations.json"
    no_annotations.write_text(json.dumps({"images": []}), encoding="utf-8")
    not_json = tmp_path / "broken.json"
    not_json.write_text("{not json", encoding="utf-8")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[no_annotations, good, not_json]))
    assert _texts(tmp_path / "out") == ["a dog runs"]
    assert [b["file"] for b in summary["files_rejected"]] == [str(no_annotations), str(not_json)]
    assert "no top-level 'annotations' list" in summary["files_rejected"][0]["reason"]
    assert "not valid JSON (line 1, column 2" in summary["files_rejected"][1]["reason"]
    assert {r["file"] for r in _rejected(tmp_path / "out")} == {str(no_annotations), str(not_json)}
    with pytest.raises(ConfigError, match="no usable corpus file"):
        run_text(TextConfig(out=tmp_path / "out2", corpus=[no_annotations]))


def test_long_first_line_does_not_make_a_file_a_book(tmp_path: Path) -> None:
    """A 100 kB first line must not decide the format: it is dropped and recorded, the next line kept."""
    src = tmp_path / "c.txt"
    src.write_text("x" * 100_000 + "\nA good sentence about a dog.\n", encoding="utf-8")
    assert detect_format(src) == "plain"
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src]))
    assert _texts(tmp_path / "out") == ["A good sentence about a dog."]
    assert summary["sources"][str(src)]["too_long_dropped"] == 1
    assert _rejected(tmp_path / "out") == [{"file": str(src), "line": 1,
                                            "reason": "too long (100000 characters > max_chars=1000)"}]


def test_coco_invalid_utf8_bytes_inside_json(tmp_path: Path) -> None:
    src = tmp_path / "caps.json"
    src.write_bytes(b'{"annotations": [{"caption": "caf\xe9 table"}, {"caption": "fine"}]}')
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src], invalid_utf8="reject"))
    assert _texts(tmp_path / "out") == ["fine"]
    assert summary["sources"][str(src)]["invalid_utf8_rejected"] == 1


def test_book_reader_strips_gutenberg_and_splits_sentences(tmp_path: Path) -> None:
    src = tmp_path / "book.txt"
    src.write_text(GUTENBERG, encoding="utf-8")
    assert detect_format(src) == "book"
    sentences = [i.text for i in read_book(src)]
    assert sentences == ["Chapter 1", "It was a dark and stormy night.", "The dog slept by the warm fire.",
                         "Mr. Smith opened the door.", '"Who is there?"', "he asked."]
    assert not any("Licence" in s or "Gutenberg" in s for s in sentences)


def test_format_detection_and_override(tmp_path: Path) -> None:
    plain = tmp_path / "p.txt"
    plain.write_text("a dog\na cat\n", encoding="utf-8")
    long_par = tmp_path / "novel.txt"
    long_par.write_text(("It rained. " * 40 + "\n") * 3, encoding="utf-8")
    assert detect_format(plain) == "plain"
    assert detect_format(long_par) == "book"
    assert detect_format(tmp_path / "x.json") == "coco"
    assert detect_format(tmp_path / "x.tsv") == "cc3m"
    wrapped = tmp_path / "wrapped.txt"
    wrapped.write_text("The dog slept by\nthe fire. It snored.\n", encoding="utf-8")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[Path(f"book:{wrapped}"), plain]))
    assert _texts(tmp_path / "out") == ["The dog slept by the fire.", "It snored.", "a dog", "a cat"]
    assert summary["sources"][str(wrapped)]["format"] == "book"
    run_text(TextConfig(out=tmp_path / "out2", corpus=[wrapped], formats=["plain"]))
    assert _texts(tmp_path / "out2") == ["The dog slept by", "the fire. It snored."]


def test_length_filters(tmp_path: Path) -> None:
    src = tmp_path / "c.txt"
    src.write_text("one\ntwo words\n" + "x" * 50 + " y\n", encoding="utf-8")
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=[src], min_words=2, max_chars=20))
    assert _texts(tmp_path / "out") == ["two words"]
    counts = summary["sources"][str(src)]
    assert (counts["too_short_dropped"], counts["too_long_dropped"]) == (1, 1)
    assert [r["line"] for r in _rejected(tmp_path / "out")] == [1, 3]


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        run_text(TextConfig(out=tmp_path / "o", corpus=[tmp_path / "missing.txt"]))
    src = tmp_path / "c.txt"
    src.write_text("x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid_utf8: expected one of replace, reject"):
        run_text(TextConfig(out=tmp_path / "o", corpus=[src], invalid_utf8="ignore"))
    with pytest.raises(ConfigError, match="format"):
        run_text(TextConfig(out=tmp_path / "o", corpus=[src], format="csv"))
    with pytest.raises(ConfigError, match="formats"):
        run_text(TextConfig(out=tmp_path / "o", corpus=[src], formats=["plain", "book"]))


def test_plain_reader_line_numbers(tmp_path: Path) -> None:
    src = tmp_path / "c.txt"
    src.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    assert [(i.text, i.line) for i in read_plain(src)] == [("first", 1), ("second", 2)]


@pytest.mark.shared_data
def test_real_corpora_smoke(tmp_path: Path, shared_data: Path) -> None:
    files = [shared_data / "text" / "cc3m_validation.tsv", shared_data / "text" / "pride_and_prejudice.txt"]
    summary = run_text(TextConfig(out=tmp_path / "out", corpus=files))
    cc = summary["sources"][str(files[0])]
    book = summary["sources"][str(files[1])]
    assert cc["format"] == "cc3m" and cc["items_read"] == 15833
    assert book["format"] == "book"
    assert cc["kept"] + cc["duplicates_dropped"] + cc["empty_dropped"] + cc["too_long_dropped"] \
        + cc["malformed_dropped"] == 15833
    texts = _texts(tmp_path / "out")
    assert len(texts) == summary["sentences"] == cc["kept"] + book["kept"]
    assert not any("Project Gutenberg" in t for t in texts)
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
           "must be in want of a wife." in texts


def test_texts_by_id_reads_only_the_row_groups_holding_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The phrases stage asks for a few hundred ids per unit; each call must read the row groups that
    hold them, not the whole store (otherwise the stage is O(units x corpus))."""
    monkeypatch.setattr(SentenceWriter, "FLUSH_ROWS", 10)
    out = TextOutput(tmp_path / "text")
    with out.writer() as writer:
        for i in range(95):
            writer.add(f"sentence number {i}", "src")
    parquet = pq.ParquetFile(out.sentences)
    assert parquet.metadata.num_row_groups == 10
    assert layout._row_groups_with(parquet, "sentence_id", np.array([12, 15, 19])) == [1]
    assert layout._row_groups_with(parquet, "sentence_id", np.array([3, 47, 94])) == [0, 4, 9]
    assert layout._row_groups_with(parquet, "sentence_id", np.array([], dtype=np.int64)) == []
    wanted = [94, 3, 47, 12, 12]
    assert out.texts(wanted) == {i: f"sentence number {i}" for i in wanted}
    assert out.texts(range(95)) == dict(enumerate(out.all_texts()))
    assert out.texts([200]) == {}
