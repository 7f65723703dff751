"""Downstream task readers (the task modules' loaders): generated files in the official formats, plus the
real files of ../shared/data when present."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from muvla.tasks.files import NO_REGIONS, Record
from muvla.tasks.image_text_retrieval import (
    caption_index,
    load_caption_lines,
    load_caption_tsv,
    load_captions,
    load_coco_captions,
    read_captions,
)
from muvla.tasks.nlvr2 import load_nlvr2, nlvr2_accuracy_consistency, nlvr2_image_stem
from muvla.tasks.refcoco import load_refcoco, load_refcoco_json
from muvla.tasks.snli_ve import LABELS, load_snli_ve
from muvla.tasks.spec import ReadOptions
from muvla.tasks.vocab import AnswerVocab
from muvla.tasks.vqa import OUT_OF_VOCAB, build_answer_vocab, load_vqa, vqa_accuracy, vqa_soft_scores
from muvla.utils.config import ConfigError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------ VQA


def test_vqa_soft_scores_normalised_leave_one_out() -> None:
    answers = ["Two", "2", "2.", "three", "3", "3", "3", "blue", "yes", "yes"]
    # normalised: 2 x3 -> 0.9, 3 x4 -> 1.0, blue x1 -> 0.3, yes x2 -> 0.6
    assert vqa_soft_scores(answers) == pytest.approx({"2": 0.9, "3": 1.0, "blue": 0.3, "yes": 0.6})


def test_answer_vocab_file_and_build(tmp_path: Path) -> None:
    v = AnswerVocab.from_file(_write_json(tmp_path / "a2l.json", {"yes": 0, "no": 1, "2": 2}))
    assert len(v) == 3 and v.label("no") == 1 and v.answer(2) == "2" and "maybe" not in v
    assert AnswerVocab.from_file(_write_json(tmp_path / "l2a.json", ["yes", "no"])).label("no") == 1
    with pytest.raises(ValueError, match="integers 0..1"):
        AnswerVocab.from_file(_write_json(tmp_path / "gap.json", {"yes": 0, "no": 5}))
    anns = [{"multiple_choice_answer": a} for a in ["yes"] * 3 + ["Two"] * 2 + ["2"] + ["rare"]]
    built = build_answer_vocab(anns, min_count=2)
    assert built.answers == ["2", "yes"]  # 'Two' and '2' merge (3 each); ties broken alphabetically
    assert AnswerVocab.from_file(built.save(tmp_path / "built.json")).answers == built.answers
    with pytest.raises(ValueError, match="no answer occurs"):
        build_answer_vocab(anns, min_count=10)


def _vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    qs = [{"question_id": 1, "image_id": 10, "question": "How many?"},
          {"question_id": 2, "image_id": 20, "question": "What color?"},
          {"question_id": 2, "image_id": 20, "question": "duplicate"},
          {"question_id": 3, "image_id": 30, "question": "No annotation?"},
          {"question_id": 4, "image_id": 40},  # no question text
          {"question_id": 5, "image_id": 50, "question": "Odd answers?"},
          {"question_id": "q6", "image_id": 60, "question": "Bad id?"}]
    anns = [{"question_id": 1, "answers": [{"answer": a} for a in ["two"] * 2 + ["3"] * 8]},
            {"question_id": 2, "answers": [{"answer": a} for a in ["red"] * 9 + ["crimson"]]},
            {"question_id": 5, "answers": [{"answer": "purple"}] * 10},
            {"question_id": 6, "answers": []}]  # malformed: recorded, and question 6 has no annotation
    return (_write_json(tmp_path / "q.json", {"questions": qs}),
            _write_json(tmp_path / "a.json", {"annotations": anns}))


def test_load_vqa_targets_and_report(tmp_path: Path) -> None:
    qf, af = _vqa_files(tmp_path)
    vocab = AnswerVocab(["2", "3", "red"])
    exs, rep = load_vqa(qf, af, vocab)
    assert [e.question_id for e in exs] == [1, 2, 5]
    assert exs[0].targets == pytest.approx({0: 0.6, 1: 1.0})
    assert exs[1].targets == pytest.approx({2: 1.0})  # 'crimson' dropped (outside vocab)
    assert exs[2].targets == {}  # kept: it still counts (as 0) in the accuracy
    assert rep.kept == 3
    bad_id = "malformed question: field 'question_id' is not an integer id ('q6')"
    assert rep.skipped == {"duplicate question_id": 1, "question has no annotation": 1,
                           "malformed question: missing field 'question'": 1, bad_id: 1,
                           "malformed annotation: 'answers' must be a non-empty list of {'answer': str}": 1}
    assert rep.notes == {OUT_OF_VOCAB: 2, "no answer in vocabulary": 1}
    assert {(r.line, r.reason) for r in rep.records if r.file == str(qf)} == {
        (2, "duplicate question_id"), (3, "question has no annotation"),
        (4, "malformed question: missing field 'question'"), (6, bad_id)}
    rej = [json.loads(x) for x in rep.write_rejected(tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert {"file": str(qf), "line": 3, "reason": "question has no annotation", "key": "question_id=3"} in rej
    assert rep.to_dict()["n_skipped"] == 5
    assert rep.records[0] == Record(str(af), 3, "malformed annotation: 'answers' must be a non-empty list of "
                                                "{'answer': str}")
    assert vqa_accuracy({1: "2", 2: "red", 5: "purple"}, exs) == pytest.approx((0.6 + 1.0 + 1.0) / 3)


def test_load_vqa_has_regions_and_test_split(tmp_path: Path) -> None:
    qf, af = _vqa_files(tmp_path)
    exs, rep = load_vqa(qf, af, AnswerVocab(["3"]), has_regions=lambda image_id: image_id != 10)
    assert 1 not in [e.question_id for e in exs] and rep.skipped[NO_REGIONS] == 1
    test_exs, test_rep = load_vqa(qf, None, AnswerVocab(["3"]))  # no annotations: test questions
    assert [e.question_id for e in test_exs] == [1, 2, 3, 5] and all(not e.answers for e in test_exs)
    with pytest.raises(ValueError, match="expected a VQA questions file"):
        load_vqa(af, None, AnswerVocab(["3"]))
    with pytest.raises(FileNotFoundError):
        load_vqa(tmp_path / "nope.json", None, AnswerVocab(["3"]))


# ---------------------------------------------------------------------------------------- NLVR2


def test_load_nlvr2_missing_image_and_bad_label(tmp_path: Path) -> None:
    img = tmp_path / "images"
    img.mkdir()
    for name in ["dev-1-0-img0.png", "dev-1-0-img1.png", "dev-1-1-img0.png"]:  # dev-1-1-img1 missing
        (img / name).write_bytes(b"png")
    lines = [json.dumps({"identifier": "dev-1-0-0", "sentence": "s0", "label": "True"}),
             json.dumps({"identifier": "dev-1-1-0", "sentence": "s0", "label": "False"}),
             "{not json",
             json.dumps({"identifier": "dev-1-0-1", "sentence": "s1", "label": "maybe"}),
             json.dumps({"identifier": "dev-1-0-2", "sentence": "s2", "label": "false"})]
    jf = _write_lines(tmp_path / "dev.json", lines)
    exs, rep = load_nlvr2(jf, img)
    assert [(e.identifier, e.label) for e in exs] == [("dev-1-0-0", True), ("dev-1-0-2", False)]
    assert exs[0].left_image == img / "dev-1-0-img0.png" and exs[0].right_image == img / "dev-1-0-img1.png"
    assert [(r.line, r.reason) for r in rep.records] == [
        (2, "missing NLVR2 image"), (3, "invalid JSON line"), (4, "label 'maybe' is not True/False")]
    assert "dev-1-1-img1.png" in rep.records[0].key
    # annotations only: no image check
    exs2, rep2 = load_nlvr2(jf, None)
    assert len(exs2) == 3 and rep2.n_skipped == 2
    exs3, rep3 = load_nlvr2(jf, img, has_regions=lambda stem: stem != "dev-1-0-img1")
    assert exs3 == [] and rep3.skipped[NO_REGIONS] == 2
    assert nlvr2_image_stem("train-10171-0-0") == "train-10171-0"


def test_load_nlvr2_train_directory_field(tmp_path: Path) -> None:
    (tmp_path / "img" / "31").mkdir(parents=True)
    for side in (0, 1):
        (tmp_path / "img" / "31" / f"train-5-2-img{side}.png").write_bytes(b"png")
    jf = _write_lines(tmp_path / "train.json", [json.dumps(
        {"identifier": "train-5-2-1", "sentence": "s", "label": "True", "directory": 31})])
    exs, rep = load_nlvr2(jf, tmp_path / "img")
    assert rep.kept == 1 and exs[0].left_image == tmp_path / "img" / "31" / "train-5-2-img0.png"


# -------------------------------------------------------------------------------------- SNLI-VE


def test_load_snli_ve_bad_label_reported_with_line(tmp_path: Path) -> None:
    def row(pid: str, label: str, fid: str = "100") -> str:
        return json.dumps({"Flickr30K_ID": fid, "pairID": pid, "sentence2": f"h {pid}", "gold_label": label})

    jf = _write_lines(tmp_path / "ve.jsonl", [row("p0", "entailment"), row("p1", "-"), row("p2", "contradiction"),
                                              row("p3", "neutral", fid="404")])
    with open(jf, "ab") as f:  # a line that is not UTF-8: skipped with its line, not silently repaired
        f.write(b'{"Flickr30K_ID": "100", "pairID": "p4", "sentence2": "caf\xe9", "gold_label": "neutral"}\n')
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "100.jpg").write_bytes(b"jpg")
    exs, rep = load_snli_ve(jf)
    assert [(e.pair_id, LABELS[e.label]) for e in exs] == [("p0", "entailment"), ("p2", "contradiction"),
                                                          ("p3", "neutral")]
    assert [(r.file, r.line, r.key) for r in rep.records] == [(str(jf), 2, "p1"), (str(jf), 5, "")]
    assert rep.records[1].reason == "invalid UTF-8"
    assert "is not one of entailment/neutral/contradiction" in rep.records[0].reason
    exs2, rep2 = load_snli_ve(jf, tmp_path / "img")
    assert [e.pair_id for e in exs2] == ["p0", "p2"] and rep2.skipped["missing SNLI-VE image"] == 1
    assert exs2[0].image_path == tmp_path / "img" / "100.jpg"
    _, rep3 = load_snli_ve(jf, has_regions=lambda fid: fid == "100")
    assert rep3.skipped[NO_REGIONS] == 1


# ------------------------------------------------------------------------------------- RefCOCO+


def _refer_files(tmp_path: Path) -> tuple[Path, Path, dict]:
    """refs(unc).p + instances.json in the refer toolkit's format (pickle protocol 2, as Python 2 wrote)."""
    refs = [
        {"ref_id": 0, "ann_id": 100, "image_id": 1, "split": "testA", "category_id": 1, "sent_ids": [0, 1],
         "file_name": "COCO_train2014_000000000001_100.jpg",
         "sentences": [{"sent": "man on left", "raw": "Man on left", "tokens": ["man", "on", "left"], "sent_id": 0},
                       {"sent": "left guy", "raw": "left guy", "tokens": ["left", "guy"], "sent_id": 1}]},
        {"ref_id": 1, "ann_id": 101, "image_id": 2, "split": "testB", "category_id": 3, "sent_ids": [2],
         "file_name": "COCO_train2014_000000000002_101.jpg",
         "sentences": [{"sent": "red car", "raw": "red car", "tokens": ["red", "car"], "sent_id": 2}]},
        {"ref_id": 2, "ann_id": 999, "image_id": 2, "split": "testA", "category_id": 3, "sent_ids": [3],
         "file_name": "COCO_train2014_000000000002_999.jpg",
         "sentences": [{"sent": "lost box", "raw": "lost box", "tokens": ["lost", "box"], "sent_id": 3}]},
    ]
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 100, "image_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 1,
                         "area": 1200.0, "iscrowd": 0, "segmentation": [[10, 20, 40, 20, 40, 60]]},
                        {"id": 101, "image_id": 2, "bbox": [0.0, 0.0, 5.0, 5.0], "category_id": 3,
                         "area": 25.0, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"}],
    }
    pf = tmp_path / "refs(unc).p"
    pf.write_bytes(pickle.dumps(refs, protocol=2))
    return pf, _write_json(tmp_path / "instances.json", instances), {"refs": refs, **instances}


