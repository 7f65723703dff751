"""Hand-checked cases for the official downstream metrics (muvla.tasks.metrics and the task modules)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from muvla.tasks.metrics import accuracy, box_iou, meta_ave, retrieval_recall
from muvla.tasks.nlvr2 import (
    NLVR2Example,
    nlvr2_accuracy_consistency,
    nlvr2_group,
    read_nlvr2_predictions,
    write_nlvr2_predictions,
)
from muvla.tasks.refcoco import covered_by_regions, refcoco_accuracy, write_refcoco_predictions
from muvla.tasks.snli_ve import SNLIVEExample, snli_ve_accuracy, write_snli_ve_predictions
from muvla.tasks.vqa import (
    VQAExample,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_question_accuracy,
    write_vqa_predictions,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number word, lower-cased first
        ("none", "0"),  # official manualMap: 'none' -> '0'
        ("ten.", "10"),
        ("the dog.", "dog"),  # trailing period stripped, article dropped
        ("A", ""),  # only an article: nothing left
        ("isnt", "isn't"),  # contraction map
        ("Dont", "don't"),
        ("Im", "im"),  # official quirk: the map key is 'Im' but words are lower-cased first
        ("3.5", "3.5"),  # a period before a digit is kept
        ("yes!", "yes"),  # '!' not next to a space -> becomes a space -> split away
        ("a man's hat", "man's hat"),  # apostrophes are not punctuation
        ("1,000", "1000"),  # digit,digit: every punctuation mark is deleted
        ("1,000 (approx)", "1000 approx"),
        ("red, white", "red white"),  # ', ' touches a space -> deleted
        ("black/white", "black white"),  # no space around '/' -> replaced by a space
        ("t-shirt", "t shirt"),
        ("  yes\n", "yes"),
        ("$5", "$5"),  # '$' is not in the official punctuation list
    ],
)
def test_normalize_vqa_answer_official_cases(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_leave_one_out_hand_computed() -> None:
    # n humans of 10 gave the answer; 10 subsets leave one human out:
    # n subsets keep n-1 matches, 10-n keep n. Score = mean of min(1, matches/3).
    # n=1: (1*0 + 9*1/3)/10 = 0.3
    # n=2: (2*1/3 + 8*2/3)/10 = (2/3 + 16/3)/10 = 0.6
    # n=3: (3*2/3 + 7*1)/10 = (2 + 7)/10 = 0.9
    # n=4: (4*1 + 6*1)/10 = 1.0
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for n, score in expected.items():
        gts = ["cat"] * n + ["dog"] * (10 - n)
        assert vqa_question_accuracy("cat", gts) == pytest.approx(score), n


def test_vqa_normalisation_applies_when_humans_disagree() -> None:
    gts = ["2"] * 3 + ["3"] * 7
    assert vqa_question_accuracy("Two", gts) == pytest.approx(0.9)
    assert vqa_question_accuracy("two.", gts) == pytest.approx(0.9)


def test_vqa_official_guard_unanimous_answers() -> None:
    # Official evaluator: no normalisation when all 10 answers agree, so "Yes" != "yes".
    gts = ["yes"] * 10
    assert vqa_question_accuracy("Yes", gts) == 0.0
    assert vqa_question_accuracy("yes ", gts) == 1.0  # whitespace is always stripped
    assert vqa_question_accuracy("Yes", gts, official_guard=False) == 1.0


def test_vqa_accuracy_mean_and_missing_prediction() -> None:
    exs = [VQAExample(1, 10, "q?", ["cat"] * 2 + ["dog"] * 8, {}),
           VQAExample(2, 10, "q?", ["red"] * 10, {})]
    assert vqa_accuracy({1: "cat", 2: "red", 99: "extra is ignored"}, exs) == pytest.approx((0.6 + 1.0) / 2)
    with pytest.raises(ValueError, match="1 of 2 questions have no prediction"):
        vqa_accuracy({1: "cat"}, exs)


def _nlvr(identifier: str, label: bool) -> NLVR2Example:
    return NLVR2Example(identifier, "s", None, None, label)  # type: ignore[arg-type]


def test_nlvr2_accuracy_and_consistency() -> None:
    assert nlvr2_group("dev-850-2-0") == "dev-850--0"
    exs = [_nlvr("dev-1-0-0", True), _nlvr("dev-1-1-0", False),  # same sentence, two pairs
           _nlvr("dev-1-0-1", True), _nlvr("dev-2-0-0", False)]
    preds = {"dev-1-0-0": True, "dev-1-1-0": True, "dev-1-0-1": True, "dev-2-0-0": False}
    out = nlvr2_accuracy_consistency(preds, exs)
    # 3 of 4 correct; groups dev-1--0 (one wrong), dev-1--1 (ok), dev-2--0 (ok) -> 2/3 consistent
    assert out == {"accuracy": 0.75, "consistency": pytest.approx(2 / 3), "n": 4, "n_groups": 3}
    with pytest.raises(ValueError, match="no prediction"):
        nlvr2_accuracy_consistency({}, exs)


def test_snli_ve_accuracy_and_generic_accuracy() -> None:
    exs = [SNLIVEExample("a", "1", "h", 0), SNLIVEExample("b", "1", "h", 2), SNLIVEExample("c", "1", "h", 1)]
    assert snli_ve_accuracy({"a": "entailment", "b": 2, "c": 0}, exs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not one of"):
        snli_ve_accuracy({"a": "maybe", "b": 2, "c": 0}, exs)
    assert accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 2 targets"):
        accuracy([1, 2, 3], [1, 2])


def test_box_iou_hand_checked() -> None:
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    assert float(box_iou([0, 0, 2, 2], [1, 1, 3, 3])) == pytest.approx(1 / 7)
    assert float(box_iou([0, 0, 2, 2], [2, 2, 4, 4])) == 0.0  # touching corners
    assert float(box_iou([0, 0, 2, 2], [np.nan] * 4)) == 0.0
    m = box_iou(np.array([[0, 0, 2, 2], [0, 0, 4, 4]]), np.array([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]]))
    np.testing.assert_allclose(m, [[1.0, 0.25, 0.0], [0.25, 1 / 16, 0.0]])


def test_refcoco_all_vs_covered() -> None:
    gt = np.array([[0, 0, 10, 10]] * 4, dtype=float)
    pred = np.array([[0, 0, 10, 10],  # IoU 1 -> right
                     [0, 0, 10, 4],  # IoU 0.4 -> wrong
                     [20, 20, 30, 30],  # wrong (and its object is not covered by any region)
                     [0, 0, 10, 5]])  # IoU exactly 0.5 -> right (>=)
    covered = [True, True, False, True]
    out = refcoco_accuracy(pred, gt, covered, n_unscored=1)  # + 1 expression never scored
    assert out == {"acc_all": pytest.approx(2 / 5), "acc_covered": pytest.approx(2 / 3),
                   "n_all": 5, "n_covered": 3}
    assert covered_by_regions([0, 0, 10, 10], np.array([[0, 0, 10, 6], [50, 50, 60, 60]]))
    assert not covered_by_regions([0, 0, 10, 10], np.array([[0, 0, 10, 4]]))
    assert not covered_by_regions([0, 0, 10, 10], np.zeros((0, 4)))
    with pytest.raises(ValueError, match="4 predictions, 4 ground truths, 3 covered"):
        refcoco_accuracy(pred, gt, covered[:3])


def test_retrieval_recall_tiny_matrix() -> None:
    t2i = [0, 0, 1, 1, 2, 2]  # 3 images with 2 captions each
    s = np.array([[0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: best text 0 (own) -> rank 0
                  [0.9, 0.0, 0.1, 0.2, 0.8, 0.0],  # image 1: t0, t4 beat its best own text t3 -> rank 2
                  [0.0, 0.0, 0.0, 0.0, 0.5, 0.0]])  # image 2: t4 own -> rank 0
    out = retrieval_recall(s, t2i, ks=(1, 2))
    # text ranks of the true image: t0 tie img0/img1 -> stable -> 0; t1 0; t2 1; t3 0; t4 1; t5 all tie -> 2
    assert out["i2t_r1"] == pytest.approx(2 / 3)
    assert out["i2t_r2"] == pytest.approx(2 / 3)
    assert out["t2i_r1"] == pytest.approx(3 / 6)
    assert out["t2i_r2"] == pytest.approx(5 / 6)
    assert out["rsum"] == pytest.approx(2 / 3 + 2 / 3 + 1 / 2 + 5 / 6)
    assert out["mean_recall"] == pytest.approx(out["rsum"] / 4)
    assert retrieval_recall(s, t2i)["t2i_r10"] == 1.0
    assert retrieval_recall(s.astype(np.float32), t2i, ks=(1, 2), chunk=2) == out  # chunking changes nothing
    with pytest.raises(ValueError, match="some image has no text"):
        retrieval_recall(s, [0, 0, 1, 1, 1, 1])


def test_retrieval_recall_matches_sorting_reference() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(7, 21)).astype(np.float32)  # many ties on purpose
    t2i = np.repeat(np.arange(7), 3)
    out = retrieval_recall(s, t2i, ks=(1, 3), chunk=3)
    # reference: full stable argsorts
    t_order = np.argsort(-s, axis=0, kind="stable")
    t_rank = np.argmax(t_order == t2i[None, :], axis=0)
    i_order = np.argsort(-s, axis=1, kind="stable")
    i_rank = np.argmax(t2i[i_order] == np.arange(7)[:, None], axis=1)
    for k in (1, 3):
        assert out[f"t2i_r{k}"] == pytest.approx(np.mean(t_rank < k))
        assert out[f"i2t_r{k}"] == pytest.approx(np.mean(i_rank < k))


def test_meta_ave() -> None:
    assert meta_ave({"vqa": 0.7, "nlvr2": 0.5, "snli_ve": 0.6}) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        meta_ave({})


def test_prediction_files_official_formats(tmp_path) -> None:
    p = write_vqa_predictions(tmp_path / "vqa.json", {5: "yes", 2: "2"})
    assert json.loads(p.read_text()) == [{"question_id": 2, "answer": "2"}, {"question_id": 5, "answer": "yes"}]

    p = write_nlvr2_predictions(tmp_path / "nlvr2.csv", {"dev-1-0-0": True, "dev-1-1-0": False})
    assert p.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
    assert read_nlvr2_predictions(p) == {"dev-1-0-0": True, "dev-1-1-0": False}
    (tmp_path / "bad.csv").write_text("dev-1-0-0,True\ndev-1-1-0,maybe\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        read_nlvr2_predictions(tmp_path / "bad.csv")

    p = write_snli_ve_predictions(tmp_path / "ve.jsonl", {"x#1": 2, "x#0": "entailment"})
    assert [json.loads(line) for line in p.read_text().splitlines()] == [
        {"pairID": "x#0", "gold_label": "entailment"}, {"pairID": "x#1", "gold_label": "contradiction"}]

    p = write_refcoco_predictions(tmp_path / "ref.json", {3: (1, 2, 3, 4)})
    assert json.loads(p.read_text()) == [{"sent_id": 3, "box": [1.0, 2.0, 3.0, 4.0]}]
