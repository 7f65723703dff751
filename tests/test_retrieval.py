"""Retrieval stage: query modes, exact top-K with real Sentence-BERT, exclusion, index types, resume, shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from muvla.corpus.region_store import ImageRegions
from muvla.corpus.synthetic import write_region_store
from muvla.retrieval import (
    RetrievalConfig,
    counted_query,
    make_query,
    official_query,
    pluralise,
    run_retrieval,
)
from muvla.text import TextConfig, run_text
from muvla.utils.config import ConfigError

SENTENCES = [
    "Two dogs are playing with a frisbee on the grass.",
    "A pizza sits on a wooden table in a restaurant.",
    "A man rides a surfboard on a big wave.",
    "A cat is sleeping on a laptop keyboard.",
    "A red double decker bus drives down the street.",
    "Three people stand next to a train at the station.",
    "A plate of broccoli and rice on a kitchen counter.",
    "An airplane flies over snowy mountains.",
    "A little girl holds a pink umbrella in the rain.",
    "A giraffe eats leaves from a tall tree.",
    "A dog catches a frisbee in a park.",
    "Two horses graze in a green field.",
]
REFERENCE = {"query_mode": "official", "hubness": "none"}  # the reference recipe: plain cosine top-K
IMAGES = {
    "img-a": ["dog", "dog", "frisbee", "grass"],
    "img-b": ["pizza", "dining table"],
    "img-c": [],
    "img-d": ["giraffe", "tree"],
    "img-e": ["person", "person", "person", "train"],
}


def write_regions(folder: Path, images: dict[str, list[str]]) -> Path:
    """A region store whose regions carry the given tags (boxes and features are placeholders)."""
    rows = []
    for image_id, tags in images.items():
        n = len(tags)
        rows.append(ImageRegions(image_id, f"{image_id}.jpg", 100, 100, np.tile([0, 0, 10, 10], (n, 1)).astype(np.float32),
                                 list(tags), np.ones(n, np.float32), np.full(n, -1, np.int32),
                                 np.zeros((n, 4), np.float16)))
    return write_region_store(folder, rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    src = root / "sentences.txt"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    run_text(TextConfig(out=root / "text", corpus=[src]))
    return root / "text", write_regions(root / "regions", IMAGES)


@pytest.fixture(scope="module")
def flat_run(corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    text, regions = corpus
    out = tmp_path_factory.mktemp("flat") / "ret"
    run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5, **REFERENCE))
    return out


def _topk(out: Path) -> dict[str, list[int]]:
    table = pq.read_table(out / "topk.parquet").to_pandas()
    return {i: g.sort_values("rank").sentence_id.tolist() for i, g in table.groupby("image_id", sort=False)}


# ----- query modes -----------------------------------------------------------------------------

def test_pluralise_rules() -> None:
    cases = {"dog": "dogs", "person": "people", "man": "men", "woman": "women", "child": "children",
             "mouse": "mice", "bus": "buses", "box": "boxes", "bench": "benches", "dish": "dishes",
             "pony": "ponies", "toy": "toys", "sheep": "sheep", "knife": "knives",
             "tennis racket": "tennis rackets", "wine glass": "wine glasses"}
    assert {w: pluralise(w) for w in cases} == cases


def test_official_query_dedupes_in_first_occurrence_order() -> None:
    assert official_query(["person", "person", "dog", "person", "frisbee"]) == "person dog frisbee"
    assert official_query(["", "  ", None]) == ""


def test_counted_query_keeps_multiplicity() -> None:
    assert counted_query(["dog", "frisbee", "dog", "person"]) == "two dogs, a frisbee, a person"
    assert counted_query(["person"] * 3 + ["apple"]) == "three people, an apple"
    assert counted_query(["cup"] * 14) == "14 cups"
    assert counted_query(["grass", "grass", "cow"]) == "grass, a cow"  # mass noun: no article, no number
    # generic whole-image tags are dropped unless nothing else is left
    assert counted_query(["background", "dog"]) == "a dog"
    assert counted_query(["background"]) == "a background"
    with pytest.raises(ValueError, match="query mode"):
        make_query(["dog"], "fancy")


# ----- stage -----------------------------------------------------------------------------------

def test_flat_retrieval_finds_the_right_sentence(flat_run: Path) -> None:
    topk = _topk(flat_run)
    assert list(topk) == ["img-a", "img-b", "img-d", "img-e"]  # image order kept, img-c skipped
    assert topk["img-a"][0] in (0, 10) and set(topk["img-a"][:2]) == {0, 10}
    assert topk["img-b"][0] == 1
    assert topk["img-d"][0] == 9
    assert topk["img-e"][0] == 5
    table = pq.read_table(flat_run / "topk.parquet")
    assert table.column("rank").to_pylist()[:3] == [0, 1, 2]
    scores = table.column("score").to_numpy().reshape(-1, 3)
    assert np.all(np.diff(scores, axis=1) <= 1e-6) and np.all(scores <= 1.0001)
    summary = json.loads((flat_run / "summary.json").read_text())
    assert summary["status"] == "done"
    assert summary["images_skipped"] == 1 and summary["skipped_examples"] == ["img-c"]
    assert summary["queries"] == 4 and summary["sentences"] == len(SENTENCES)
    assert 0 < summary["hubness"]["fraction_of_corpus_retrieved"] <= 1
    queries = pq.read_table(flat_run / "queries.parquet").to_pydict()
    assert queries == {"image_id": ["img-a", "img-b", "img-d", "img-e"],
                       "query": ["dog frisbee grass", "pizza dining table", "giraffe tree", "person train"]}
    emb = np.load(flat_run / "embeddings" / "part-00000.npy")
    assert emb.dtype == np.float16 and emb.shape[0] == 5
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-2)
    skipped = [json.loads(x) for x in (flat_run / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"image_id": "img-c", "reason": "no region tags"}]


def test_exclusion_list_is_honoured(corpus: tuple[Path, Path], flat_run: Path, tmp_path: Path) -> None:
    text, regions = corpus
    out = tmp_path / "ret"
    shutil.copytree(flat_run / "embeddings", out / "embeddings")
    excl = tmp_path / "exclude.txt"
    excl.write_text("0\n10\n# comment\n9\n", encoding="utf-8")
    summary = run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5, **REFERENCE,
                                            exclude_sentence_ids=excl))
    assert summary["sentences_encoded_now"] == 0  # reused units
    topk = _topk(out)
    retrieved = {s for ids in topk.values() for s in ids}
    assert not retrieved & {0, 9, 10}
    assert all(len(ids) == 3 for ids in topk.values())
    assert summary["excluded_sentences"] == 3 and summary["indexed_sentences"] == len(SENTENCES) - 3
    assert _topk(flat_run)["img-b"] == topk["img-b"]  # images whose hits were not excluded are unchanged

    bad = tmp_path / "bad.txt"
    bad.write_text("99\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="outside"):
        run_retrieval(RetrievalConfig(out=tmp_path / "r2", regions=regions, text=text, exclude_sentence_ids=bad,
                                      unit_size=5))


@pytest.mark.parametrize("index", ["IVF2,Flat", "HNSW32"])
def test_non_flat_index(corpus: tuple[Path, Path], flat_run: Path, tmp_path: Path, index: str) -> None:
    text, regions = corpus
    out = tmp_path / "ret"
    shutil.copytree(flat_run / "embeddings", out / "embeddings")
    summary = run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5, **REFERENCE,
                                            index=index, nprobe=2))
    assert summary["index"] == index and (out / "index.faiss").exists()
    # nprobe == nlist (IVF) and a tiny graph (HNSW) make these searches exhaustive: same as Flat
    assert _topk(out) == _topk(flat_run)


def test_bad_index_string(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    text, regions = corpus
    with pytest.raises(ConfigError, match="faiss cannot build"):
        run_retrieval(RetrievalConfig(out=tmp_path / "r", regions=regions, text=text, index="NoSuchIndex9",
                                      unit_size=50))


def test_resume_after_losing_a_unit(corpus: tuple[Path, Path], flat_run: Path, tmp_path: Path) -> None:
    text, regions = corpus
    out = tmp_path / "ret"
    shutil.copytree(flat_run, out)
    again = run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5, **REFERENCE))
    assert again["reused"] is True and again["units_encoded_now"] == 0  # complete and up to date: nothing redone
    (out / "embeddings" / "part-00001.npy").unlink()  # a run killed while encoding: no topk yet, a unit missing
    (out / "topk.parquet").unlink()
    summary = run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5, **REFERENCE))
    assert summary["units_encoded_now"] == 1 and summary["sentences_encoded_now"] == 5
    assert pq.read_table(out / "topk.parquet").equals(pq.read_table(flat_run / "topk.parquet"))
    with pytest.raises(ConfigError, match="unit_size=5 \\(this run: 4\\)"):
        run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=4, **REFERENCE))


def test_two_shards_equal_one(corpus: tuple[Path, Path], flat_run: Path, tmp_path: Path) -> None:
    text, regions = corpus
    out = tmp_path / "ret"

    def cfg(shard: int) -> RetrievalConfig:
        return RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5, shard=shard, num_shards=2,
                               **REFERENCE)

    first = run_retrieval(cfg(0))
    assert first["status"] == "waiting_for_shards" and first["missing_units"] == ["part-00001.npy"]
    assert not (out / "topk.parquet").exists()
    assert run_retrieval(cfg(1))["status"] == "encoded_shard"
    done = run_retrieval(cfg(0))
    assert done["status"] == "done" and done["units_encoded_now"] == 0
    a = pq.read_table(out / "topk.parquet")
    b = pq.read_table(flat_run / "topk.parquet")
    assert a.select(["image_id", "rank", "sentence_id"]).equals(b.select(["image_id", "rank", "sentence_id"]))
    assert np.allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)


def test_counted_mode_and_config_errors(corpus: tuple[Path, Path], flat_run: Path, tmp_path: Path) -> None:
    text, regions = corpus
    out = tmp_path / "ret"
    shutil.copytree(flat_run / "embeddings", out / "embeddings")
    summary = run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=2, unit_size=5,
                                            query_mode="counted", hubness="none"))
    queries = dict(zip(*pq.read_table(out / "queries.parquet").to_pydict().values()))
    assert queries["img-a"] == "two dogs, a frisbee, grass"
    assert queries["img-e"] == "three people, a train"
    assert _topk(out)["img-e"][0] == 5 and summary["k"] == 2
    with pytest.raises(ConfigError, match="query_mode"):
        RetrievalConfig(out=out, regions=regions, text=text, query_mode="x").validate()
    with pytest.raises(ConfigError, match="index.parquet"):
        RetrievalConfig(out=out, regions=tmp_path / "nowhere", text=text).validate()
    with pytest.raises(ConfigError, match="shard"):
        RetrievalConfig(out=out, regions=regions, text=text, shard=2, num_shards=2).validate()


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_coco_pool_smoke(tmp_path: Path, shared_data: Path) -> None:
    """A few hundred real COCO captions plus coco-mini captions; oracle (ground-truth) tags as regions."""
    SHARED = shared_data
    pool = json.loads((SHARED / "text" / "coco_val2017_captions_pool.json").read_text(encoding="utf-8"))
    own = json.loads((SHARED / "coco-mini" / "captions_train2017.json").read_text(encoding="utf-8"))
    inst = json.loads((SHARED / "coco-mini" / "instances_train2017.json").read_text(encoding="utf-8"))
    image_ids = sorted({a["image_id"] for a in own["annotations"]})[:10]
    anns = pool["annotations"][:300] + [a for a in own["annotations"] if a["image_id"] in image_ids]
    (tmp_path / "corpus.json").write_text(json.dumps({"annotations": anns}), encoding="utf-8")
    run_text(TextConfig(out=tmp_path / "text", corpus=[tmp_path / "corpus.json"]))
    names = {c["id"]: c["name"] for c in inst["categories"]}
    tags: dict[str, list[str]] = {str(i): [] for i in image_ids}
    for a in inst["annotations"]:
        if a["image_id"] in image_ids:
            tags[str(a["image_id"])].append(names[a["category_id"]])
    regions = write_regions(tmp_path / "regions", tags)
    summary = run_retrieval(RetrievalConfig(out=tmp_path / "ret", regions=regions, text=tmp_path / "text",
                                            query_mode="counted", k=5))
    assert summary["status"] == "done"
    assert summary["queries"] + summary["images_skipped"] == len(image_ids)
    texts = pq.read_table(tmp_path / "text" / "sentences.parquet").column("text").to_pylist()
    own_text = {str(a["image_id"]): set() for a in anns if "image_id" in a}
    for a in own["annotations"]:
        if a["image_id"] in image_ids:
            own_text[str(a["image_id"])].add(" ".join(a["caption"].split()))
    topk = _topk(tmp_path / "ret")
    found = sum(bool({texts[s] for s in ids} & own_text[i]) for i, ids in topk.items())
    # the images' own captions are in the pool: retrieval must find some of them (measured 0.7 at K=5 on 80 images)
    assert found >= len(topk) // 3


def test_default_salient_queries_with_hubness_reranking(corpus: tuple[Path, Path], flat_run: Path,
                                                      tmp_path: Path) -> None:
    """The default ranks candidates by cos - r_s/2 (CSLS): scores are sorted, cosines kept beside them."""
    text, regions = corpus
    out = tmp_path / "ret"
    shutil.copytree(flat_run / "embeddings", out / "embeddings")
    summary = run_retrieval(RetrievalConfig(out=out, regions=regions, text=text, k=3, unit_size=5))
    assert summary["query_mode"] == "salient" and summary["hubness_correction"] == "csls"
    table = pq.read_table(out / "topk.parquet").to_pandas()
    for _, group in table.groupby("image_id"):
        assert (np.diff(group.sort_values("rank").score.to_numpy()) <= 1e-6).all()
    assert (table.cosine >= table.score).all()  # the correction only subtracts a sentence's hubness
    queries = dict(zip(*pq.read_table(out / "queries.parquet").to_pydict().values()))
    assert queries["img-a"] == "two dogs, a frisbee, grass"  # no boxes of different size: first occurrence
    assert _topk(out)["img-b"][0] == 1 and _topk(out)["img-d"][0] == 9


# ----- index built unit by unit -------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["Flat", "IVF4,Flat"])
def test_index_from_units_equals_the_in_memory_build(tmp_path: Path, spec: str) -> None:
    """The index is built from one embedding unit at a time (the float32 matrix of every sentence is
    4.6 GB at CC3M size), and it is byte for byte the index the whole matrix gave."""
    import faiss

    from muvla.retrieval.stage import build_index, kept_unit_blocks
    from muvla.utils.shards import UnitPlan, resolve_shard, unit_ranges

    n, unit, d, train_size = 230, 50, 8, 60
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    plan = UnitPlan(tmp_path, "part", len(unit_ranges(n, unit)), resolve_shard(0, 1), ".npy")
    for u, (start, stop) in enumerate(unit_ranges(n, unit)):
        np.save(plan.path(u), emb[start:stop])
    keep = np.setdiff1d(np.arange(n), [0, 7, 49, 50, 51, 229])  # excluded ids at unit edges too
    blocks = list(kept_unit_blocks(plan, n, unit, keep))
    assert len(blocks) == plan.n_units and max(b.shape[0] for b in blocks) <= unit
    assert np.array_equal(np.concatenate(blocks), emb[keep].astype(np.float32))

    streamed = build_index(lambda: kept_unit_blocks(plan, n, unit, keep), int(keep.size), spec, train_size)
    # the build as it was: every unit in one float32 matrix, the kept rows copied, sampled, added
    whole = emb.astype(np.float32)[keep]
    reference = faiss.IndexFlatIP(d) if spec == "Flat" else faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if not reference.is_trained:
        sample = np.sort(np.random.default_rng(0).choice(whole.shape[0], train_size, replace=False))
        reference.train(whole[sample])
    reference.add(whole)
    assert np.array_equal(faiss.serialize_index(streamed), faiss.serialize_index(reference))


def test_topk_rows_skip_missing_neighbours_and_count_short_images() -> None:
    """An approximate index may return -1 (fewer than K neighbours): those slots are skipped, ranks
    stay 0..found-1 in image order, and the summary's count of images with fewer than K holds."""
    from muvla.retrieval.rerank import Ranking
    from muvla.retrieval.stage import topk_rows

    ids = np.array([[2, -1, 0], [-1, -1, -1], [2, -1, 0], [1, 0, 2]])
    scores = np.where(ids >= 0, 0.5, 0.0).astype(np.float32)
    topk = topk_rows(["a", "b", "c", "d"], Ranking(ids, scores, scores + 0.1), np.array([10, 11, 12]))
    assert topk.image_id == ["a", "a", "c", "c", "d", "d", "d"]
    assert topk.rank.tolist() == [0, 1, 0, 1, 0, 1, 2]
    assert topk.sentence_id.tolist() == [12, 10, 12, 10, 11, 10, 12]
    assert topk.score.dtype == np.float32 and topk.rank.dtype == np.int32
    assert np.allclose(topk.cosine, 0.6)
    short = int(np.count_nonzero(topk.rank == 0) - np.count_nonzero(topk.rank == 2))  # as run_retrieval counts
    assert short == sum(1 for pairs in topk.by_image().values() if len(pairs) < 3) == 2


def test_tags_and_topk_ids_are_shared_strings(corpus: tuple[Path, Path], flat_run: Path) -> None:
    """Every occurrence of a tag (and each of an image's K top-K rows) is one string object, so a
    CC3M-size index does not hold ~10^8 copies."""
    from muvla.corpus.layout import RegionsOutput, RetrievalOutput

    _, regions = corpus
    ids, tags = RegionsOutput(regions).image_tags()
    assert dict(zip(ids, tags)) == IMAGES
    people = tags[ids.index("img-e")]
    assert people[0] is people[1] is people[2]
    assert tags[ids.index("img-a")][0] is tags[ids.index("img-a")][1]
    topk = RetrievalOutput(flat_run).read_topk()
    first = {}
    for image_id in topk.image_id:
        assert first.setdefault(image_id, image_id) is image_id