def test_load_refcoco_refer_format(tmp_path: Path) -> None:
    pf, inst, _ = _refer_files(tmp_path)
    exs, rep = load_refcoco(pf, inst, "testA")
    assert [(e.ref_id, e.sent_id, e.sentence) for e in exs] == [(0, 0, "man on left"), (0, 1, "left guy")]
    assert exs[0].box == (10.0, 20.0, 40.0, 60.0)  # xywh -> x1y1x2y2
    assert exs[0].ann_id == 100 and exs[0].image_id == 1 and exs[0].split == "testA" and exs[0].category_id == 1
    assert [(r.line, r.reason, r.key) for r in rep.records] == [(2, "ref's ann_id not in instances", "ref_id=2")]
    all_exs, _ = load_refcoco(pf, inst, None)
    assert len(all_exs) == 3
    _, rep_nr = load_refcoco(pf, inst, "testA", has_regions=lambda image_id: image_id != 1)
    assert rep_nr.skipped[NO_REGIONS] == 2  # counted per expression, so acc over ALL can count them


def test_load_refcoco_json_equivalent_and_hostile_pickle(tmp_path: Path) -> None:
    pf, inst, merged = _refer_files(tmp_path)
    jf = _write_json(tmp_path / "refcoco+.json", merged)
    exs_json, _ = load_refcoco_json(jf, "testB")
    exs_pickle, _ = load_refcoco(pf, inst, "testB")
    assert exs_json == exs_pickle and len(exs_json) == 1

    class Evil:
        def __reduce__(self):  # would call print on load with a plain pickle.load
            return (print, ("pwned",))

    bad = tmp_path / "evil.p"
    bad.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(ValueError, match="only plain data is allowed"):
        load_refcoco(bad, inst, None)
    with pytest.raises(ValueError, match="expected"):
        load_refcoco_json(inst, None)  # instances.json alone has no refs


