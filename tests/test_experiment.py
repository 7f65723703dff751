"""`muvla experiment` end to end on a tiny version: 2 models, 1 seed, a few steps, held-out images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from muvla.corpus.layout import CorpusLayout
from muvla.demo import demo_captions_path, demo_eval_captions_path, write_sample_images
from muvla.experiment import ExperimentConfig, describe, run_experiment
from muvla.experiment.config import EvaluationSettings
from muvla.experiment.run import ExperimentLayout
from muvla.utils.config import ConfigError, load_config

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def tiny_experiment(tmp_path: Path, **extra) -> ExperimentConfig:
    images = tmp_path / "images"
    write_sample_images(images)
    values = {
        "out": tmp_path / "exp", "images": images, "captions": demo_eval_captions_path(),
        "pool": [demo_captions_path()], "models": ["joint_unaligned", "muvla"], "seeds": [0],
        "regions": {"backend": "proposals", "max_regions": 4, "max_proposals": 6, "crop_size": 64, "proposal_max_side": 48,
                    "proposal_scales": [100.0], "unit_size": 4, "num_threads": 1, "progress": False},
        "retrieval": {"k": 2, "unit_size": 128},
        "pretrain": {"init": "random", "model": TINY_MODEL, "max_steps": 3, "batch_size": 4, "lr": 1e-3,
                     "log_every": 1, "save_every": 10, "tensorboard": False, "plot": False, "device": "cpu",
                     "max_text_len": 24, "max_regions": 4},
        "evaluation": {"held_out": 0.6, "probe_fraction": 0.25, "dev_fraction": 0.5, "captions_per_image": 2,
                       "probe_steps": 2, "probe_batch_size": 2, "max_text_len": 24, "bootstrap": 200,
                       "tuned": {"pretrain.lr": "dev of split seed 0 (a test of the record)"}},
        "report": True,
    }
    values.update(extra)
    return load_config(ExperimentConfig, None, values)


@pytest.mark.slow
def test_tiny_experiment_writes_results_and_resumes(tmp_path: Path, one_thread) -> None:
    cfg = tiny_experiment(tmp_path)
    summary = run_experiment(cfg)
    root = Path(cfg.out)
    split = json.loads((root / "split" / "split.json").read_text())
    parts = {part: set(split[part]) for part in ("train", "probe_train", "dev", "test")}
    assert [len(parts[p]) for p in ("train", "probe_train", "dev", "test")] == [5, 2, 3, 3]
    assert sum(map(len, parts.values())) == len(set().union(*parts.values()))  # disjoint: held-out never trains
    corpus = CorpusLayout.at(root / "corpora" / "retrieval")
    assert set(corpus.regions.store().image_ids) == set(split["train"])
    assert set(CorpusLayout.at(root / "corpora" / "random").retrieval.read_topk().image_id) <= set(split["train"])

    rows = list(csv.DictReader((root / "results.csv").open(encoding="utf-8")))
    assert [(r["model"], r["split"], r["kind"]) for r in rows] == [
        (m, part, kind) for m in ("joint_unaligned", "muvla") for kind in ("zero_shot", "probe") for part in ("dev", "test")]
    # every number is recomputable from the raw per-image ranks (5 captions per image in a real run; 2 here)
    images = list(csv.DictReader((root / "per_image.csv").open(encoding="utf-8")))
    for r in rows:
        mine = [i for i in images if (i["model"], i["split"], i["kind"]) == (r["model"], r["split"], r["kind"])]
        assert sorted(i["image_id"] for i in mine) == sorted(split[r["split"]])
        t2i = [int(x) for i in mine for x in i["t2i_ranks"].split()]
        assert len(t2i) == 2 * len(mine) == int(r["n_captions"])
        i2t = [int(i["i2t_rank"]) for i in mine]
        hand = (sum(np.mean([x < k for x in i2t]) for k in (1, 5, 10))
                + sum(np.mean([x < k for x in t2i]) for k in (1, 5, 10))) / 6
        assert float(r["mean_recall"]) == pytest.approx(hand)
    gaps = list(csv.DictReader((root / "gaps.csv").open(encoding="utf-8")))
    assert {(g["a"], g["b"], g["split"], g["kind"]) for g in gaps} == {
        ("muvla", "joint_unaligned", part, kind) for part in ("dev", "test") for kind in ("zero_shot", "probe")}
    for g in gaps:
        assert float(g["low"]) <= float(g["gap"]) <= float(g["high"])
    md = (root / "results.md").read_text(encoding="utf-8")
    assert md.index("## Claims, test split") < md.index("## Models, test split") < md.index("## Dev split")
    assert "paired 95% interval" in md and "`pretrain.lr`: dev of split seed 0" in md
    record = json.loads((root / "results.json").read_text(encoding="utf-8"))
    assert record["split"]["test"] == 3 and record["tuned"] == {"pretrain.lr": "dev of split seed 0 (a test of the record)"}
    for plot in ("zero_shot.png", "probe.png", "training_curves.png"):
        assert (root / "plots" / plot).stat().st_size > 0
    page = Path(summary["report"]).read_text(encoding="utf-8")
    assert "zero-shot mR" in page
    lines = describe(summary)
    assert lines[-1].startswith("Open the report: ") and len(lines) < 20

    # killed after the first model: its parts are kept, the rest is redone
    layout = ExperimentLayout(root)
    kept = (layout.model("joint_unaligned", 0) / "model" / "model.safetensors").stat().st_mtime_ns
    killed = layout.evaluation("muvla", 0, "test", probe=True) / "predictions_retrieval_test.json"
    killed.unlink()
    again = run_experiment(cfg)
    assert (layout.model("joint_unaligned", 0) / "model" / "model.safetensors").stat().st_mtime_ns == kept
    assert again["runs"][0]["zero_shot"] == summary["runs"][0]["zero_shot"]
    assert killed.is_file()
    assert again["steps"]["redone"] == ["models/muvla/seed-0/probe/test"]

    # an unchanged rerun does nothing and says so
    third = run_experiment(cfg)
    assert third["steps"]["redone"] == [] and "nothing to do" in describe(third)[0]

    # a changed pre-training setting is refused, naming it; with overwrite the models (and only what
    # depends on them) are redone
    with pytest.raises(ConfigError, match=r"lr=0\.001 \(this run: 0\.005\).*--overwrite"):
        run_experiment(tiny_experiment(tmp_path, **{"pretrain.lr": 5e-3}))
    model_file = layout.model("muvla", 0) / "model" / "model.safetensors"
    before = model_file.read_bytes()
    retrained = run_experiment(tiny_experiment(tmp_path, overwrite=True, **{"pretrain.lr": 5e-3}))
    assert model_file.read_bytes() != before
    assert sorted(retrained["steps"]["redone"]) == sorted(f"models/{m}/seed-0{part}" for m in ("joint_unaligned", "muvla")
                                                          for part in ("", "/zero_shot/dev", "/zero_shot/test", "/probe",
                                                                       "/probe/dev", "/probe/test"))

    # a changed split setting never keeps the old split silently
    with pytest.raises(ConfigError, match=r"held_out=0\.6 \(this run: 0\.7\)"):
        run_experiment(tiny_experiment(tmp_path, **{"evaluation.held_out": 0.7}))


@pytest.mark.slow
def test_tuning_mode_leaves_the_test_images_untouched(tmp_path: Path, one_thread) -> None:
    """report_on: dev scores dev only; no evaluation of a test image exists afterwards."""
    cfg = tiny_experiment(tmp_path, models=["muvla"], **{"evaluation.report_on": "dev", "evaluation.probe_steps": 0})
    summary = run_experiment(cfg)
    root = Path(cfg.out)
    assert not list(root.glob("models/*/seed-*/*/test"))
    assert {r["split"] for r in csv.DictReader((root / "results.csv").open(encoding="utf-8"))} == {"dev"}
    md = (root / "results.md").read_text(encoding="utf-8")
    assert "## Claims, dev split" in md and "the test split is untouched" in md and "## Dev split" not in md
    assert summary["report_on"] == "dev"


def test_experiment_settings_are_checked_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="models: expected one of"):
        tiny_experiment(tmp_path, models=["muvla", "gpt"])
    with pytest.raises(ConfigError, match="pretrain.mode is set by the experiment"):
        tiny_experiment(tmp_path, pretrain={"mode": "base"})
    with pytest.raises(ConfigError, match="text setting bc needs a text corpus"):
        tiny_experiment(tmp_path, text_setting="bc", pool=[])
    with pytest.raises(ConfigError, match=r"^evaluation.max_text_len must be >= 3 \(\[CLS\] \+ a token"):
        EvaluationSettings(max_text_len=2).validate()


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["flickr8k", "coco_mini"])
def test_shipped_experiment_configs_validate_on_the_shared_data(name: str, repo: Path, monkeypatch) -> None:
    """The configs README runs name ../shared/data relative to the repository root, and are valid there."""
    monkeypatch.chdir(repo)
    cfg = load_config(ExperimentConfig, repo / "configs" / "experiments" / f"{name}.yaml", {"out": "runs/check"})
    assert len(cfg.seeds) >= 3 and "muvla" in cfg.models and "base" in cfg.models


def test_paper_experiment_config_is_complete(tmp_path: Path, repo: Path) -> None:
    """Every setting of the GPU config is a real setting; only its data paths are the user's."""
    (tmp_path / "images").mkdir()
    files = {key: tmp_path / f"{key}.txt" for key in ("captions", "pool", "features", "predictions")}
    for path in files.values():
        path.write_text("x\n", encoding="utf-8")
    cfg = load_config(ExperimentConfig, repo / "configs" / "experiments" / "paper.yaml", {
        "out": str(tmp_path / "exp"), "images": str(tmp_path / "images"), "captions": str(files["captions"]),
        "pool": [str(files["pool"])], "regions.vinvl_features": str(files["features"]),
        "regions.vinvl_predictions": str(files["predictions"])})
    assert cfg.pretrain["init"] == "bert-base-uncased" and cfg.pretrain["warmup_samples"] == 3_000_000
    assert set(cfg.models) >= {"base", "round_robin", "joint_unaligned", "muvla", "aligned", "aligned_ratio_0.5"}
