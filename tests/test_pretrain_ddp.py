"""2-process gloo pre-training through run_pretrain (the path `torchrun -m muvla pretrain` takes)."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

import pretrain_fixtures
from dist_utils import run_torchrun
from muvla.model import Model
from pretrain_fixtures import tiny_run_overrides

tiny_corpus = pretrain_fixtures.tiny_corpus  # shared session fixture

SCRIPT = textwrap.dedent("""
    import sys
    from muvla.pretraining.run import PretrainConfig, run_pretrain
    from muvla.utils.config import load_config

    summary = run_pretrain(load_config(PretrainConfig, sys.argv[1]))
    print("WORLD", summary["train"]["world"])
""")


@pytest.mark.slow
def test_two_process_gloo_pretraining(tmp_path, tiny_corpus):
    out = tmp_path / "ddp"
    cfg = tiny_run_overrides(out, tiny_corpus, max_steps=4, batch_size=4, save_every=2, log_every=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    script = tmp_path / "job.py"
    script.write_text(SCRIPT, encoding="utf-8")
    proc = run_torchrun(script, 2, [str(tmp_path / "cfg.yaml")], timeout=300)
    assert proc.stdout.count("WORLD") == 2  # both ranks finished (their lines may interleave)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("loss_rn" in r and "w_itm_mean" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["world"] == 2 and summary["corpus"]["images"] == 24
    Model.from_pretrained(out / "model")
    assert (out / "checkpoints" / "step-0000004" / "rank-00001.pt").is_file()
