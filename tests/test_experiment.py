"""`muvla experiment` end to end on a tiny version: 2 models, 1 seed, a few steps, held-out images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

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
        "evaluation": {"held_out": 0.4, "probe_fraction": 0.4, "probe_steps": 2, "probe_batch_size": 2,
                       "max_text_len": 24},
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
    held = set(split["probe_train"]) | set(split["probe_test"])
    assert held and not held & set(split["train"])  # held-out images never reach pre-training
    corpus = CorpusLayout.at(root / "corpora" / "retrieval")
    assert set(corpus.regions.store().image_ids) == set(split["train"])
    assert set(CorpusLayout.at(root / "corpora" / "random").retrieval.read_topk().image_id) <= set(split["train"])

    rows = list(csv.DictReader((root / "results.csv").open(encoding="utf-8")))
    assert [(r["model"], r["seed"]) for r in rows] == [("joint_unaligned", "0"), ("muvla", "0")]
    for r in rows:
        assert 0.0 <= float(r["zero_shot_mean_recall"]) <= 1.0 and 0.0 <= float(r["probe_mean_recall"]) <= 1.0
    md = (root / "results.md").read_text(encoding="utf-8")
    assert "| muvla |" in md and "zero-shot mR" in md and "muvla - joint_unaligned" in md
    for plot in ("zero_shot.png", "probe.png", "training_curves.png"):
        assert (root / "plots" / plot).stat().st_size > 0
    page = Path(summary["report"]).read_text(encoding="utf-8")
    assert "Experiment" in page and "zero-shot mR" in page
    lines = describe(summary)
    assert lines[-1].startswith("Open the report: ") and len(lines) < 20

    # killed after the first model: its parts are kept, the rest is redone
    layout = ExperimentLayout(root)
    kept = (layout.model("joint_unaligned", 0) / "model" / "model.safetensors").stat().st_mtime_ns
    (layout.model("muvla", 0) / "probe" / "results.json").unlink()
    again = run_experiment(cfg)
    assert (layout.model("joint_unaligned", 0) / "model" / "model.safetensors").stat().st_mtime_ns == kept
    assert again["runs"][0]["zero_shot"] == summary["runs"][0]["zero_shot"]
    assert (layout.model("muvla", 0) / "probe" / "results.json").is_file()
    assert again["steps"]["redone"] == ["models/muvla/seed-0/probe"]

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
                                                          for part in ("", "/zero_shot", "/probe"))

    # a changed split setting never keeps the old split silently
    with pytest.raises(ConfigError, match=r"held_out=0\.4 \(this run: 0\.6\)"):
        run_experiment(tiny_experiment(tmp_path, **{"evaluation.held_out": 0.6}))


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
