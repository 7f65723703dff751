"""Unit + small end-to-end tests of the downstream heads, datasets, fine-tuning and evaluation, on a
tiny random model and synthetic region stores (fast; real-data runs are in test_finetune_real.py)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune_helpers import grid_boxes, tiny_model_dir, torch_threads, write_json, write_jsonl, write_store
from muvla.corpus.region_store import RegionStore
from muvla.encoders import load_wordpiece_tokenizer
from muvla.model import Model
from muvla.tasks.batch import TaskCollator, has_regions_fn
from muvla.tasks.evaluate import EvaluateConfig, run_evaluate
from muvla.tasks.finetune import FinetuneConfig, run_finetune
from muvla.tasks.image_text_retrieval import CaptionExample, RetrievalTrainDataset, retrieval_scores
from muvla.tasks.model import TaskModel
from muvla.tasks.nlvr2 import NLVR2Dataset, NLVR2Example
from muvla.tasks.refcoco import RefCOCODataset, RefExample, refcoco_target
from muvla.tasks.registry import get_task
from muvla.tasks.snli_ve import SNLIVEDataset, SNLIVEExample
from muvla.tasks.table import collect_results
from muvla.tasks.vocab import AnswerVocab
from muvla.tasks.vqa import VQADataset, VQAExample
from muvla.utils.config import ConfigError, load_config
from muvla.utils.device import torch_num_threads

IMAGES = {str(i): {"boxes": grid_boxes(2 + i % 3)} for i in range(1, 7)}  # ids "1".."6", 2-4 regions
ANSWERS = ["yes", "no", "2", "red"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ft")
    model_dir = tiny_model_dir(root / "tiny")
    store_dir = write_store(root / "regions", IMAGES)
    return {"root": root, "model": model_dir, "regions": store_dir, "store": RegionStore(store_dir),
            "tok": load_wordpiece_tokenizer(str(model_dir))}


def tiny(env: dict, task: str, n_answers: int = 0) -> TaskModel:
    torch.manual_seed(0)
    return get_task(task).build_model(Model.from_pretrained(env["model"]), n_answers=n_answers, head_dropout=0.0)


def common(env: dict, out: Path, **kw) -> FinetuneConfig:
    base = dict(out=out, model=str(env["model"]), regions=env["regions"], max_steps=3, batch_size=2, lr=1e-3,
                log_every=1, save_every=2, plot=False, device="cpu", max_text_len=16)
    base.update(kw)
    return FinetuneConfig(**base)


# ---------------------------------------------------------------------------------------------- heads


def test_vqa_loss_is_bce_times_answers_and_predict_gives_labels(env: dict) -> None:
    model = tiny(env, "vqa", n_answers=len(ANSWERS)).eval()
    examples = [VQAExample(1, 1, "is it red?", ["yes"] * 10, {0: 1.0, 3: 0.3}),
                VQAExample(2, 2, "how many?", ["2"] * 10, {2: 0.9})]
    batch = TaskCollator(env["tok"], 16)([VQADataset(examples, env["store"], 4)[i] for i in range(2)])
    assert batch.targets.shape == (2, 4) and batch.targets[0, 3] == pytest.approx(0.3)
    logits = model.logits(batch)
    expected = F.binary_cross_entropy_with_logits(logits, batch.targets) * 4
    assert model(batch).loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert model.predict(batch).tolist() == logits.argmax(-1).tolist()


def test_nlvr2_rows_are_paired_left_right(env: dict, tmp_path: Path) -> None:
    model = tiny(env, "nlvr2").eval()
    ex = [NLVR2Example("dev-1-0-0", "two dogs", Path("1.png"), Path("2.png"), True),
          NLVR2Example("dev-1-1-0", "two dogs", Path("3.png"), Path("4.png"), False)]
    batch = TaskCollator(env["tok"], 16)([NLVR2Dataset(ex, env["store"])[i] for i in range(2)])
    assert batch.input_ids.shape[0] == 4 and batch.targets.tolist() == [1, 0]
    out = model.encode(batch)
    manual = model.head(torch.cat([out.pooled[0::2], out.pooled[1::2]], -1))
    assert torch.allclose(model.logits(batch), manual)
    # swapping left and right changes the pair vector (order matters: "the left image shows ...")
    swapped = TaskCollator(env["tok"], 16)([NLVR2Dataset([NLVR2Example("dev-1-0-0", "two dogs", Path("2.png"),
                                                                       Path("1.png"), True)], env["store"])[0]])
    assert not torch.allclose(model.logits(swapped)[0], manual[0])
    assert model.predict(batch).dtype == torch.bool


def test_refcoco_target_and_padding_masked(env: dict) -> None:
    boxes = np.array([[0, 0, 100, 100], [0, 0, 50, 50], [50, 50, 100, 100]], dtype=np.float32)
    assert refcoco_target((0, 0, 48, 52), boxes) == 1
    assert refcoco_target((200, 200, 210, 210), boxes) == -100  # no overlap: ignored in the loss
    model = tiny(env, "refcoco+").eval()
    ex = [RefExample(1, 1, 2, "the left one", (0, 0, 50, 50), "train", sent_id=7),  # image 2: 4 regions
          RefExample(2, 2, 3, "top", (0, 0, 100, 100), "train", sent_id=8)]  # image 3: 2 regions
    items = [RefCOCODataset(ex, env["store"])[i] for i in range(2)]
    batch = TaskCollator(env["tok"], 16)(items)
    logits = model.logits(batch)
    assert logits.shape == (2, 4)
    assert torch.isinf(logits[1, 2:]).all() and torch.isfinite(logits[0]).all()
    assert batch.keys == [7, 8]
    assert int(model.predict(batch)[1]) < 2  # never a padding region
    loss = model(batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_task_model_save_load_roundtrip(env: dict, tmp_path: Path) -> None:
    model = tiny(env, "snli_ve").eval()
    model.save_pretrained(tmp_path / "m")
    assert {"task.json", "task_head.safetensors", "model.safetensors", "vocab.txt"} <= {
        p.name for p in (tmp_path / "m").iterdir()}
    again = get_task("snli_ve").load_model(tmp_path / "m").eval()
    items = [SNLIVEDataset([SNLIVEExample("p1", "4", "a man sleeps", 2)], env["store"])[0]]
    batch = TaskCollator(env["tok"], 16)(items)
    assert torch.allclose(model.logits(batch), again.logits(batch))
    assert again.task == "snli_ve" and again.n_outputs == 3


def test_retrieval_scores_match_single_forward(env: dict) -> None:
    model = tiny(env, "retrieval").eval()
    caps = [CaptionExample("1", "a cat", 0), CaptionExample("1", "a small cat on a mat", 1),
            CaptionExample("2", "a dog", 2)]
    scores, image_ids, t2i = retrieval_scores(model, caps, env["store"], env["tok"], batch_size=2)
    assert scores.shape == (2, 3) and image_ids == ["1", "2"] and t2i == [0, 0, 1]
    batch = TaskCollator(env["tok"], 16)([RetrievalTrainDataset(caps, env["store"])[1]])
    # row 0 of a retrieval item is (own image, own caption) -> must equal the matrix entry (padding-invariant)
    assert model.predict(batch)[0].item() == pytest.approx(float(scores[0, 1]), abs=1e-4)


# ---------------------------------------------------------------------------------------------- end to end


def vqa_files(root: Path) -> tuple[Path, Path, Path]:
    qs = [{"question_id": 10 + i, "image_id": i, "question": q} for i, q in
          zip(range(1, 6), ["is it red?", "how many dogs?", "is there a cat?", "what color?", "how many?"])]
    qs.append({"question_id": 99, "image_id": 777, "question": "no regions for me?"})  # image not in store
    ans = [["yes"] * 10, ["2"] * 8 + ["two"] * 2, ["no"] * 10, ["red"] * 5 + ["purple"] * 5, ["2"] * 10]
    anns = [{"question_id": 10 + i, "image_id": i, "answers": [{"answer": a} for a in a_list],
             "multiple_choice_answer": a_list[0]} for i, a_list in zip(range(1, 6), ans)]
    anns.append({"question_id": 99, "image_id": 777, "answers": [{"answer": "yes"}] * 10})
    vocab = AnswerVocab(ANSWERS).save(root / "ans2label.json")
    return write_json(root / "q.json", {"questions": qs}), write_json(root / "a.json", {"annotations": anns}), vocab


def test_finetune_vqa_end_to_end_with_rejections(env: dict, tmp_path: Path) -> None:
    q, a, vocab = vqa_files(tmp_path)
    cfg = common(env, tmp_path / "vqa", task="vqa", train=[q, a], val=[q, a], answer_vocab=vocab)
    summary = run_finetune(cfg)
    out = tmp_path / "vqa"
    assert summary["train"]["steps"] == 3
    assert summary["train_load_report"]["skipped"] == {"image has no regions": 1}
    assert summary["train_load_report"]["notes"]["answer outside vocabulary"] == 1  # "purple"
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(r["file"], r["line"], r["reason"]) for r in rejected} == {(str(q), 5, "image has no regions")}
    preds = json.loads((out / "predictions_vqa_val.json").read_text())
    assert [p["question_id"] for p in preds] == [11, 12, 13, 14, 15]
    assert all(p["answer"] in ANSWERS for p in preds)
    assert 0.0 <= summary["val_metrics"]["accuracy"] <= 1.0
    assert summary["val_metrics"]["n_unscored"] == 1
    assert (out / "model" / "task.json").is_file() and (out / "model" / "answer_vocab.json").is_file()
    assert (out / "metrics.jsonl").read_text().count("\n") == 3
    rows = collect_results([out / "results.json"])
    assert rows[0].scores["vqa/val"] == pytest.approx(summary["val_metrics"]["accuracy"])

    # evaluate the saved model: same predictions as the in-process validation
    res = run_evaluate(EvaluateConfig(out=tmp_path / "eval", task="vqa", model=str(out), data=[q, a],
                                      regions=env["regions"], device="cpu", max_text_len=16))
    assert res["metrics"]["accuracy"] == pytest.approx(summary["val_metrics"]["accuracy"])
    assert json.loads((tmp_path / "eval" / "predictions_vqa_val.json").read_text()) == preds
    # an unchanged rerun reuses the finished run; a longer schedule is refused, naming the setting,
    # unless resume asks to continue the checkpoints
    again = run_finetune(cfg)
    assert again["reused"] and again["val_metrics"] == summary["val_metrics"]
    with pytest.raises(ConfigError, match="max_steps=3 .this run: 4.*--overwrite"):
        run_finetune(common(env, out, task="vqa", train=[q, a], val=[q, a], answer_vocab=vocab, max_steps=4))
    cfg2 = common(env, out, task="vqa", train=[q, a], val=[q, a], answer_vocab=vocab, max_steps=4, resume=True)
    longer = run_finetune(cfg2)
    assert longer["train"]["steps"] == 4 and longer["train"]["resumed_from"].endswith("step-0000003")


def test_finetune_nlvr2_missing_image_is_rejected_with_line(env: dict, tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.mkdir()
    store_dir = write_store(tmp_path / "regions", {f"dev-1-{p}-img{k}": {"boxes": grid_boxes(3)}
                                                   for p in range(3) for k in range(2)})
    for p in range(3):
        for k in range(2):
            if (p, k) != (2, 1):  # dev-1-2-img1.png is missing
                (img / f"dev-1-{p}-img{k}.png").write_bytes(b"")
    rows = [{"identifier": f"dev-1-{p}-{s}", "sentence": f"sentence {s}", "label": "True" if (p + s) % 2 else "False"}
            for p in range(3) for s in range(2)]
    data = write_jsonl(tmp_path / "dev.json", rows)
    cfg = common(env, tmp_path / "nlvr2", task="nlvr2", train=[data], val=[data], images=img, regions=store_dir,
                 max_steps=2)
    summary = run_finetune(cfg)
    assert summary["train_load_report"]["skipped"] == {"missing NLVR2 image": 2}
    rejected = [json.loads(line) for line in (tmp_path / "nlvr2" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejected) == [5, 5, 6, 6]  # train + val records
    with open(tmp_path / "nlvr2" / "predictions_nlvr2_val.csv", newline="") as f:
        preds = list(csv.reader(f))
    assert [r[0] for r in preds] == [f"dev-1-{p}-{s}" for p in range(2) for s in range(2)]
    assert {r[1] for r in preds} <= {"True", "False"}
    assert set(summary["val_metrics"]) >= {"accuracy", "consistency"}


def test_finetune_snli_ve_bad_label_and_refcoco_all_vs_covered(env: dict, tmp_path: Path) -> None:
    rows = [{"Flickr30K_ID": "1", "sentence2": "a cat", "gold_label": "entailment", "pairID": "p1"},
            {"Flickr30K_ID": "2", "sentence2": "a dog", "gold_label": "-", "pairID": "p2"},
            {"Flickr30K_ID": "3", "sentence2": "a bird", "gold_label": "neutral", "pairID": "p3"},
            {"Flickr30K_ID": "4", "sentence2": "nothing", "gold_label": "contradiction", "pairID": "p4"}]
    data = write_jsonl(tmp_path / "ve.jsonl", rows)
    s = run_finetune(common(env, tmp_path / "ve", task="snli-ve", train=[data], val=[data], max_steps=2))
    assert s["train_load_report"]["n_skipped"] == 1
    rec = json.loads((tmp_path / "ve" / "rejected.jsonl").read_text().splitlines()[0])
    assert rec["line"] == 2 and "not one of" in rec["reason"]
    preds = [json.loads(line) for line in (tmp_path / "ve" / "predictions_snli_ve_val.jsonl").read_text().splitlines()]
    assert [p["pairID"] for p in preds] == ["p1", "p3", "p4"]

    # RefCOCO+: image 1 has regions (whole image + two 50x50 quarters), image 777 has none -> counts as wrong in acc_all only
    def ref(rid: int, image: int, box: list, split: str) -> dict:
        return {"ref_id": rid, "ann_id": rid, "image_id": image, "split": split, "category_id": 1,
                "sentences": [{"sent": f"thing {rid}", "sent_id": 100 + rid}]}
    refs = [ref(1, 1, [0, 0, 50, 50], "train"), ref(2, 6, [50, 50, 50, 50], "train"),
            ref(3, 1, [0, 0, 50, 50], "val"), ref(4, 1, [70, 0, 30, 20], "val"), ref(5, 777, [0, 0, 9, 9], "val")]
    anns = [{"id": r["ann_id"], "image_id": r["image_id"], "bbox": box, "category_id": 1}
            for r, box in zip(refs, [[0, 0, 50, 50], [50, 50, 50, 50], [0, 0, 50, 50], [70, 0, 30, 20], [0, 0, 9, 9]])]
    rc = write_json(tmp_path / "refcoco.json", {"refs": refs, "annotations": anns, "images": [], "categories": []})
    s = run_finetune(common(env, tmp_path / "rc", task="refcoco+", train=[rc], val=[rc], max_steps=2))
    m = s["val_metrics"]
    assert m["n_all"] == 3 and m["n_unscored"] == 1 and m["n_covered"] == 1  # ref 4's box: no region IoU >= .5
    assert m["acc_all"] <= m["acc_covered"] * m["n_covered"] / m["n_all"] + 1e-9
    preds = json.loads((tmp_path / "rc" / "predictions_refcoco_plus_val.json").read_text())
    assert [p["sent_id"] for p in preds] == [103, 104] and all(len(p["box"]) == 4 for p in preds)


def test_retrieval_finetune_and_zero_shot_evaluate(env: dict, tmp_path: Path) -> None:
    caps = {"annotations": [{"image_id": int(i), "id": 10 * int(i) + k, "caption": f"caption {k} of image {i}"}
                            for i in IMAGES for k in range(2)] +
            [{"image_id": 777, "id": 9999, "caption": "an image without regions"}]}
    data = write_json(tmp_path / "captions.json", caps)
    s = run_finetune(common(env, tmp_path / "ret", task="retrieval", train=[data], val=[data], max_steps=2,
                            max_val_images=4))
    assert s["val_metrics"]["n_images"] == 4 and s["val_metrics"]["n_captions"] == 8
    assert s["train_load_report"]["skipped"] == {"image has no regions": 1}
    res = run_evaluate(EvaluateConfig(out=tmp_path / "zs" / "results.json", task="retrieval", model=str(env["model"]),
                                      captions=data, regions=env["regions"], device="cpu", max_images=3))
    m = res["metrics"]
    assert m["zero_shot"] is True and m["n_images"] == 3 and m["n_captions"] == 6
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= m[k] <= 1.0
    assert m["i2t_r5"] == 1.0 and m["t2i_r5"] == 1.0  # 3 images / 6 captions: top 5 images is all of them
    assert collect_results([tmp_path / "zs" / "results.json"])[0].scores["retrieval/val"] == pytest.approx(m["mean_recall"])
    assert np.load(tmp_path / "zs" / "scores_retrieval_val.npy").shape == (3, 6)


def test_config_errors_are_clear(env: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        common(env, tmp_path, task="gqa", train=[tmp_path]).validate()
    with pytest.raises(ConfigError, match="questions.json annotations.json"):
        common(env, tmp_path, task="vqa", train=[tmp_path / "q.json"]).validate()
    with pytest.raises(ConfigError, match="region store"):
        EvaluateConfig(out=tmp_path, task="nlvr2", data=[tmp_path]).validate()
    cfg = load_config(FinetuneConfig, None, {"out": str(tmp_path), "task": "vqa", "regions": str(tmp_path),
                                             "train": ["q.json", "a.json"]})
    assert cfg.train == [Path("q.json"), Path("a.json")] and cfg.train_config().lr == 5e-5
    # evaluate a non-fine-tuned model on a classification task: a clear error, not a missing head
    q, a, _ = vqa_files(tmp_path)
    with pytest.raises(ConfigError, match="not a fine-tuned vqa model"):
        run_evaluate(EvaluateConfig(out=tmp_path / "e", task="vqa", model=str(env["model"]), data=[q, a],
                                    regions=env["regions"], device="cpu"))
    # nothing usable to train on
    empty = write_json(tmp_path / "q2.json", {"questions": [{"question_id": 1, "image_id": 777, "question": "x"}]})
    with pytest.raises(ConfigError, match="no usable training example"):
        run_finetune(common(env, tmp_path / "none", task="vqa", train=[empty, a], answer_vocab=tmp_path / "ans2label.json"))


def test_max_text_len_below_three_is_refused_with_one_line(env: dict, tmp_path: Path) -> None:
    """[CLS] + a token + [SEP]: fine-tuning, evaluation and the collator apply the one rule."""
    q, a, _ = vqa_files(tmp_path)
    message = r"^max_text_len must be >= 3 \(\[CLS\] \+ a token \+ \[SEP\]\), got 2$"
    with pytest.raises(ConfigError, match=message):
        common(env, tmp_path, task="vqa", train=[q, a], max_text_len=2).validate()
    with pytest.raises(ConfigError, match=message):
        EvaluateConfig(out=tmp_path, task="vqa", data=[q, a], regions=env["regions"], max_text_len=2).validate()
    with pytest.raises(ConfigError, match=message):
        TaskCollator(env["tok"], max_text_len=2)
    common(env, tmp_path, task="vqa", train=[q, a], max_text_len=3).validate()  # the smallest allowed


def test_num_threads_is_one_setting_with_one_rule(env: dict, tmp_path: Path) -> None:
    q, a, _ = vqa_files(tmp_path)
    with pytest.raises(ConfigError, match=r"^num_threads must be >= 1 \(or unset for torch's default\), got 0$"):
        common(env, tmp_path, task="vqa", train=[q, a], num_threads=0).validate()
    with pytest.raises(ConfigError, match="num_threads must be >= 1"):
        EvaluateConfig(out=tmp_path, task="vqa", data=[q, a], regions=env["regions"], num_threads=0).validate()
    before = torch.get_num_threads()
    with torch_num_threads(before + 1):  # how finetune, evaluate and regions apply it: restored afterwards
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_has_regions_callback(env: dict) -> None:
    has = has_regions_fn(env["store"])
    assert has(1) and has("1") and not has(777) and not has("dev-1-0-img0")


def test_vqa_test_split_without_annotations_writes_predictions_only(env: dict, tmp_path: Path) -> None:
    q, a, vocab = vqa_files(tmp_path)
    run_finetune(common(env, tmp_path / "m", task="vqa", train=[q, a], answer_vocab=vocab, max_steps=1))
    res = run_evaluate(EvaluateConfig(out=tmp_path / "test", task="vqa", split="test-dev", model=str(tmp_path / "m"),
                                      data=[q], regions=env["regions"], device="cpu"))
    assert res["results"] is None and "accuracy" not in res["metrics"]
    assert not (tmp_path / "test" / "results.json").exists()
    preds = json.loads((tmp_path / "test" / "predictions_vqa_test-dev.json").read_text())
    assert len(preds) == 5  # the question on an image without regions is in rejected.jsonl instead
    assert "image has no regions" in (tmp_path / "test" / "rejected.jsonl").read_text()


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "finetune").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_finetune_configs_load(path: Path, tmp_path: Path) -> None:
    cfg = load_config(FinetuneConfig, path, {"out": str(tmp_path), "train": ["q.json", "a.json"],
                                             "regions": str(tmp_path)})
    reference = {"vqa": (5e-5, 28000), "nlvr2": (3e-5, 14000), "snli_ve": (8e-5, 5000), "refcoco+": (2e-4, 20000)}
    if path.stem.endswith("_reference") and cfg.task in reference:
        assert (cfg.lr, cfg.max_steps) == reference[cfg.task]
        assert cfg.batch_size == (256 if cfg.task == "refcoco+" else 480)
    elif not path.stem.endswith("_reference"):
        assert cfg.batch_size <= 8  # small CPU defaults
