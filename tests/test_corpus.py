"""`muvla corpus` end to end: all stages, report, kill-and-resume, and shards merged == one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muvla.corpus.build import CorpusConfig, run_corpus
from muvla.regions.stage import RegionsSettings
from muvla.retrieval.stage import RetrievalSettings
from muvla.text.stage import TextSettings
from muvla.utils.config import from_dict, read_yaml

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "A woman astronaut in a white space suit holds a flag.",
    "A tabby cat lies on a red blanket and looks at the camera.",
    "A cup of coffee sits on a saucer next to a spoon.",
    "A rocket stands on the launch pad under a blue sky.",
    "A red motorcycle is parked in a garage.",
    "A plate of pasta with tomato sauce on a wooden table.",
    "Two children play football in a park.",
    "A bus drives down a busy city street.",
    "An old man reads a newspaper on a bench.",
    "A sailboat floats on a calm lake at sunset.",
    "A dog catches a frisbee on the beach.",
    "A bowl of fruit with apples and bananas.",
]

# Tiny settings so the whole pipeline runs in seconds; unit_size 1 gives many resumable units.
TINY = {"regions": {"backend": "proposals", "max_regions": 4, "unit_size": 1, "batch_size": 8, "max_proposals": 8},
        "retrieval": {"unit_size": 4, "k": 3, "query_mode": "counted"}}


def tiny_config(out: Path, images: Path, corpus: Path, **kw) -> CorpusConfig:
    return CorpusConfig(out=out, regions=RegionsSettings(images=images, **TINY["regions"]),
                        text=TextSettings(corpus=[corpus]), retrieval=RetrievalSettings(**TINY["retrieval"]), **kw)


def _write_images(folder: Path) -> Path:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((96, 96))
        image.save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus_inputs")
    corpus = root / "captions.txt"
    corpus.write_text("\n".join(SENTENCES + ["", SENTENCES[0]]) + "\n", encoding="utf-8")
    return _write_images(root / "images"), corpus


@pytest.fixture(scope="module")
def reference_run(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    images, corpus = inputs
    out = tmp_path_factory.mktemp("reference") / "run"
    return out, run_corpus(tiny_config(out, images, corpus))


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MUVLA_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "muvla", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def _cli_args(images: Path, corpus: Path, out: Path) -> list[str]:
    return ["corpus", "--images", str(images), "--corpus", str(corpus), "--out", str(out), "--no-report",
            *[f"--set=regions.{k}={v}" for k, v in TINY["regions"].items()],
            *[f"--set=retrieval.{k}={v}" for k, v in TINY["retrieval"].items()]]


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every merged output of two corpus runs is identical (arrays bytewise, tables by value)."""
    for table in ("regions/index.parquet", "text/sentences.parquet", "retrieval/topk.parquet",
                  "retrieval/queries.parquet", "phrases/sentence_phrases.parquet", "phrases/matches.parquet"):
        assert (a / table).read_bytes() == (b / table).read_bytes(), table  # byte for byte
    parts_a = sorted(p.relative_to(a) for p in (a / "regions" / "parts").rglob("*.npy"))
    parts_b = sorted(p.relative_to(b) for p in (b / "regions" / "parts").rglob("*.npy"))
    assert parts_a == parts_b and parts_a
    for rel in parts_a:
        assert np.array_equal(np.load(a / rel), np.load(b / rel)), rel
    assert (a / "regions" / "rejected.jsonl").read_text() == (b / "regions" / "rejected.jsonl").read_text()


def test_corpus_runs_all_stages_and_writes_report(reference_run: tuple[Path, dict]) -> None:
    out, result = reference_run
    for stage, marker in (("regions", "index.parquet"), ("text", "sentences.parquet"),
                          ("retrieval", "topk.parquet"), ("phrases", "matches.parquet")):
        assert (out / stage / marker).exists()
        assert (out / stage / "config.yaml").exists()
    assert (out / "config.yaml").exists()
    report = Path(result["report"])
    assert report.exists() and "astronaut" in report.read_text(encoding="utf-8")
    # the broken file is recorded, not lost and not fatal
    rejected = (out / "regions" / "rejected.jsonl").read_text()
    assert "broken.jpg" in rejected
    topk = pq.read_table(out / "retrieval" / "topk.parquet").to_pydict()
    assert len(set(topk["image_id"])) == 5 and max(topk["rank"]) == TINY["retrieval"]["k"] - 1


def test_rerun_is_a_no_op_with_identical_outputs(reference_run: tuple[Path, dict], inputs, tmp_path: Path) -> None:
    out, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in (out / "regions" / "parts").rglob("*.npy")}
    images, corpus = inputs
    result = run_corpus(tiny_config(out, images, corpus, report=False))
    assert all(stage.get("reused") for stage in result["stages"].values())
    after = {p: p.stat().st_mtime_ns for p in (out / "regions" / "parts").rglob("*.npy")}
    assert before == after  # finished units were skipped, not recomputed


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "corpus").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_corpus_configs_name_only_known_settings(path: Path) -> None:
    """Every key of a shipped config is a setting of its section, with an allowed value (inputs aside)."""
    cfg = from_dict(CorpusConfig, {**read_yaml(path), "out": "runs/x"}, validate=False)
    assert cfg.regions.backend != "auto" and cfg.retrieval.k == 5


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_equals_uninterrupted(reference_run, inputs, tmp_path: Path) -> None:
    images, corpus = inputs
    out = tmp_path / "killed"
    proc = _cli(_cli_args(images, corpus, out), start_new_session=True)
    parts = out / "regions" / "parts"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.exists() and len([p for p in parts.iterdir() if p.name.startswith("part-")]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "regions" / "index.parquet").exists()  # really killed mid-stage
    resumed = _cli(_cli_args(images, corpus, out))
    log = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, log
    assert_same_outputs(reference_run[0], out)


@pytest.mark.slow
def test_two_shards_merged_equal_one_run(reference_run, inputs, tmp_path: Path) -> None:
    images, corpus = inputs
    out = tmp_path / "sharded"
    procs = [_cli([*_cli_args(images, corpus, out), "--shard", str(i), "--num-shards", "2"]) for i in (0, 1)]
    logs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    assert_same_outputs(reference_run[0], out)
