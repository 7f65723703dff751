"""The salient query mode and the ranking step (cosine top-K, CSLS hubness correction)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from muvla.corpus.region_store import ImageRegions, RegionPartWriter, merge_region_parts
from muvla.retrieval.queries import TaggedImage, make_query, salient_query
from muvla.retrieval.rerank import RankingConfig, rank_images, rank_sentences, read_tagged_images


def unit_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def flat_index(emb: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    return index


def test_salient_lists_the_biggest_objects_first_with_their_counts() -> None:
    tags = ["fork", "fork", "fork", "dining table", "person", "person"]
    areas = np.array([0.001, 0.002, 0.001, 0.4, 0.1, 0.3])
    assert salient_query(tags, areas) == "a dining table, two people, three forks"
    assert make_query(tags, "salient", areas) == salient_query(tags, areas)


def test_salient_without_areas_keeps_first_occurrence_and_drops_generic_tags() -> None:
    tags = ["background", "dog", "frisbee", "dog"]
    assert salient_query(tags) == "two dogs, a frisbee"
    assert salient_query(tags, np.full(4, np.nan)) == "two dogs, a frisbee"
    assert salient_query(["background"]) == "a background"
    assert salient_query([]) == ""
    with pytest.raises(ValueError, match="areas"):
        salient_query(["dog"], np.array([0.1, 0.2]))


def test_no_correction_is_exact_cosine_top_k() -> None:
    rng = np.random.default_rng(0)
    sentences, queries = unit_rows(rng.normal(size=(50, 8))), unit_rows(rng.normal(size=(7, 8)))
    ranked = rank_sentences(queries, flat_index(sentences), sentences, 5, RankingConfig(hubness="none"))
    cos = queries @ sentences.T
    np.testing.assert_array_equal(ranked.ids, np.argsort(-cos, axis=1)[:, :5])
    np.testing.assert_allclose(ranked.scores, np.sort(cos, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_csls_score_is_cosine_minus_half_the_sentence_hubness() -> None:
    rng = np.random.default_rng(1)
    sentences, queries = unit_rows(rng.normal(size=(30, 6))), unit_rows(rng.normal(size=(12, 6)))
    cfg = RankingConfig(hubness="csls", neighbours=3, candidates=30)
    ranked = rank_sentences(queries, flat_index(sentences), sentences, 4, cfg)
    cos = queries @ sentences.T
    hubness = np.sort(cos, axis=0)[::-1][:3].mean(axis=0)  # each sentence's 3 nearest queries
    expected = cos - 0.5 * hubness
    np.testing.assert_array_equal(ranked.ids, np.argsort(-expected, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(ranked.scores, np.take_along_axis(expected, ranked.ids, axis=1), atol=1e-5)
    np.testing.assert_allclose(ranked.cosines, np.take_along_axis(cos, ranked.ids, axis=1), atol=1e-5)


def test_csls_demotes_a_sentence_that_is_near_every_query() -> None:
    # Four queries along four axes; sentence 4 ("hub", cosine 0.4975 to each) is every query's cosine
    # nearest, while sentence i is near query i only (cosine 0.45) and orthogonal to the others.
    queries = np.eye(4, 5, dtype=np.float32)
    specific = unit_rows(np.eye(4, 5) * 0.45 + np.eye(1, 5, k=4) * np.sqrt(1 - 0.45**2))
    hub = unit_rows(np.array([[0.5, 0.5, 0.5, 0.5, 0.1]]))
    sentences = np.concatenate([specific, hub])
    index = flat_index(sentences)
    plain = rank_sentences(queries, index, sentences, 1, RankingConfig(hubness="none"))
    assert plain.ids[:, 0].tolist() == [4, 4, 4, 4]
    corrected = rank_sentences(queries, index, sentences, 1, RankingConfig(hubness="csls", neighbours=2))
    assert corrected.ids[:, 0].tolist() == [0, 1, 2, 3]


def test_a_bank_sample_and_float16_embeddings_give_a_full_ranking() -> None:
    rng = np.random.default_rng(2)
    sentences, queries = unit_rows(rng.normal(size=(40, 8))), unit_rows(rng.normal(size=(20, 8)))
    cfg = RankingConfig(hubness="csls", bank_size=5, candidates=10, query_batch_size=3)
    ranked = rank_sentences(queries, flat_index(sentences), sentences.astype(np.float16), 6, cfg)
    assert ranked.ids.shape == (20, 6) and (ranked.ids >= 0).all()
    assert all(len(set(row)) == 6 for row in ranked.ids.tolist())
    assert (np.diff(ranked.scores, axis=1) <= 1e-6).all()
    again = rank_sentences(queries, flat_index(sentences), sentences.astype(np.float16), 6, cfg)
    np.testing.assert_array_equal(ranked.ids, again.ids)


def test_k_beyond_the_index_leaves_minus_one() -> None:
    sentences = unit_rows(np.eye(3, 4) + 0.1)
    ranked = rank_sentences(unit_rows(np.ones((2, 4))), flat_index(sentences), sentences, 5, RankingConfig())
    assert (ranked.ids[:, :3] >= 0).all() and (ranked.ids[:, 3:] == -1).all()
    assert (ranked.scores[:, 3:] == 0).all()


def test_rank_images_encodes_each_query_once_and_skips_images_without_tags() -> None:
    vocabulary = {"two dogs": 0, "a cat": 1}
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.eye(2, 3, dtype=np.float32)[[vocabulary[t] for t in texts]]

    sentences = unit_rows(np.array([[1.0, 0.1, 0], [0.1, 1.0, 0], [0.5, 0.5, 0.7]]))
    images = [TaggedImage("a", ["dog", "dog"], np.ones(2, np.float32), np.full(2, np.nan, np.float32)),
              TaggedImage("b", [], np.zeros(0, np.float32), np.zeros(0, np.float32)),
              TaggedImage("c", ["cat"], np.ones(1, np.float32), np.ones(1, np.float32)),
              TaggedImage("d", ["dog", "dog"], np.ones(2, np.float32), np.full(2, np.nan, np.float32))]
    ranked = rank_images(images, flat_index(sentences), sentences, 2, RankingConfig(query_mode="salient"), encode)
    assert calls == [["two dogs", "a cat"]]
    assert ranked.queries == ["two dogs", "", "a cat", "two dogs"]
    assert ranked.ids[0, 0] == 0 and ranked.ids[2, 0] == 1
    assert (ranked.ids[1] == -1).all()
    np.testing.assert_array_equal(ranked.ids[0], ranked.ids[3])


def test_config_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="query_mode"):
        RankingConfig(query_mode="fancy").validate()
    with pytest.raises(ValueError, match="hubness"):
        RankingConfig(hubness="magic").validate()
    with pytest.raises(ValueError, match="neighbours"):
        RankingConfig(neighbours=0).validate()


def test_read_tagged_images_keeps_scores_areas_and_the_best_tag(tmp_path: Path) -> None:
    writer = RegionPartWriter(max_regions=3, feature_dim=4, capacity=2)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 1, 2]], np.float32)
    for image_id, tags, scores in (("a", ["dog", "puck", "frisbee"], [0.9, 0.1, 0.6]),
                                   ("b", ["bubble", "jellyfish", ""], [0.2, 0.3, 0.0])):
        writer.add(ImageRegions(image_id=image_id, file=f"{image_id}.jpg", width=10, height=10, boxes=boxes,
                                tags=tags, scores=np.array(scores, np.float32), class_ids=np.zeros(3, np.int32),
                                features=np.zeros((3, 4), np.float16)))
    part = tmp_path / "parts" / "part-00000"
    part.mkdir(parents=True)
    writer.write(part)
    merge_region_parts(tmp_path)
    every = read_tagged_images(tmp_path)
    assert [im.tags for im in every] == [["dog", "puck", "frisbee"], ["bubble", "jellyfish"]]
    np.testing.assert_allclose(every[0].areas, [1.0, 0.25, 0.02])
    confident = read_tagged_images(tmp_path, min_tag_score=0.5)
    assert [im.tags for im in confident] == [["dog", "frisbee"], ["jellyfish"]]
    np.testing.assert_allclose(confident[0].scores, [0.9, 0.6])
