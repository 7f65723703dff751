"""End-to-end fine-tuning + evaluation on the real downstream files in ../shared/data (skipped when
absent): region stores are built once per session with the regions stage (coco-instances backend on
8 coco-mini images, proposals backend on the NLVR2 and SNLI-VE images), then each task fine-tunes a tiny
random model (1280-d region input) for 2 steps and is scored with the official metrics; zero-shot
retrieval uses the MiniLM-initialised model."""

from __future__ import annotations

import csv
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_helpers import SHARED_DATA, tiny_model_dir, torch_threads
from muvla.regions.stage import RegionsConfig, run_regions
from muvla.tasks.evaluate import EvaluateConfig, run_evaluate
from muvla.tasks.finetune import FinetuneConfig, run_finetune

pytestmark = [pytest.mark.shared_data,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")]

N_COCO = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("real_regions")
    coco = SHARED_DATA / "coco-mini"
    inst = json.loads((coco / "instances_train2017.json").read_text())
    questions = json.loads((SHARED_DATA / "vqa" / "questions_coco_mini.json").read_text())["questions"]
    ids = sorted({q["image_id"] for q in questions})[:N_COCO]  # images that have VQA questions
    subset = {**inst, "images": [im for im in inst["images"] if im["id"] in ids],
              "annotations": [a for a in inst["annotations"] if a["image_id"] in ids]}
    (root / "instances_subset.json").write_text(json.dumps(subset))
    small = dict(crop_size=64, progress=False)
    with torch_threads(1):  # the busy shared cores: one thread is much faster for these tiny crops
        run_regions(RegionsConfig(out=root / "coco", backend="coco-instances", images=coco / "images",
                                  coco_instances=root / "instances_subset.json", max_regions=6, **small))
        for name, folder in (("nlvr2", SHARED_DATA / "nlvr2" / "images"),
                             ("snli", SHARED_DATA / "snli-ve" / "images")):
            run_regions(RegionsConfig(out=root / name, backend="proposals", images=folder, max_regions=4,
                                      max_proposals=8, proposal_max_side=64, **small))
    tiny = tiny_model_dir(root / "tiny_model", feature_dim=1280)  # the detector's EfficientNet-Lite0 features
    return {"root": root, "tiny": str(tiny), "coco": root / "coco", "nlvr2": root / "nlvr2", "snli": root / "snli",
            "coco_ids": ids, "instances": subset}


def ft(out: Path, model: str, **kw) -> FinetuneConfig:
    base = dict(out=out, model=model, max_steps=2, batch_size=2, log_every=1, plot=False, device="cpu",
                max_text_len=24, eval_batch_size=16)
    return FinetuneConfig(**{**base, **kw})


def test_vqa_real(stores: dict, tmp_path: Path) -> None:
    q, a = SHARED_DATA / "vqa" / "questions_coco_mini.json", SHARED_DATA / "vqa" / "annotations_coco_mini.json"
    vocab = SHARED_DATA / "vqa" / "trainval_ans2label.json"
    s = run_finetune(ft(tmp_path / "vqa", stores["tiny"], task="vqa", train=[q, a], val=[q, a], regions=stores["coco"],
                        answer_vocab=vocab))
    rep = s["train_load_report"]
    # questions on the 31 coco-mini images outside our 8-image store are counted, not lost
    assert rep["kept"] + rep["skipped"]["image has no regions"] == 39 and rep["kept"] > 0
    assert 0.0 <= s["val_metrics"]["accuracy"] <= 1.0
    assert s["train"]["steps"] == 2 and s["steps_per_s"] > 0
    preds = json.loads((tmp_path / "vqa" / "predictions_vqa_val.json").read_text())
    assert len(preds) == rep["kept"] and all(isinstance(p["answer"], str) for p in preds)
    res = run_evaluate(EvaluateConfig(out=tmp_path / "eval.json", task="vqa", model=str(tmp_path / "vqa"),
                                      data=[q, a], regions=stores["coco"], device="cpu", max_text_len=24))
    assert res["metrics"]["accuracy"] == pytest.approx(s["val_metrics"]["accuracy"])
    assert json.loads((tmp_path / "eval.json").read_text())["task"] == "vqa/val"


def test_nlvr2_real(stores: dict, tmp_path: Path) -> None:
    data = SHARED_DATA / "nlvr2" / "tiny-dev.json"
    s = run_finetune(ft(tmp_path / "nlvr2", stores["tiny"], task="nlvr2", train=[data], val=[data], regions=stores["nlvr2"],
                        images=SHARED_DATA / "nlvr2" / "images"))
    assert s["train_load_report"]["kept"] == 8
    m = s["val_metrics"]
    assert m["n"] == 8 and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["consistency"] <= 1.0
    with open(tmp_path / "nlvr2" / "predictions_nlvr2_val.csv", newline="") as f:
        assert len(list(csv.reader(f))) == 8


def test_nlvr2_missing_image_real(stores: dict, tmp_path: Path) -> None:
    """A real line whose pair images are absent from the image folder is rejected with its line."""
    lines = (SHARED_DATA / "nlvr2" / "tiny-dev.json").read_text().splitlines()[:2]
    extra = json.loads(lines[0])
    extra["identifier"] = "dev-999-0-0"
    data = tmp_path / "dev.json"
    data.write_text("\n".join([*lines, json.dumps(extra)]) + "\n")
    s = run_finetune(ft(tmp_path / "out", stores["tiny"], task="nlvr2", train=[data], regions=stores["nlvr2"],
                        images=SHARED_DATA / "nlvr2" / "images", max_steps=1))
    assert s["train_load_report"]["skipped"] == {"missing NLVR2 image": 1}
    rec = json.loads((tmp_path / "out" / "rejected.jsonl").read_text())
    assert rec["line"] == 3 and "dev-999-0-img0.png" in rec["key"]


def test_snli_ve_real(stores: dict, tmp_path: Path) -> None:
    data = SHARED_DATA / "snli-ve" / "sample_pairs.jsonl"
    s = run_finetune(ft(tmp_path / "ve", stores["tiny"], task="snli_ve", train=[data], val=[data], regions=stores["snli"],
                        images=SHARED_DATA / "snli-ve" / "images"))
    assert s["train_load_report"]["kept"] == 16
    assert s["val_metrics"]["n"] == 16 and 0.0 <= s["val_metrics"]["accuracy"] <= 1.0
    preds = (tmp_path / "ve" / "predictions_snli_ve_val.jsonl").read_text().splitlines()
    assert len(preds) == 16 and json.loads(preds[0])["gold_label"] in ("entailment", "neutral", "contradiction")


def test_refcoco_real_boxes(stores: dict, tmp_path: Path) -> None:
    """RefCOCO+ in the refer toolkit format (refs pickle + instances.json) over real coco-mini boxes."""
    inst = stores["instances"]
    names = {c["id"]: c["name"] for c in inst["categories"]}
    refs = []
    for i, ann in enumerate(sorted(inst["annotations"], key=lambda a: a["id"])):
        refs.append({"ref_id": i, "ann_id": ann["id"], "image_id": ann["image_id"], "category_id": ann["category_id"],
                     "split": "train" if i % 2 == 0 else "val",
                     "sentences": [{"sent": f"the {names[ann['category_id']]}", "sent_id": 1000 + i}]})
    # one val expression on a coco-mini image that is not in the region store
    refs.append({**refs[1], "ref_id": 9999, "image_id": 1, "sentences": [{"sent": "a lost one", "sent_id": 99999}]})
    with open(tmp_path / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(inst))
    s = run_finetune(ft(tmp_path / "rc", stores["tiny"], task="refcoco+", train=[tmp_path / "refs(unc).p", instances],
                        val=[tmp_path / "refs(unc).p", instances], regions=stores["coco"]))
    m = s["val_metrics"]
    n_val = sum(1 for r in refs if r["split"] == "val")
    assert m["n_all"] == n_val and m["n_unscored"] == 1
    assert m["n_covered"] < m["n_all"]  # max_regions=6 leaves some objects without a region
    assert m["acc_all"] <= m["acc_covered"]


def test_zero_shot_retrieval_real(stores: dict, tmp_path: Path) -> None:
    """Zero-shot through the MiniLM-initialised ITM head on 8 coco-mini images x their 40 captions."""
    res = run_evaluate(EvaluateConfig(out=tmp_path / "zs", task="retrieval", model="default",
                                      captions=SHARED_DATA / "coco-mini" / "captions_train2017.json",
                                      regions=stores["coco"], device="cpu", max_images=N_COCO, batch_size=40))
    m = res["metrics"]
    assert m["n_images"] == N_COCO and m["n_captions"] == 5 * N_COCO and m["zero_shot"] is True
    assert res["load_report"]["skipped"]["image has no regions"] == 400 - 5 * N_COCO
    assert m["i2t_r10"] >= m["i2t_r5"] >= m["i2t_r1"] and m["t2i_r10"] == 1.0  # only 8 images to rank
    print("zero-shot retrieval (MiniLM init, 8 images x 40 captions):", json.dumps(m))
    assert (tmp_path / "zs" / "retrieval_recall.png").is_file()


@pytest.mark.slow  # runs the regions stage (default backend) on 3 photos
def test_zero_shot_retrieval_builds_regions_on_the_fly(tmp_path: Path) -> None:
    """No region store given: the regions stage runs on --images into <out>/regions first."""
    caps = json.loads((SHARED_DATA / "coco-mini" / "captions_train2017.json").read_text())
    ids = sorted({a["image_id"] for a in caps["annotations"]})[:3]
    images = tmp_path / "images"
    images.mkdir()
    for im in caps["images"]:
        if im["id"] in ids:  # a 3-image folder (links, the data is not copied)
            (images / im["file_name"]).symlink_to(SHARED_DATA / "coco-mini" / "images" / im["file_name"])
    res = run_evaluate(EvaluateConfig(out=tmp_path / "zs", task="retrieval", model="default", images=images,
                                      captions=SHARED_DATA / "coco-mini" / "captions_train2017.json",
                                      device="cpu", num_threads=1))
    assert (tmp_path / "zs" / "regions" / "index.parquet").is_file()
    assert res["metrics"]["n_images"] == 3 and res["metrics"]["n_captions"] == 15
