"""Development sets (caption simulation, hidden own captions) and bootstrap recall."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from muvla.retrieval.devsets import (
    DevSet,
    NounLexicon,
    caption_simulation_devset,
    hidden_caption_devset,
    tags_from_captions,
)
from muvla.retrieval.evaluation import bootstrap_recall, own_caption_hits, paired_difference
from muvla.retrieval.queries import TaggedImage
from muvla.retrieval.rerank import RankingConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_captions(path: Path, captions: dict[int, list[str]]) -> Path:
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in captions]
    annotations = [{"image_id": i, "id": 100 * i + j, "caption": c}
                   for i, texts in captions.items() for j, c in enumerate(texts)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


@pytest.mark.parametrize(("caption", "expected"), [
    ("Two dogs and a man playing frisbee.", {"dog": 2, "person": 1, "frisbee": 1}),
    ("A group of people next to a hot dog stand", {"person": 3, "hot dog": 1}),
    ("A couple of dogs sit on a sofa", {"dog": 2, "couch": 1}),
    ("Men riding bikes past 4 cars", {"person": 2, "bicycle": 2, "car": 4}),
    ("A woman holds a tennis racket", {"person": 1, "tennis racket": 1}),
    ("An empty street at night", {}),
])
def test_lexicon_maps_caption_nouns_to_detector_classes_with_counts(caption: str, expected: dict) -> None:
    assert dict(NounLexicon().mentions(caption)) == expected


def test_simulated_tags_take_the_largest_count_any_caption_states() -> None:
    captions = ["A dog on a couch.", "Three dogs on a sofa with a remote."]
    tags = tags_from_captions(captions, NounLexicon(), np.random.default_rng(0))
    assert sorted(tags) == ["couch", "dog", "dog", "dog", "remote"]


def test_simulation_hides_one_caption_and_excludes_the_tag_sources(tmp_path: Path) -> None:
    pool = write_captions(tmp_path / "pool.json", {
        1: ["A dog on a bed.", "Two dogs sleep.", "A puppy on a bed.", "Dogs resting.", "A dog and a cat."],
        2: ["Sunset over hills.", "Red sky.", "Hills at dusk.", "A quiet evening.", "Clouds."],  # no class
        3: ["A bus.", "A red bus.", "A bus on a street.", "A double decker bus.", "A dog."],
        4: ["A cat.", "Two cats."],  # fewer than five captions
    })
    devset = caption_simulation_devset(pool, seed=3)
    assert [im.image_id for im in devset.images] == ["1", "3"]
    assert len(devset.sentences) == 17
    for image_id, relevant, excluded in zip(["1", "3"], devset.relevant, devset.excluded):
        assert len(relevant) == 1 and len(excluded) == 4
        assert not set(relevant) & set(excluded)
        own = {s for s in devset.sentences[:5]} if image_id == "1" else set(devset.sentences[10:15])
        assert {devset.sentences[i] for i in [*relevant, *excluded]} == own
    assert "bus" in devset.images[1].tags


def test_hidden_captions_join_the_pool_and_name_the_relevant_rows(tmp_path: Path) -> None:
    pool = write_captions(tmp_path / "pool.json", {7: ["A cat on a mat.", "A horse in a field."]})
    own = write_captions(tmp_path / "own.json", {1: ["A dog runs.", "A cat on a mat."], 2: ["A bus."]})
    images = [TaggedImage(f"{i:012d}", ["dog"], np.ones(1, np.float32), np.ones(1, np.float32)) for i in (1, 5)]
    devset = hidden_caption_devset("tiny", images, own, pool)
    assert [im.image_id for im in devset.images] == ["000000000001"]  # image 5 has no caption
    assert devset.sentences == ["A cat on a mat.", "A horse in a field.", "A dog runs.", "A bus."]
    assert devset.relevant[0].tolist() == [0, 2]  # a caption already in the pool is the same sentence


def test_split_is_a_partition() -> None:
    images = [TaggedImage(str(i), ["dog"], np.ones(1, np.float32), np.ones(1, np.float32)) for i in range(10)]
    devset = DevSet("d", images, ["s"], [np.zeros(1, np.int64)] * 10, [np.zeros(0, np.int64)] * 10)
    select, confirm = devset.split(0.3, seed=0)
    ids = [im.image_id for im in select.images] + [im.image_id for im in confirm.images]
    assert len(confirm.images) == 3 and sorted(ids, key=int) == [str(i) for i in range(10)]


def test_own_caption_hits_skip_excluded_sentences() -> None:
    # One-hot world: query "a dog" is nearest to sentence 0, then 1; sentence 0 is excluded for image 0.
    sentences = ["dog a", "dog b", "cat"]
    emb = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([[1.0, 0, 0] if "dog" in t else [0, 0, 1.0] for t in texts], np.float32)

    images = [TaggedImage(i, [t], np.ones(1, np.float32), np.ones(1, np.float32))
              for i, t in (("x", "dog"), ("y", "cat"), ("z", "dog"))]
    devset = DevSet("d", images, sentences, [np.array([1]), np.array([2]), np.array([1])],
                    [np.array([0]), np.zeros(0, np.int64), np.zeros(0, np.int64)])
    hits = own_caption_hits(devset, emb, RankingConfig(query_mode="official", hubness="none"), encode, ks=(1, 2))
    assert hits.tolist() == [[True, True], [True, True], [False, True]]


def test_bootstrap_intervals_cover_the_estimate_and_pair_the_images() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((300, 3)) < 0.3
    b = a.copy()
    b[:30, 0] = True  # b finds 30 more images at rank 1, otherwise identical
    recall = bootstrap_recall(a)
    assert (recall.low <= recall.mean).all() and (recall.mean <= recall.high).all()
    diff = paired_difference(b, a)
    assert diff.low[0] > 0  # a paired comparison sees the gain although the two intervals overlap
    assert diff.mean[1] == 0 and diff.low[1] == 0 and diff.high[1] == 0


@pytest.mark.skipif(not (SHARED / "text" / "coco_val2017_captions_pool.json").exists(),
                    reason="../shared/data (COCO val2017 caption pool) not available")
def test_simulation_on_the_real_pool_gives_thousands_of_queries() -> None:
    devset = caption_simulation_devset(SHARED / "text" / "coco_val2017_captions_pool.json")
    assert len(devset.images) > 4000
    assert all(len(r) == 1 and not np.isin(r, e).any() for r, e in zip(devset.relevant, devset.excluded))
    people = sum("person" in im.tags for im in devset.images)
    assert people > len(devset.images) // 3


def test_paired_difference_needs_the_same_images() -> None:
    with pytest.raises(ValueError, match="shapes"):
        paired_difference(np.zeros((4, 3), bool), np.zeros((5, 3), bool))
