"""`muvla demo` (what `make demo` runs) end to end, with a tiny pre-training so it stays quick."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from muvla.cli import main
from muvla.demo import (
    SAMPLE_IMAGES,
    DemoConfig,
    demo_eval_captions_path,
    describe,
    run_demo,
    write_sample_images,
)
from muvla.tasks.image_text_retrieval import load_coco_captions


def test_sample_images_are_written_once(tmp_path: Path) -> None:
    paths = write_sample_images(tmp_path, ("chelsea", "horse"))
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert write_sample_images(tmp_path, ("chelsea", "horse")) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps


def test_held_out_captions_name_the_sample_images_by_file_stem() -> None:
    examples, report = load_coco_captions(demo_eval_captions_path())
    assert report.kept == len(examples) > 0
    assert {ex.image_id for ex in examples} == set(SAMPLE_IMAGES)
    corpus = (Path(demo_eval_captions_path()).parent / "demo_captions.txt").read_text(encoding="utf-8").lower()
    assert not any(ex.caption.lower() in corpus for ex in examples)  # held out: not in the training text


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    import muvla.tasks.image_text_retrieval as retrieval_task

    bars: list[str] = []
    real_progress = retrieval_task.progress

    def named_progress(items, desc, **kw):
        bars.append(desc)
        return real_progress(items, desc, **kw)

    monkeypatch.setattr(retrieval_task, "progress", named_progress)
    result = run_demo(DemoConfig(out=tmp_path / "demo", max_regions=4, pretrain_steps=2, batch_size=4))
    assert bars == ["score image-caption pairs [base]", "score image-caption pairs [muvla]"]  # which model is scored
    out = tmp_path / "demo"
    for marker in ("regions/index.parquet", "retrieval/topk.parquet", "phrases/matches.parquet",
                   "pretrain/model/model.safetensors", "pretrain/metrics.jsonl", "evaluation/table.md"):
        assert (out / marker).exists(), marker
    scores = result["zero_shot_retrieval"]
    assert set(scores) == {"base", "muvla"}
    for m in scores.values():
        assert 0.0 <= m["mean_recall_ci_low"] <= m["mean_recall"] <= m["mean_recall_ci_high"] <= 1.0
        assert m["n_images"] == len(SAMPLE_IMAGES)
    comparison = result["comparison"]
    assert comparison["ci_low"] <= comparison["difference"] <= comparison["ci_high"]
    lines = describe(result)
    assert len(lines) < 12 and lines[-1].startswith("Open the report: ")
    assert any("95% CI" in line for line in lines) and any("muvla - base" in line for line in lines)
    assert json.loads((out / "summary.json").read_text())["report"] == result["report"]
    page = Path(result["report"]).read_text(encoding="utf-8")
    assert "Evaluation" in page and "training curves" in page and "chelsea" in page
    assert json.loads((out / "evaluation" / "retrieval_muvla" / "summary.json").read_text())["task"] == "retrieval"

    # its config.yaml reruns the same demo: every step is recognised as up to date, nothing retrains
    model = out / "pretrain" / "model" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="muvla.corpus.provenance"):
        assert main(["demo", "--config", str(out / "demo" / "config.yaml")]) == 0
    for step in ("regions", "text", "retrieval", "phrases", "pretrain", "evaluate"):
        assert f"{step}: up to date (same settings and inputs)" in caplog.text, step
    assert model.stat().st_mtime_ns == stamp