# ---------------------------------------------------------------------------------- COCO captions


def test_load_coco_captions_and_index(tmp_path: Path) -> None:
    cf = _write_json(tmp_path / "cap.json", {"images": [], "annotations": [
        {"image_id": 2, "id": 7, "caption": "b dog"}, {"image_id": 1, "id": 3, "caption": "a cat "},
        {"image_id": 2, "id": 5, "caption": "a dog"}, {"image_id": 1, "id": 4, "caption": "  "}]})
    exs, rep = load_coco_captions(cf)
    assert [(e.image_id, e.caption) for e in exs] == [(1, "a cat"), (2, "a dog"), (2, "b dog")]
    assert rep.skipped == {"empty caption": 1}
    assert caption_index(exs) == ([1, 2], [0, 1, 1])


def test_caption_json_lines_and_tsv_name_images_like_coco(tmp_path: Path) -> None:
    jf = _write_lines(tmp_path / "c.jsonl", [
        json.dumps({"image": "images/000000000139.jpg", "caption": "a cat "}),
        json.dumps({"image": 139, "caption": "a cat again", "id": 7}),
        json.dumps({"image": "dog.png", "caption": "a dog"}),
        json.dumps({"caption": "no image"}),
        "{not json",
        json.dumps({"image": "dog.png", "caption": "  "}),
        json.dumps({"image": 1.5, "caption": "odd id"})])
    exs, rep = load_caption_lines(jf)
    assert [(e.image_id, e.caption, e.caption_id) for e in exs] == [(139, "a cat", 1), (139, "a cat again", 7),
                                                                    ("dog", "a dog", 3)]
    assert [(r.file, r.line, r.reason) for r in rep.records] == [
        (str(jf), 4, "missing field 'image'"), (str(jf), 5, "invalid JSON line"), (str(jf), 6, "empty caption"),
        (str(jf), 7, "image 1.5 is not an image id or file name")]
    assert caption_index(exs) == ([139, "dog"], [0, 0, 1])  # the file name and the int id: one image

    tf = _write_lines(tmp_path / "c.tsv", ["Image\tCaption", "139\ta cat", "dog.png\ta dog", "no tab here",
                                           "a\tb\tc", "cat\t "])
    exs, rep = load_caption_tsv(tf, has_regions=lambda image_id: image_id != "cat")
    assert [(e.image_id, e.caption, e.caption_id) for e in exs] == [(139, "a cat", 2), ("dog", "a dog", 3)]
    assert [(r.line, r.reason) for r in rep.records] == [
        (4, "expected image<TAB>caption, got 1 field(s)"), (5, "expected image<TAB>caption, got 3 field(s)"),
        (6, "empty caption")]
    rejected = [json.loads(x) for x in rep.write_rejected(tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert rejected[0] == {"file": str(tf), "line": 4, "reason": "expected image<TAB>caption, got 1 field(s)",
                           "key": ""}

    cf = _write_json(tmp_path / "coco.json", {"images": [], "annotations": [{"image_id": 5, "id": 1, "caption": "x"}]})
    all_exs, all_rep = read_captions([cf, jf, tf], ReadOptions())
    assert len(all_exs) == 1 + 3 + 2 and all_rep.kept == 6 and all_rep.n_skipped == 7
    assert load_captions(tf)[0] == load_caption_tsv(tf)[0]
    with pytest.raises(ConfigError, match=r"unknown format; expected COCO captions JSON .* JSON lines .* TSV"):
        load_captions(tmp_path / "captions.txt")


# ------------------------------------------------------------------------------- real shared data


@pytest.mark.shared_data
@needs_shared
def test_real_vqa_coco_mini() -> None:
    vocab = AnswerVocab.from_file(SHARED / "vqa" / "trainval_ans2label.json")
    assert len(vocab) == 3129
    exs, rep = load_vqa(SHARED / "vqa" / "questions_coco_mini.json", SHARED / "vqa" / "annotations_coco_mini.json",
                        vocab)
    assert rep.kept == len(exs) == 39 and rep.n_skipped == 0
    assert all(len(e.answers) == 10 for e in exs)
    ex = next(e for e in exs if e.question_id == 284218003)  # 9 x 'yes', 1 x 'no'
    assert ex.targets == pytest.approx({vocab.label("yes"): 1.0, vocab.label("no"): 0.3})
    assert vqa_accuracy({e.question_id: "yes" for e in exs}, exs) > 0.0


@pytest.mark.shared_data
@needs_shared
def test_real_nlvr2() -> None:
    exs, rep = load_nlvr2(SHARED / "nlvr2" / "tiny-dev.json", SHARED / "nlvr2" / "images")
    assert rep.kept == 8 and rep.n_skipped == 0
    assert all(e.left_image.is_file() and e.right_image.is_file() for e in exs)
    out = nlvr2_accuracy_consistency({e.identifier: e.label for e in exs}, exs)
    assert out["accuracy"] == 1.0 and out["consistency"] == 1.0
    # the full dev annotations against the 4 image pairs present: the rest is reported missing
    dev, dev_rep = load_nlvr2(SHARED / "nlvr2" / "dev.json", SHARED / "nlvr2" / "images")
    assert dev_rep.kept + dev_rep.skipped["missing NLVR2 image"] == 6982
    assert {nlvr2_image_stem(e.identifier) for e in dev} <= {f"dev-850-{i}" for i in range(4)}


@pytest.mark.shared_data
@needs_shared
def test_real_snli_ve_and_captions() -> None:
    exs, rep = load_snli_ve(SHARED / "snli-ve" / "sample_pairs.jsonl", SHARED / "snli-ve" / "images")
    assert rep.kept == 16 and rep.n_skipped == 0
    assert {LABELS[e.label] for e in exs} == set(LABELS)
    caps, cap_rep = load_coco_captions(SHARED / "coco-mini" / "captions_train2017.json")
    images, t2i = caption_index(caps)
    assert cap_rep.kept == 400 and len(images) == 80 and len(t2i) == 400
