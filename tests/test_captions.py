"""The COCO captions format owner (muvla.corpus.captions) and the callers that match captions with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muvla.corpus.captions import (
    CaptionsFileError,
    caption_key,
    normalise_caption,
    read_captions_file,
    write_captions_file,
)
from muvla.corpus.layout import TextOutput
from muvla.corpus.synthetic import write_sentence_store
from muvla.retrieval.pairs import caption_sentence_ids
from muvla.tasks.image_text_retrieval import load_coco_captions
from muvla.text.stage import TextConfig, run_text
from muvla.utils.config import ConfigError

CAPTIONS = {
    "info": {"description": "dropped by a subset"},
    "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 5, "file_name": "photos/astronaut.png"},
               {"id": 7, "file_name": "dog.jpg"}],
    "annotations": [
        {"image_id": 139, "id": 1, "caption": "A  living room\twith a TV."},
        {"image_id": 5, "id": 2, "caption": "An astronaut poses."},
        {"image_id": 139, "id": 3, "caption": "A couch and a lamp."},
        {"image_id": 139, "id": 4, "caption": "A third caption."},
        {"image_id": 7, "id": 5, "caption": "A dog."},
        {"image_id": 42, "id": 6, "caption": "An image missing from the images list."},
        {"id": 7, "caption": "No image id."},
        {"image_id": 5, "id": 8, "caption": 3},
        "not an object",
    ],
}


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_an_unusable_file_is_one_error_naming_it(tmp_path: Path) -> None:
    cases = {"missing.json": None, "broken.json": "{not json", "list.json": "[]",
             "no_annotations.json": json.dumps({"images": []}),
             "latin1.json": b'{"annotations": [{"caption": "caf\xe9"}]}'}
    reasons = {"missing.json": "cannot read", "broken.json": "not valid JSON (line 1, column 2",
               "list.json": "no top-level 'annotations' list", "no_annotations.json": "no top-level 'annotations' list",
               "latin1.json": "not valid UTF-8"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(CaptionsFileError) as err:
            read_captions_file(path)
        assert str(err.value).startswith(f"{path}: ") and reasons[name] in str(err.value), name
    only_annotations = _write(tmp_path / "text_only.json", {"annotations": [{"caption": "a cat"}]})
    assert read_captions_file(only_annotations).images == []
    with pytest.raises(CaptionsFileError, match="no top-level 'images' list"):
        read_captions_file(only_annotations, require_images=True)
    # invalid bytes kept as lone surrogates when the caller repairs captions itself (the text stage)
    assert [c.text for c in read_captions_file(tmp_path / "latin1.json", errors="surrogateescape").captions()] == [
        "caf\udce9"]


def test_callers_map_the_error_to_their_own_type(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    store = TextOutput(write_sentence_store(tmp_path / "text", ["a cat"]))
    with pytest.raises(ConfigError, match=r"^pairs: .*broken.json: not valid JSON"):
        caption_sentence_ids(broken, store)
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_coco_captions(broken)


def test_images_are_named_by_file_stem(tmp_path: Path) -> None:
    captions = read_captions_file(_write(tmp_path / "c.json", CAPTIONS))
    assert captions.stems == {139: "000000000139", 5: "astronaut", 7: "dog"}
    assert captions.stem_of(42) == "42"  # not in the images list: its id
    parsed = list(captions.captions())
    assert [(c.index, c.image_id, c.caption_id) for c in parsed[:2]] == [(0, 139, 1), (1, 5, 2)]
    assert (parsed[6].image_id, parsed[7].text, parsed[8].text) == (None, None, None)
    assert captions.texts_by_stem() == {
        "000000000139": ["A living room with a TV.", "A couch and a lamp.", "A third caption."],
        "astronaut": ["An astronaut poses."], "dog": ["A dog."], "42": ["An image missing from the images list."]}
    # the retrieval task: stems again, digit stems as COCO's integer ids
    examples, report = load_coco_captions(tmp_path / "c.json")
    assert sorted({e.image_id for e in examples}, key=str) == [139, 42, "astronaut", "dog"]
    assert report.skipped == {"malformed caption: missing field 'image_id'": 2,
                              "malformed caption: missing field 'caption'": 1}


def test_subset_keeps_entries_and_limits_captions_per_image(tmp_path: Path) -> None:
    captions = read_captions_file(_write(tmp_path / "c.json", CAPTIONS))
    subset = captions.subset({"000000000139", "dog"}, per_image=2)
    assert subset.images == [CAPTIONS["images"][0], CAPTIONS["images"][2]]
    assert subset.annotations == [CAPTIONS["annotations"][i] for i in (0, 2, 4)]  # the third of 139 is cut
    assert captions.subset(["astronaut"]).annotations == [CAPTIONS["annotations"][1], CAPTIONS["annotations"][7]]
    written = write_captions_file(tmp_path / "split" / "sub.json", subset)
    assert json.loads(written.read_text(encoding="utf-8")) == {"images": subset.images,
                                                               "annotations": subset.annotations}
    assert read_captions_file(written, require_images=True).texts_by_stem()["dog"] == ["A dog."]


def test_one_normaliser_and_its_comparison_key() -> None:
    tricky = " \t A\u00a0Dog \u2003 runs\r\n on the  BEACH. \u3000"  # tab, no-break, em and ideographic spaces
    assert normalise_caption(tricky) == "A Dog runs on the BEACH."  # the stored text keeps its case
    assert normalise_caption("\n \t") == ""
    assert caption_key(tricky) == caption_key("a dog runs on the beach.") == "a dog runs on the beach."
    assert caption_key("a\u200bdog") != caption_key("a dog")  # a zero-width space is not whitespace


def test_pairs_finds_a_caption_stored_with_other_case_or_spacing(tmp_path: Path) -> None:
    store = TextOutput(write_sentence_store(tmp_path / "text", [
        "an unrelated sentence", "A LIVING ROOM WITH A TV.", "an astronaut poses.", "A dog."]))
    found = caption_sentence_ids(_write(tmp_path / "c.json", CAPTIONS), store)
    assert found == {"000000000139": [1], "astronaut": [2], "dog": [3]}


def test_every_caption_finds_the_sentence_the_text_stage_stored(tmp_path: Path) -> None:
    src = _write(tmp_path / "c.json", CAPTIONS)
    run_text(TextConfig(out=tmp_path / "text", corpus=[src], min_words=1))
    store = TextOutput(tmp_path / "text")
    assert "A living room with a TV." in store.all_texts()  # stored with its case, spacing normalised
    found = caption_sentence_ids(src, store)
    assert {stem: len(ids) for stem, ids in found.items()} == {"000000000139": 3, "astronaut": 1, "dog": 1, "42": 1}
