"""Stage integrity: every output records what it was built from, so a corpus never mixes generations."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from muvla.cli import main
from muvla.corpus.build import CorpusConfig, run_corpus
from muvla.corpus.layout import CorpusLayout, RegionsOutput
from muvla.corpus.provenance import BuildRecord, finish_output
from muvla.phrases.stage import PhrasesConfig, run_phrases
from muvla.pretraining.run import PretrainConfig, run_pretrain
from muvla.regions.stage import RegionsConfig, RegionsSettings, run_regions
from muvla.retrieval.stage import RetrievalConfig, RetrievalSettings, run_retrieval
from muvla.text.stage import TextConfig, TextSettings, run_text
from muvla.utils.config import ConfigError

SENTENCES = ["A woman astronaut in a white space suit holds a flag.",
             "A tabby cat lies on a red blanket and looks at the camera.",
             "A cup of coffee sits on a saucer next to a spoon.",
             "A rocket stands on the launch pad under a blue sky.",
             "Two dogs run on a sandy beach.", "A bowl of fruit with apples and bananas.",
             "A bus drives down a busy city street.", "A man reads a newspaper on a bench."]
REGIONS = {"backend": "proposals", "max_regions": 3, "max_proposals": 4, "crop_size": 64, "proposal_max_side": 48,
           "proposal_scales": (100.0,), "unit_size": 2, "num_threads": 1, "progress": False}


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    import skimage.data

    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((64, 64))
        im.save(images / f"{name}.png")
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return images, corpus


def _stage_by_stage(run: Path, images: Path, corpus: Path, query_mode: str) -> None:
    run_regions(RegionsConfig(out=run / "regions", images=images, **REGIONS))
    run_text(TextConfig(out=run / "text", corpus=[corpus]))
    run_retrieval(RetrievalConfig(out=run / "retrieval", regions=run / "regions", text=run / "text", k=3,
                                  query_mode=query_mode, unit_size=4))
    run_phrases(PhrasesConfig(out=run / "phrases", retrieval=run / "retrieval"))


def _corpus_config(run: Path, images: Path, corpus: Path, overwrite: bool = False) -> CorpusConfig:
    return CorpusConfig(out=run, regions=RegionsSettings(images=images, **REGIONS),
                        text=TextSettings(corpus=[corpus]), retrieval=RetrievalSettings(k=3, unit_size=4),
                        report=False, overwrite=overwrite)


def _pairs(run: Path) -> tuple[list[tuple], list[tuple]]:
    topk = pq.read_table(run / "retrieval" / "topk.parquet").to_pylist()
    matches = pq.read_table(run / "phrases" / "matches.parquet").to_pylist()
    return ([(r["image_id"], r["rank"], r["sentence_id"]) for r in topk],
            [(r["image_id"], r["rank"], r["sentence_id"]) for r in matches])


def test_corpus_over_a_stage_by_stage_build_refuses_then_rebuilds_consistently(inputs, tmp_path: Path) -> None:
    """The sequence of the integrity issue: stages by hand with counted queries, then `muvla corpus`
    (salient queries by default) on the same folder."""
    images, corpus = inputs
    run = tmp_path / "run"
    _stage_by_stage(run, images, corpus, query_mode="counted")
    topk_before = (run / "retrieval" / "topk.parquet").read_bytes()
    with pytest.raises(ConfigError, match=r"query_mode='counted' \(this run: 'salient'\).*--overwrite"):
        run_corpus(_corpus_config(run, images, corpus))
    assert (run / "retrieval" / "topk.parquet").read_bytes() == topk_before  # nothing was touched
    CorpusLayout.at(run).verify()

    run_corpus(_corpus_config(run, images, corpus, overwrite=True))
    check = CorpusLayout.at(run).verify()
    topk, matches = _pairs(run)
    assert topk == matches  # phrases were redone for the new retrieval: every pair has its match row
    assert check.digests["retrieval"] == BuildRecord.read(run / "phrases").inputs["retrieval"]
    assert BuildRecord.read(run / "retrieval").settings["query_mode"] == "salient"


def test_a_stale_stage_is_redone_and_pretraining_refuses_a_mixed_corpus(inputs, tmp_path: Path) -> None:
    images, corpus = inputs
    run = tmp_path / "run"
    _stage_by_stage(run, images, corpus, query_mode="official")
    # retrieval rebuilt with other settings, phrases not rerun: the corpus mixes two generations
    run_retrieval(RetrievalConfig(out=run / "retrieval", regions=run / "regions", text=run / "text", k=3,
                                  query_mode="counted", unit_size=4, overwrite=True))
    with pytest.raises(ConfigError, match="inconsistent.*phrases was built from another retrieval output"):
        CorpusLayout.at(run).verify()
    with pytest.raises(ConfigError, match="inconsistent"):
        run_pretrain(PretrainConfig(out=tmp_path / "pt", corpus=run, max_steps=1, init="random",
                                    model={"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                           "intermediate_size": 16}, device="cpu"))
    assert not (tmp_path / "pt" / "checkpoints").exists()
    # rerunning the stale stage redoes it (its input changed), and the corpus is consistent again
    summary = run_phrases(PhrasesConfig(out=run / "phrases", retrieval=run / "retrieval"))
    assert summary["status"] == "done" and not summary.get("reused")
    CorpusLayout.at(run).verify()
    topk, matches = _pairs(run)
    assert topk == matches
    # and an up-to-date stage is reused, not redone
    assert run_phrases(PhrasesConfig(out=run / "phrases", retrieval=run / "retrieval"))["reused"] is True


def test_pretrain_refuses_a_k_larger_than_the_corpus(tmp_path: Path) -> None:
    from muvla.corpus.synthetic import write_synthetic_corpus

    corpus = write_synthetic_corpus(tmp_path / "c", num_images=4, feature_dim=8)
    with pytest.raises(ConfigError, match="k=10 but the corpus's retrieval stage gave K=3"):
        run_pretrain(PretrainConfig(out=tmp_path / "pt", corpus=corpus, k=10, max_steps=1, init="random",
                                    device="cpu"))


def test_a_modified_output_is_detected(tmp_path: Path) -> None:
    from muvla.corpus.synthetic import write_synthetic_corpus

    corpus = write_synthetic_corpus(tmp_path / "c", num_images=4, feature_dim=8)
    table = pq.read_table(corpus / "retrieval" / "topk.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), corpus / "retrieval" / "topk.parquet")
    with pytest.raises(ConfigError, match="files changed after the retrieval stage finished"):
        CorpusLayout.at(corpus).verify()


@pytest.mark.parametrize("args, message", [
    (["--query-mode", "countd"], "retrieval.query_mode: expected one of official, counted, salient; got 'countd'"),
    (["--set", "retrieval.k=abc"], "retrieval.k: expects int, got 'abc'"),
    (["--set", "phrases.unit_size=0"], "phrases.unit_size must be >= 1"),
    (["--backend", "coco-instances"], "regions backend 'coco-instances' needs --coco-instances"),
])
def test_corpus_settings_are_checked_before_any_stage_runs(inputs, tmp_path: Path, args: list[str], message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    images, corpus = inputs
    out = tmp_path / "run"
    code = main(["corpus", "--images", str(images), "--corpus", str(corpus), "--out", str(out), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (out / "regions").exists()  # no stage started


def test_regions_refuse_changed_inputs_instead_of_mixing_them(inputs, tmp_path: Path) -> None:
    images, _ = inputs
    out = tmp_path / "regions"
    run_regions(RegionsConfig(out=out, images=images, **REGIONS))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "extra.png")  # parts are positional
    with pytest.raises(ConfigError, match=r"built from other inputs \(listing changed\)"):
        run_regions(RegionsConfig(out=out, images=images, **REGIONS))
    summary = run_regions(RegionsConfig(out=out, images=images, overwrite=True, **REGIONS))
    assert summary["images_written"] == 4
    assert json.loads((out / "build.json").read_text())["complete"] is True


def test_a_moved_corpus_is_reused_not_refused(inputs, tmp_path: Path) -> None:
    """The output folder is where a stage writes, not what it writes: a moved corpus is reused as it is."""
    images, corpus = inputs
    _stage_by_stage(tmp_path / "run", images, corpus, "counted")
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    before = {p.parent.name: p.read_bytes() for p in moved.glob("*/build.json")}
    assert "out" not in json.loads((moved / "regions" / "build.json").read_text())["settings"]
    assert run_regions(RegionsConfig(out=moved / "regions", images=images, **REGIONS))["reused"] is True
    run_text(TextConfig(out=moved / "text", corpus=[corpus]))
    run_retrieval(RetrievalConfig(out=moved / "retrieval", regions=moved / "regions", text=moved / "text", k=3,
                                  query_mode="counted", unit_size=4))
    run_phrases(PhrasesConfig(out=moved / "phrases", retrieval=moved / "retrieval", regions=moved / "regions",
                              text=moved / "text"))  # every stage reuses its output: no refusal, no redo
    assert {p.parent.name: p.read_bytes() for p in moved.glob("*/build.json")} == before


def test_a_store_recorded_under_a_deprecated_backend_name_is_reused(inputs, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Region stores built when the proposals backend was called 'detector' are the same output."""
    images, _ = inputs
    cfg = RegionsConfig(out=tmp_path / "regions", images=images, **REGIONS)
    run_regions(cfg)
    record = BuildRecord.read(cfg.out)
    assert record is not None and record.settings["backend"] == "proposals"
    record.settings["backend"] = "detector"  # as an older muvla wrote it, digest included
    finish_output(cfg.out, record, RegionsOutput(cfg.out).outputs())
    stamp = (cfg.out / "index.parquet").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="muvla.corpus.provenance"):
        summary = run_regions(RegionsConfig(out=tmp_path / "regions", images=images, **REGIONS))
    assert summary["reused"] and "up to date" in caplog.text
    assert (cfg.out / "index.parquet").stat().st_mtime_ns == stamp
    assert BuildRecord.read(cfg.out).settings["backend"] == "detector"  # a reused record is not rewritten
    # another setting still differs: refused as always
    with pytest.raises(ConfigError, match="max_regions"):
        run_regions(RegionsConfig(out=tmp_path / "regions", images=images, **{**REGIONS, "max_regions": 2}))
