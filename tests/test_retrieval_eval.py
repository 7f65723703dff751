"""Retrieval scoring at benchmark size: the fast exhaustive path against the per-pair reference, two-stage
re-scoring (first-stage top k each way), the settings of ``muvla evaluate``, and the bf16 path; on a tiny
random model and a synthetic region store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_helpers import grid_boxes, tiny_model_dir, torch_threads, write_json, write_store
from muvla.corpus.region_store import RegionStore
from muvla.encoders import load_wordpiece_tokenizer
from muvla.model import Model
from muvla.tasks.evaluate import EvaluateConfig, describe, run_evaluate
from muvla.tasks.image_text_retrieval import (
    BELOW_RERANKED,
    CaptionExample,
    caption_index,
    exhaustive_scores,
    first_stage_pairs,
    prepare_scoring,
    reference_retrieval_scores,
    retrieval_scores,
    two_stage_scores,
)
from muvla.tasks.metrics import retrieval_recall
from muvla.tasks.model import TaskModel
from muvla.tasks.registry import get_task
from muvla.utils.config import ConfigError

# ids "1".."7" with 1-5 regions: pairs of one image differ in length, and images differ among themselves
IMAGES = {str(i): {"boxes": grid_boxes(1 + i % 5)} for i in range(1, 8)}
WORDS = ["a", "dog", "runs", "on", "the", "grass", "near", "two", "children", "with", "red", "kites", "under", "blue", "sky"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("reteval")
    model_dir = tiny_model_dir(root / "tiny")
    store_dir = write_store(root / "regions", IMAGES, max_regions=5)
    rng = np.random.default_rng(0)
    texts: list[str] = []
    while len(texts) < 2 * len(IMAGES):  # distinct captions of 1-11 words: no exact ties to order
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12))))
        texts += [text] if text not in texts else []
    captions = [CaptionExample(image_id, texts[2 * i + k], 10 * int(image_id) + k)
                for i, image_id in enumerate(IMAGES) for k in range(2)]
    return {"root": root, "model": model_dir, "regions": store_dir, "store": RegionStore(store_dir),
            "tok": load_wordpiece_tokenizer(str(model_dir)), "captions": captions}


def tiny(env: dict) -> TaskModel:
    torch.manual_seed(0)
    return get_task("retrieval").build_model(Model.from_pretrained(env["model"]), head_dropout=0.0).eval()


def prepared(env: dict, model: TaskModel, precision: str = "fp32"):
    image_ids, _ = caption_index(env["captions"])
    return prepare_scoring(model, env["captions"], image_ids, env["store"], env["tok"], max_text_len=16,
                           device=torch.device("cpu"), precision=precision)


def test_fast_exhaustive_scores_equal_the_per_pair_reference(env: dict) -> None:
    model = tiny(env)
    reference, ref_ids, ref_t2i = reference_retrieval_scores(model, env["captions"], env["store"], env["tok"],
                                                             batch_size=3, max_text_len=16)
    scores, image_ids, t2i = retrieval_scores(model, env["captions"], env["store"], env["tok"], batch_size=4,
                                              max_text_len=16)
    assert (image_ids, t2i) == (ref_ids, ref_t2i) and scores.shape == (7, 14)
    assert len(np.unique(prepared(env, model).text_lengths)) > 3  # caption lengths really differ
    np.testing.assert_allclose(scores, reference, rtol=0, atol=2e-5)
    assert np.abs(reference).max() > 0.1  # not a degenerate all-zero model
    assert retrieval_recall(scores, t2i) == retrieval_recall(reference, ref_t2i)
    assert (np.argsort(-scores, axis=1, kind="stable") == np.argsort(-reference, axis=1, kind="stable")).all()


def test_fast_path_does_not_depend_on_batch_size(env: dict) -> None:
    model = tiny(env)
    inputs = prepared(env, model)
    one = exhaustive_scores(model, inputs, batch_size=1)
    np.testing.assert_allclose(exhaustive_scores(model, inputs, batch_size=64), one, rtol=0, atol=2e-5)


def random_similarity(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def test_two_stage_with_k_at_least_n_is_exhaustive(env: dict) -> None:
    model = tiny(env)
    inputs = prepared(env, model)
    exhaustive = exhaustive_scores(model, inputs, batch_size=8)
    _, t2i = caption_index(env["captions"])
    image_to_text, text_to_image, pairs = two_stage_scores(model, inputs, random_similarity(exhaustive.shape), 14,
                                                           batch_size=8)
    assert pairs == exhaustive.size
    np.testing.assert_allclose(image_to_text, exhaustive, rtol=0, atol=2e-5)
    np.testing.assert_allclose(text_to_image, exhaustive, rtol=0, atol=2e-5)
    assert retrieval_recall(image_to_text, t2i, text_scores=text_to_image) == retrieval_recall(exhaustive, t2i)


def test_two_stage_respects_k_in_both_directions(env: dict) -> None:
    model = tiny(env)
    inputs = prepared(env, model)
    exhaustive = exhaustive_scores(model, inputs, batch_size=8)
    similarity = random_similarity(exhaustive.shape)
    k = 3
    image_to_text, text_to_image, pairs = two_stage_scores(model, inputs, similarity, k, batch_size=8)
    chosen_t, chosen_i = first_stage_pairs(similarity, k)
    assert pairs == len(np.union1d(chosen_t, chosen_i)) < exhaustive.size
    for matrix, axis, chosen in ((image_to_text, 1, chosen_t), (text_to_image, 0, chosen_i)):
        top = np.zeros(exhaustive.size, dtype=bool)
        top[chosen] = True
        top = top.reshape(exhaustive.shape)
        assert (top.sum(axis) == k).all()  # exactly k re-scored per image (i2t) / per caption (t2i)
        # the re-scored set is the first stage's top k
        kth = -np.sort(-similarity, axis=axis).take(k - 1, axis=axis)
        assert (top == (similarity >= np.expand_dims(kth, axis))).all()
        np.testing.assert_allclose(matrix[top], exhaustive[top], rtol=0, atol=2e-5)
        # a pair outside the top k never ranks above a re-scored one, and keeps first-stage order
        outside = np.where(top, -np.inf, matrix).max(axis)
        inside = np.where(top, matrix, np.inf).min(axis)
        assert (outside < inside).all() and (inside - outside >= BELOW_RERANKED - 2.0 - 1e-4).all()
        np.testing.assert_allclose(matrix[~top] - similarity[~top], matrix[~top][0] - similarity[~top][0], atol=1e-5)


def test_bf16_scoring_runs_and_follows_fp32(env: dict) -> None:
    model = tiny(env)
    fp32 = exhaustive_scores(model, prepared(env, model), batch_size=8)
    bf16 = exhaustive_scores(model, prepared(env, model, "bf16"), batch_size=8, precision="bf16")
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    # it really ran in bf16 (8-bit mantissa: ~0.4% per rounding), and stayed close to fp32
    assert 0 < np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()


def captions_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "captions.json", {"annotations": [
        {"image_id": int(i), "id": 10 * int(i) + k, "caption": f"{'a red' if k else 'two'} {w} of image {i}"}
        for i in IMAGES for k, w in enumerate(("dogs", "kite"))]})


def evaluate_config(env: dict, out: Path, data: Path, **kw) -> EvaluateConfig:
    return EvaluateConfig(out=out, task="retrieval", model=str(env["model"]), captions=data, regions=env["regions"],
                          device="cpu", max_text_len=16, **kw)


def test_rerank_k_is_validated_in_one_line(env: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^rerank_k must be >= 0 \(0 = score every pair\), got -1$"):
        evaluate_config(env, tmp_path / "e", captions_file(tmp_path), rerank_k=-1).validate()
    with pytest.raises(ConfigError, match="rerank_query"):
        evaluate_config(env, tmp_path / "e", captions_file(tmp_path), rerank_k=2, rerank_query="tags").validate()


def test_evaluate_records_rerank_k_and_resolved_precision(env: dict, tmp_path: Path) -> None:
    data = captions_file(tmp_path)
    exhaustive = run_evaluate(evaluate_config(env, tmp_path / "full", data, precision="fp32"))
    two_stage = run_evaluate(evaluate_config(env, tmp_path / "ts", data, precision="fp32", rerank_k=2))
    record = json.loads((tmp_path / "ts" / "build.json").read_text())
    assert record["settings"]["rerank_k"] == 2 and record["settings"]["precision"] == "fp32"
    assert record["settings"]["rerank_query"] == "salient"
    full_settings = json.loads((tmp_path / "full" / "build.json").read_text())["settings"]
    assert full_settings["rerank_k"] == 0 and "rerank_query" not in full_settings  # no first stage to record
    assert two_stage["precision"] == "fp32" and two_stage["scoring"]["rerank_k"] == 2
    n_images, n_captions = 7, 14
    assert exhaustive["scoring"]["pairs_scored"] == n_images * n_captions
    assert n_captions * 2 <= two_stage["scoring"]["pairs_scored"] < n_images * n_captions
    assert (tmp_path / "ts" / "scores_t2i_retrieval_val.npy").is_file()
    assert not (tmp_path / "full" / "scores_t2i_retrieval_val.npy").exists()
    preds = json.loads((tmp_path / "ts" / "predictions_retrieval_val.json").read_text())
    assert len(preds["image_to_text"]) == n_images and len(preds["text_to_image"]) == n_captions
    assert any("top 2 re-scored" in line for line in describe(two_stage))
    # auto resolves to what this machine computes natively, and that is what the record holds
    auto = run_evaluate(evaluate_config(env, tmp_path / "auto", data, max_images=2))
    assert auto["precision"] in ("fp32", "bf16")
    assert json.loads((tmp_path / "auto" / "build.json").read_text())["settings"]["precision"] == auto["precision"]
