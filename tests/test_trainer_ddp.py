"""Two-process DDP checks (CPU, gloo) through torchrun, including kill-and-resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dist_utils import kill_group, run_ranks, run_torchrun, start_torchrun
from muvla.training.plots import read_metrics
from muvla.training.trainer import TrainConfig, Trainer
from trainer_toy import ToyCollate, ToyDataset, flat_params, make_model

SCRIPT = '''
import json, os, sys
import torch
from muvla.training.distributed import cleanup_distributed, get_rank
from muvla.training.trainer import Trainer, TrainConfig
from trainer_toy import ToyCollate, ToyDataset, flat_params, make_model

torch.set_num_threads(1)
spec = json.loads(open(sys.argv[1]).read())
model = make_model(seed=spec.get("model_seed", 0) + get_rank(), dropout=spec.get("dropout", 0.0),
                   unused_head=spec.get("unused_head", False))
cfg = TrainConfig(**spec["cfg"])
trainer = Trainer(model, ToyDataset(n=spec["n"]), ToyCollate(spec.get("noise", 0.0)), cfg)
summary = trainer.train()
rank = trainer.dist.rank
torch.save({"params": flat_params(model), "seen": model.seen_indices, "summary": summary,
            "backend": trainer.dist.backend, "world": trainer.dist.world},
           os.path.join(spec["cfg"]["out"], f"result-rank{rank}.pt"))
cleanup_distributed()
'''


def write_job(tmp_path: Path, name: str, out: Path, n: int, noise: float = 0.1, dropout: float = 0.0,
              unused_head: bool = False, **cfg) -> tuple[Path, Path]:
    script = tmp_path / "ddp_job.py"
    script.write_text(SCRIPT)
    base = dict(out=str(out), batch_size=4, lr=1e-2, log_every=1, save_every=1000, tensorboard=False,
                plot=False, device="cpu", seed=3, precision="fp32")  # compared to float tolerance
    base.update(cfg)
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"n": n, "cfg": base, "noise": noise, "dropout": dropout,
                                "unused_head": unused_head}))
    return script, spec


def results(out: Path, world: int = 2) -> list[dict]:
    return [torch.load(out / f"result-rank{r}.pt", weights_only=False) for r in range(world)]


def test_ddp_disjoint_shards_identical_params_and_single_process_match(tmp_path):
    """2 ranks x 2 micro-batches of 2 (no_sync on the first) with an idle head vs 1 process x 8."""
    out = tmp_path / "ddp"
    script, spec = write_job(tmp_path, "ddp", out, n=32, max_steps=4, batch_size=2, grad_accum=2, save_every=2,
                             noise=0.0, unused_head=True, find_unused_parameters=True)
    run_ranks(script, 2, [str(spec)], timeout=180)
    res = results(out)
    assert [r["world"] for r in res] == [2, 2] and res[0]["backend"] == "gloo"
    # ranks were initialised differently (model_seed + rank); DDP must broadcast rank 0's weights
    assert torch.equal(res[0]["params"], res[1]["params"])
    per_step = [[res[r]["seen"][2 * s] + res[r]["seen"][2 * s + 1] for s in range(4)] for r in range(2)]
    for s in range(4):
        assert len(per_step[0][s]) == 4 and len(per_step[1][s]) == 4 and not set(per_step[0][s]) & set(per_step[1][s])
    seen0, seen1 = sum(res[0]["seen"], []), sum(res[1]["seen"], [])
    assert not set(seen0) & set(seen1)  # 4 steps x 8 samples = one epoch: fully disjoint
    assert sorted(seen0 + seen1) == list(range(32))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000002", "step-0000004"]
    ckpt = out / "checkpoints" / "step-0000004"
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    rows = read_metrics(out / "metrics.jsonl").rows
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    # The interleaved shards give the two ranks together the same 8 samples per step as one process
    # with batch 8, so losses and weights match up to floating-point reduction order.
    single = Trainer(make_model(seed=0, unused_head=True), ToyDataset(n=32), ToyCollate(0.0),
                     TrainConfig(out=tmp_path / "single", max_steps=4, batch_size=8, lr=1e-2, log_every=1,
                                 tensorboard=False, plot=False, device="cpu", seed=3, precision="fp32"))
    single.train()
    assert [sorted(per_step[0][s] + per_step[1][s]) for s in range(4)] == \
        [sorted(b) for b in single.model.seen_indices]
    assert torch.allclose(res[0]["params"], flat_params(single.model), atol=1e-5, rtol=0)
    single_rows = read_metrics(tmp_path / "single" / "metrics.jsonl").rows
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single_rows], abs=1e-5)


@pytest.mark.slow
def test_ddp_kill_and_resume_matches_uninterrupted(tmp_path):
    """SIGKILL a 2-process run after its step-10 checkpoint; the resumed run must match exactly."""
    kw = dict(max_steps=20, save_every=5, log_every=2, batch_size=4)
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    script, ref_spec = write_job(tmp_path, "ref", ref_out, n=40, dropout=0.1, **kw)
    _, run_spec = write_job(tmp_path, "run", run_out, n=40, dropout=0.1, **kw)
    run_torchrun(script, 2, [str(ref_spec)], timeout=240)

    slow = {"MUVLA_TOY_STEP_SLEEP": "0.15"}
    job = start_torchrun(script, 2, [str(run_spec)], env=slow, log=tmp_path / "killed.log")
    target = run_out / "checkpoints" / "step-0000010"
    deadline = time.monotonic() + 180
    try:
        while not target.exists():
            if job.poll() is not None:
                raise AssertionError("the run ended before it could be killed:\n"
                                     + (tmp_path / "killed.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError("no step-10 checkpoint within 180 s")
            time.sleep(0.05)
    finally:
        kill_group(job)
    assert not (run_out / "checkpoints" / "step-0000020").exists()
    assert not (run_out / "result-rank0.pt").exists()

    resumed_spec = json.loads(run_spec.read_text())
    resumed_spec["cfg"]["resume"] = True
    run_spec.write_text(json.dumps(resumed_spec))
    run_torchrun(script, 2, [str(run_spec)], timeout=240)
    summary = results(run_out)[0]["summary"]
    resumed_step = int(Path(summary["resumed_from"]).name.split("-")[1])
    assert resumed_step >= 10

    ref_rows = read_metrics(ref_out / "metrics.jsonl").rows
    got_rows = read_metrics(run_out / "metrics.jsonl").rows
    assert [r["step"] for r in got_rows] == list(range(2, 21, 2))
    for a, b in zip(ref_rows, got_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["mse_loss"] == pytest.approx(b["mse_loss"], abs=1e-5), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], abs=1e-12)
    ref_res, got_res = results(ref_out), results(run_out)
    for r in range(2):
        assert torch.allclose(ref_res[r]["params"], got_res[r]["params"], atol=1e-6, rtol=0)
