"""Streaming readers for the text-only corpus formats.

Every reader yields ``RawItem``s (one candidate sentence with where it came from). Bytes are decoded
line by line with ``surrogateescape`` so one bad byte spoils one line, not the file; the caller
decides whether such a line is repaired or rejected (``fix_utf8``).

Format detection (``detect_format``), documented rule:
- ``.json``  -> ``coco`` (COCO captions JSON, ``annotations[].caption``)
- ``.tsv``   -> ``cc3m`` (``caption<TAB>url``; the first field is kept)
- otherwise up to the first 2,000 lines (at most 4 MiB) are sniffed: a Project Gutenberg
  ``*** START OF`` marker, or at least 3 non-empty lines whose median is longer than 300 characters
  (one paragraph per line) -> ``book``; else ``plain`` (one sentence per line). One long line never
  decides it. Hard-wrapped books without a Gutenberg header need an explicit ``book:path`` prefix
  (or ``formats``), because wrapped lines look like short sentences.

A file that is not in its format at all (a COCO JSON without ``annotations``) raises
:class:`BadCorpusFile`; an item that cannot be used (a TSV row that is not ``caption<TAB>url``, an
annotation without a caption) is yielded with its ``problem`` so the stage records it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from muvla.corpus.captions import CaptionsFileError, read_captions_file

FORMATS = ("plain", "cc3m", "coco", "book")

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF|End of (the )?Project Gutenberg)", re.IGNORECASE)
_DANGLING_QUOTE = re.compile(r"\s+([\"\u201c\u2018'])$")
_ITALICS = re.compile(r"_(\S(?:[^_]*\S)?)_")


class BadCorpusFile(ValueError):
    """A whole input file is unusable (wrong format); the stage records it and goes on with the others."""


@dataclass
class RawItem:
    """One candidate sentence; ``line`` is 1-based (JSON: the annotation index), ``bad_utf8`` marks
    invalid bytes, ``problem`` says why the item cannot be used at all (it is recorded, not kept)."""

    text: str
    line: int
    bad_utf8: bool = False
    problem: str | None = None


def has_bad_utf8(text: str) -> bool:
    """True when ``surrogateescape`` decoding met invalid bytes (or JSON held lone surrogates)."""
    return _SURROGATE.search(text) is not None


def fix_utf8(text: str) -> str:
    """Replace every invalid byte / lone surrogate by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) without the newline; a leading BOM is dropped."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
            if i == 1:
                line = line.lstrip("\ufeff")
            yield i, line


def read_plain(path: Path) -> Iterator[RawItem]:
    """One sentence per line."""
    for i, line in _lines(path):
        yield RawItem(line, i, has_bad_utf8(line))


def read_cc3m(path: Path) -> Iterator[RawItem]:
    """Conceptual Captions TSV ``caption<TAB>url``: keep the caption; any other number of fields is a
    malformed row (recorded, not taken as a caption). Blank lines are just empty."""
    for i, line in _lines(path):
        if not line.strip():
            yield RawItem("", i)
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            yield RawItem(fields[0], i, has_bad_utf8(fields[0]),
                          problem=f"expected caption<TAB>url, got {len(fields)} tab-separated field(s)")
            continue
        yield RawItem(fields[0], i, has_bad_utf8(fields[0]))


def read_coco(path: Path) -> Iterator[RawItem]:
    """COCO captions JSON: ``annotations[i].caption`` in file order (``line`` = annotation index)."""
    try:
        captions = read_captions_file(path, errors="surrogateescape")
    except CaptionsFileError as err:
        raise BadCorpusFile(str(err)) from err
    for caption in captions.captions():
        if caption.text is None:
            yield RawItem("", caption.index, problem="annotation without a 'caption' string")
            continue
        yield RawItem(caption.text, caption.index, has_bad_utf8(caption.text))


def _book_paragraphs(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(first line, paragraph text, had bad bytes) between Gutenberg markers when present."""
    lines = list(_lines(path))
    start, stop = 0, len(lines)
    for idx, (_, line) in enumerate(lines):
        if _GUTENBERG_START.match(line):
            start = idx + 1
            break
    for idx in range(start, len(lines)):
        if _GUTENBERG_END.match(lines[idx][1]):
            stop = idx
            break
    para: list[str] = []
    first = 0
    bad = False
    for line_no, line in lines[start:stop]:
        if line.strip():
            if not para:
                first, bad = line_no, False
            para.append(line.strip())
            bad = bad or has_bad_utf8(line)
        elif para:
            yield first, " ".join(para), bad
            para = []
    if para:
        yield first, " ".join(para), bad


def read_book(path: Path) -> Iterator[RawItem]:
    """Raw book text: strip the Gutenberg header/footer (``*** START OF`` / ``*** END OF`` or
    ``End of the Project Gutenberg``), join wrapped paragraph lines, split sentences.

    Sentences come from spaCy's rule-based sentencizer (a blank English pipeline: fast, no model).
    ``_italics_`` markers of Gutenberg texts are removed. ``line`` is the paragraph's first line.
    """
    from muvla.encoders import load_sentencizer

    nlp = load_sentencizer()
    paragraphs = list(_book_paragraphs(path))
    texts = (_ITALICS.sub(r"\1", p) for _, p, _ in paragraphs)
    for (first, _, bad), doc in zip(paragraphs, nlp.pipe(texts, batch_size=256)):
        carry = ""
        for sent in doc.sents:
            # The sentencizer leaves an opening quote at the end of the previous sentence: move it.
            text = carry + sent.text
            carry = ""
            dangling = _DANGLING_QUOTE.search(text)
            if dangling:
                carry = dangling.group(1)
                text = text[: dangling.start()]
            yield RawItem(text, first, bad)


READERS = {"plain": read_plain, "cc3m": read_cc3m, "coco": read_coco, "book": read_book}


def detect_format(path: Path) -> str:
    """Pick a reader from the extension, then from the contents (rule in the module docstring)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix == ".tsv":
        return "cc3m"
    lines = _sample_lines(Path(path))
    if any(_GUTENBERG_START.match(line) for line in lines):
        return "book"
    lengths = sorted(len(line) for line in lines if line.strip())
    if len(lengths) >= 3 and lengths[len(lengths) // 2] > 300:
        return "book"
    return "plain"


def _sample_lines(path: Path, max_lines: int = 2000, max_bytes: int = 4 << 20) -> list[str]:
    """The first lines of a file, whole (a very long first line does not hide the next ones)."""
    lines: list[str] = []
    read = 0
    with open(path, "rb") as f:
        while len(lines) < max_lines and read < max_bytes:
            raw = f.readline(max_bytes - read)
            if not raw:
                break
            lines.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
            read += len(raw)
    return lines


def parse_corpus_entry(entry: str | Path) -> tuple[str | None, Path]:
    """``"book:path/to/file.txt"`` -> ("book", path); a plain path -> (None, path)."""
    text = str(entry)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in FORMATS and rest:
        return prefix, Path(rest)
    return None, Path(text)
