"""The step protocol seen from the command line: every command's ``config.yaml`` loads back with
``--config`` and the rerun is recognised as the same step (nothing is redone, nothing rewritten);
changed settings are refused or redone as docs/DESIGN.md says."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from muvla.cli import COMMANDS, main
from muvla.corpus.build import CorpusConfig, run_corpus
from muvla.corpus.layout import PhrasesOutput
from muvla.corpus.provenance import BUILD_FILE, BuildRecord, finish_output
from muvla.corpus.synthetic import write_synthetic_corpus
from muvla.demo import demo_captions_path, demo_eval_captions_path, write_sample_images
from muvla.experiment import ExperimentConfig, run_experiment
from muvla.phrases.stage import PhrasesConfig, run_phrases
from muvla.pretraining.run import PretrainConfig, run_pretrain
from muvla.regions.stage import RegionsConfig, RegionsSettings, run_regions
from muvla.retrieval.pairs import PairsConfig, run_pairs
from muvla.retrieval.stage import RetrievalConfig, RetrievalSettings, run_retrieval
from muvla.tasks.evaluate import EvaluateConfig, run_evaluate
from muvla.tasks.finetune import FinetuneConfig, run_finetune
from muvla.text.stage import TextConfig, TextSettings, run_text
from muvla.utils.config import ConfigError, load_config

IMAGES = ("astronaut", "chelsea", "coffee", "rocket")
CAPTIONS = {"astronaut": "A woman astronaut in a white space suit holds a flag.",
            "chelsea": "A tabby cat lies on a red blanket and looks at the camera.",
            "coffee": "A cup of coffee sits on a saucer next to a spoon.",
            "rocket": "A rocket stands on the launch pad under a blue sky."}
OTHER = ["Two dogs run on a sandy beach.", "A bowl of fruit with apples and bananas.",
         "A bus drives down a busy city street.", "A man reads a newspaper on a bench."]
REGIONS = {"backend": "proposals", "max_regions": 3, "max_proposals": 4, "crop_size": 64, "proposal_max_side": 48,
           "proposal_scales": (100.0,), "unit_size": 2, "num_threads": 1, "progress": False}
TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
TRAIN = {"max_steps": 2, "batch_size": 2, "log_every": 1, "plot": False, "device": "cpu"}
# Commands whose reload is checked in another test file, and commands that build no step output.
CHECKED_ELSEWHERE = {"demo": "tests/test_demo.py (slow: the real MiniLM)"}
BUILDS_NOTHING = {"report": "renders an existing run folder; it has no settings that change an output"}


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run of every command on tiny inputs: command name -> the folder holding its config.yaml."""
    import skimage.data

    root = tmp_path_factory.mktemp("steps")
    images = root / "images"
    images.mkdir()
    for name in IMAGES:
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((64, 64))
        im.save(images / f"{name}.png")
    text_file = root / "sentences.txt"
    text_file.write_text("\n".join([*CAPTIONS.values(), *OTHER]) + "\n", encoding="utf-8")
    captions = root / "captions.json"
    captions.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{n}.png"} for i, n in enumerate(IMAGES)],
        "annotations": [{"id": i, "image_id": i, "caption": CAPTIONS[n]} for i, n in enumerate(IMAGES)]}),
        encoding="utf-8")
    run = root / "run"
    out = {name: run / name for name in ("regions", "text", "retrieve", "pairs", "phrases", "corpus", "pretrain",
                                          "finetune", "evaluate", "experiment")}
    run_regions(RegionsConfig(out=out["regions"], images=images, **REGIONS))
    run_text(TextConfig(out=out["text"], corpus=[text_file]))
    run_retrieval(RetrievalConfig(out=out["retrieve"], regions=out["regions"], text=out["text"], k=2, unit_size=4))
    run_pairs(PairsConfig(out=out["pairs"], regions=out["regions"], text=out["text"], mode="aligned",
                          captions=captions, k=1))
    run_phrases(PhrasesConfig(out=out["phrases"], retrieval=out["retrieve"]))
    run_corpus(CorpusConfig(out=out["corpus"], regions=RegionsSettings(images=images, **REGIONS),
                            text=TextSettings(corpus=[text_file]), retrieval=RetrievalSettings(k=2, unit_size=4),
                            report=False))
    run_pretrain(load_config(PretrainConfig, overrides={"out": out["pretrain"], "corpus": out["corpus"],
                                                        "init": "random", "model": TINY_MODEL, "max_text_len": 16,
                                                        "tensorboard": False, **TRAIN}))
    run_finetune(FinetuneConfig(out=out["finetune"], task="retrieval", train=[captions], val=[captions],
                                regions=out["regions"], model=str(out["pretrain"]), max_text_len=16, **TRAIN))
    run_evaluate(EvaluateConfig(out=out["evaluate"], task="retrieval", model=str(out["pretrain"]),
                                regions=out["regions"], captions=captions, device="cpu", max_text_len=16))
    samples = root / "samples"  # the experiment splits at least 10 captioned images
    write_sample_images(samples)
    run_experiment(load_config(ExperimentConfig, overrides={
        "out": out["experiment"], "images": samples, "captions": demo_eval_captions_path(),
        "pool": [demo_captions_path()],
        "models": ["muvla"], "seeds": [0], "regions": dict(REGIONS), "retrieval": {"k": 2, "unit_size": 4},
        "pretrain": {"init": "random", "model": TINY_MODEL, "max_text_len": 16, "tensorboard": False,
                     "max_regions": 3, **{k: v for k, v in TRAIN.items() if k != "device"}},
        "evaluation": {"held_out": 0.5, "probe_fraction": 0.5, "probe_steps": 1, "probe_batch_size": 2,
                       "max_text_len": 16}, "report": False}))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    """build.json and config.yaml of every step folder below ``folder`` (a rerun rewrites them)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.name in (BUILD_FILE, "config.yaml") and p.is_file()}


def test_every_command_is_covered(steps: dict[str, Path]) -> None:
    names = {c.name for c in COMMANDS}
    assert names == {"retrieve" if n == "retrieve" else n for n in steps} | set(CHECKED_ELSEWHERE) | set(BUILDS_NOTHING)


@pytest.mark.parametrize("command", ["regions", "text", "retrieve", "pairs", "phrases", "corpus", "pretrain",
                                     "finetune", "evaluate", "experiment"])
def test_saved_config_reruns_as_the_same_step(steps: dict[str, Path], command: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    folder = steps[command]
    before = _snapshot(folder)
    assert before, f"{command} wrote no build.json / config.yaml"
    with caplog.at_level(logging.INFO, logger="muvla.corpus.provenance"):
        assert main([command, "--config", str(folder / "config.yaml")]) == 0
    assert "up to date (same settings and inputs)" in caplog.text
    assert "rebuilding" not in caplog.text and "being redone" not in caplog.text
    assert _snapshot(folder) == before  # nothing was rewritten


def test_a_config_of_another_command_is_one_line(steps: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--config", str(steps["text"] / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records a TextConfig, not the PretrainConfig" in err


def test_changed_own_setting_is_refused_then_redone_with_overwrite(steps: dict[str, Path], tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    folder = steps["evaluate"]
    cfg = load_config(EvaluateConfig, folder / "config.yaml")
    with pytest.raises(ConfigError, match=r"max_captions_per_image=0 \(this run: 1\).*--overwrite"):
        run_evaluate(load_config(EvaluateConfig, folder / "config.yaml", {"max_captions_per_image": 1}))
    with caplog.at_level(logging.WARNING, logger="muvla.corpus.provenance"):
        redone = run_evaluate(load_config(EvaluateConfig, folder / "config.yaml",
                                          {"max_captions_per_image": 1, "overwrite": True}))
    assert "the old output was removed" in caplog.text and not redone.get("reused")
    assert load_config(EvaluateConfig, folder / "config.yaml").max_captions_per_image == 1
    # back to the original settings: refused again (the folder now holds the other generation)
    with pytest.raises(ConfigError, match="max_captions_per_image"):
        run_evaluate(cfg)


def test_changed_input_redoes_downstream_step(steps: dict[str, Path], tmp_path: Path) -> None:
    """A model retrained under the same folder makes its evaluation stale: it is redone, not reused."""
    pretrain = load_config(PretrainConfig, steps["pretrain"] / "config.yaml")
    evaluate = load_config(EvaluateConfig, steps["finetune"].parent / "evaluate" / "config.yaml")
    evaluate.out = tmp_path / "eval"
    evaluate.overwrite = False
    first = run_evaluate(evaluate)
    assert not first.get("reused")
    retrained = run_pretrain(load_config(PretrainConfig, steps["pretrain"] / "config.yaml",
                                         {"seed": pretrain.seed + 1, "overwrite": True}))
    assert not retrained.get("reused")
    again = run_evaluate(evaluate)
    assert not again.get("reused")
    assert run_evaluate(evaluate).get("reused")


def test_pretraining_refuses_phrase_spans_of_another_vocabulary(tmp_path: Path) -> None:
    corpus = write_synthetic_corpus(tmp_path / "corpus", num_images=6, feature_dim=8)
    phrases = PhrasesOutput(corpus / "phrases")
    record = BuildRecord.read(phrases.root)
    assert record is not None
    record.inputs["tokenizer_vocab"] = "0" * 20  # as if the spans came from another WordPiece vocabulary
    finish_output(phrases.root, record, phrases.outputs())
    cfg: dict[str, Any] = {"out": tmp_path / "run", "corpus": corpus, "init": "random", "model": TINY_MODEL,
                           "tensorboard": False, **TRAIN}
    with pytest.raises(ConfigError, match="another WordPiece vocabulary"):
        run_pretrain(load_config(PretrainConfig, overrides=cfg))
