"""Single-process trainer checks on a toy regression model (fast, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from muvla.training.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights
from muvla.training.optim import linear_warmup_decay, param_groups
from muvla.training.plots import plot_training_curves, read_metrics
from muvla.training.sampler import ResumableDistributedSampler, batch_seed
from muvla.training.trainer import StepOutput, TrainConfig, Trainer
from muvla.utils.config import ConfigError, load_config
from trainer_toy import ToyCollate, ToyDataset, flat_params, make_model


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch):
    """Tiny models run fastest on one thread (and do not fight other tests for the cores)."""
    monkeypatch.setenv("MUVLA_NO_PROGRESS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg_for(out: Path, **kw) -> TrainConfig:
    # fp32: these tests compare runs to float tolerance; bf16 (what auto means on a CPU that has it)
    # rounds differently for different batch shapes
    base = dict(out=out, max_steps=10, batch_size=8, lr=1e-2, warmup_ratio=0.1, log_every=1, save_every=1000,
                tensorboard=False, plot=False, device="cpu", seed=3, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def train(out: Path, model=None, dataset=None, collate=None, **kw):
    model = model if model is not None else make_model()
    trainer = Trainer(model, dataset if dataset is not None else ToyDataset(), collate or ToyCollate(),
                      cfg_for(out, **kw))
    return trainer, trainer.train()


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, msg", [
    ({"batch_size": 0}, "batch_size"), ({"max_steps": -1}, "max_steps"), ({"max_steps": 0, "epochs": 0}, "epochs"),
    ({"precision": "fp8"}, "precision"), ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"lr": 0.0}, "lr"),
    ({"betas": (0.9, 1.5)}, "betas"), ({"grad_accum": 0}, "grad_accum"), ({"device": "tpu"}, "device"),
])
def test_config_rejects_bad_values(tmp_path, bad, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(out=tmp_path, **bad).validate()


def test_config_from_yaml_overrides(tmp_path):
    cfg = load_config(TrainConfig, overrides={"out": str(tmp_path), "betas": [0.9, 0.98], "resume": "true"})
    assert cfg.betas == (0.9, 0.98) and cfg.resume is True and cfg.out == tmp_path
    with pytest.raises(ConfigError, match="unknown"):
        load_config(TrainConfig, overrides={"out": str(tmp_path), "learning_rate": 1.0})
    with pytest.raises(ConfigError, match="out"):
        load_config(TrainConfig, overrides={"lr": 1e-3})


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        Trainer(make_model(), ToyDataset(), ToyCollate(), cfg_for(tmp_path, precision="fp16"))


# ---- schedule, optimizer groups, sampler --------------------------------------------------------


def test_schedule_values():
    assert linear_warmup_decay(0, 10, 100) == 0.0
    assert linear_warmup_decay(5, 10, 100) == 0.5
    assert linear_warmup_decay(10, 10, 100) == 1.0
    assert linear_warmup_decay(55, 10, 100) == 0.5
    assert linear_warmup_decay(100, 10, 100) == 0.0
    assert linear_warmup_decay(120, 10, 100) == 0.0
    assert linear_warmup_decay(0, 0, 4) == 1.0


def test_trainer_logs_scheduled_lr(tmp_path):
    train(tmp_path, max_steps=10, warmup_ratio=0.2, lr=1e-2)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl").rows]
    expected = [1e-2 * linear_warmup_decay(s, 2, 10) for s in range(10)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[:3] == pytest.approx([0.0, 5e-3, 1e-2])


def test_param_groups_skip_bias_and_layernorm():
    model = make_model()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"net.0.weight", "net.4.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sampler_shards_pads_and_is_deterministic():
    samplers = [ResumableDistributedSampler(10, 2, rank=r, world=3, seed=5) for r in range(3)]
    per_rank = [s.rank_indices(0) for s in samplers]
    assert all(len(ix) == 4 for ix in per_rank)  # ceil(10 / 3), padded with 2 repeats
    flat = sum(per_rank, [])
    assert sorted(set(flat)) == list(range(10)) and len(flat) == 12
    assert per_rank == [s.rank_indices(0) for s in samplers]  # same seed + epoch -> same order
    assert samplers[0].rank_indices(0) != samplers[0].rank_indices(1)  # epochs reshuffle
    assert [len(s) for s in samplers] == [2, 2, 2]
    assert ResumableDistributedSampler(10, 3, world=3, drop_last=True).batches(0) == \
        [ResumableDistributedSampler(10, 3, world=3).rank_indices(0)[:3]]


def test_sampler_resumes_mid_epoch_and_checks_state():
    s = ResumableDistributedSampler(20, 3, rank=1, world=2, seed=1)
    full = list(s)
    assert [k.position for k in full] == list(range(len(s))) and full[-1].indices == tuple(s.batches(0)[-1])
    s.set_state(0, 2)
    assert list(s) == full[2:]
    s.set_state(3, 1)
    state = s.state_dict()
    other = ResumableDistributedSampler(20, 3, rank=1, world=2, seed=1)
    other.load_state_dict(state)
    assert list(other) == list(s) and list(other)[0].epoch == 3
    with pytest.raises(ConfigError, match="batch_size"):
        ResumableDistributedSampler(20, 4, rank=1, world=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="consumed_batches"):
        s.set_state(0, 99)
    with pytest.raises(ValueError, match="empty"):
        ResumableDistributedSampler(3, 4, world=2, drop_last=True)
    assert batch_seed(1, 0, 0, 0) != batch_seed(1, 0, 0, 1)


# ---- training behaviour -------------------------------------------------------------------------


def test_loss_falls_and_outputs(tmp_path):
    trainer, summary = train(tmp_path, max_steps=40, log_every=5, lr=2e-2, plot=True, tensorboard=True,
                             dataset=ToyDataset(n=64))
    rows = read_metrics(tmp_path / "metrics.jsonl").rows
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]
    for key in ("lr", "loss", "samples_per_s", "peak_mem_mb", "grad_norm", "mse_loss", "mean_abs_pred", "epoch"):
        assert key in rows[0], key
    assert rows[0]["mse_loss"] == pytest.approx(rows[0]["loss"])
    assert summary["steps"] == 40 and summary["final_loss"] == rows[-1]["loss"]
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # 64 samples / 8 per batch = 8 batches an epoch: 40 steps span epochs 0..4
    assert rows[-1]["epoch"] == 5  # data position after step 40 = start of epoch 5


def test_epochs_define_steps(tmp_path):
    trainer = Trainer(make_model(), ToyDataset(n=20), ToyCollate(),
                      cfg_for(tmp_path, max_steps=0, epochs=2, batch_size=4, grad_accum=2))
    summary = trainer.train()
    assert trainer.total_steps == 5 and summary["steps"] == 5  # 2 epochs x 5 batches / 2 micro-steps
    idx = sum(trainer.model.seen_indices, [])
    assert sorted(idx) == sorted(list(range(20)) * 2)


def test_grad_accumulation_matches_full_batch(tmp_path):
    full, _ = train(tmp_path / "full", max_steps=5, batch_size=8, grad_accum=1)
    accum, _ = train(tmp_path / "accum", max_steps=5, batch_size=4, grad_accum=2)
    assert torch.allclose(flat_params(full.model), flat_params(accum.model), atol=1e-6, rtol=0)
    a = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl").rows]
    b = [r["loss"] for r in read_metrics(tmp_path / "accum" / "metrics.jsonl").rows]
    assert a == pytest.approx(b, abs=1e-6)
    assert not torch.equal(flat_params(full.model), flat_params(make_model()))


@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_gradient_clipping(tmp_path, max_norm):
    trainer, _ = train(tmp_path, max_steps=1, warmup_ratio=0.0, max_grad_norm=max_norm)
    # After one AdamW step the first moment is (1 - beta1) * (clipped) gradient.
    exp_avg = torch.cat([st["exp_avg"].reshape(-1) for st in trainer.optimizer.state.values()])
    grad_norm = read_metrics(tmp_path / "metrics.jsonl").rows[0]["grad_norm"]  # logged before clipping
    used = max_norm if max_norm > 0 else grad_norm
    assert grad_norm > 1e-2
    assert float(exp_avg.norm()) == pytest.approx((1 - trainer.cfg.betas[0]) * used, rel=1e-4)


def test_checkpoint_contents_and_pruning(tmp_path):
    trainer, summary = train(tmp_path, max_steps=7, save_every=2, keep_checkpoints=2)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step-0000006", "step-0000007"]  # every 2 + final, newest 2 kept
    last = latest_checkpoint(tmp_path)
    assert summary["checkpoint"] == str(last)
    assert sorted(p.name for p in last.iterdir()) == ["meta.json", "model.pt", "rank-00000.pt", "trainer.pt"]
    state = torch.load(last / "trainer.pt", weights_only=False)
    assert state["step"] == 7 and state["scheduler"]["last_epoch"] == 7
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["consumed_batches"] == 7
    assert set(state) >= {"optimizer", "scheduler", "scaler", "sampler", "config", "world"}
    rank = torch.load(last / "rank-00000.pt", weights_only=False)
    assert set(rank["rng"]) >= {"python", "numpy", "torch"} and "window" in rank
    fresh = make_model(seed=9)
    load_model_weights(last, fresh)
    assert torch.equal(flat_params(fresh), flat_params(trainer.model))
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary leftovers
    with pytest.raises(ConfigError, match="pass --resume"):
        train(tmp_path, max_steps=7)


def test_resume_matches_uninterrupted_run(tmp_path):
    """Crash at step 9 (after checkpoint 6, log rows up to 8), resume with a worker process."""
    kw = dict(max_steps=10, batch_size=4, log_every=2, save_every=3, lr=1e-2)
    data = ToyDataset(n=24)
    ref, _ = train(tmp_path / "ref", model=make_model(dropout=0.2), dataset=data, collate=ToyCollate(0.1), **kw)

    crashing = make_model(dropout=0.2)
    crashing.fail_at_call = 9
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "run", model=crashing, dataset=data, collate=ToyCollate(0.1), **kw)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl").rows] == [2, 4, 6, 8]
    assert latest_checkpoint(tmp_path / "run").name == "step-0000006"

    resumed_model = make_model(seed=123, dropout=0.2)  # different init: weights must come from the checkpoint
    resumed, summary = train(tmp_path / "run", model=resumed_model, dataset=data, collate=ToyCollate(0.1),
                             resume=True, num_workers=1, **kw)
    assert summary["resumed_from"].endswith("step-0000006")
    ref_rows = read_metrics(tmp_path / "ref" / "metrics.jsonl").rows
    got_rows = read_metrics(tmp_path / "run" / "metrics.jsonl").rows
    assert [r["step"] for r in got_rows] == [2, 4, 6, 8, 10]  # the step-8 row of the crashed run was dropped
    for a, b in zip(ref_rows, got_rows):
        for key in ("loss", "lr", "mse_loss", "mean_abs_pred", "grad_norm", "epoch"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), (a["step"], key)
    assert torch.allclose(flat_params(ref.model), flat_params(resumed.model), atol=1e-7, rtol=0)
    assert resumed.model.seen_indices == ref.model.seen_indices[6:]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    _, summary = train(tmp_path, max_steps=3, resume=True)
    assert summary["resumed_from"] is None and summary["steps"] == 3


class _BadModel(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.kind = kind

    def forward(self, batch):
        if self.kind == "tensor":
            return self.w.sum()
        if self.kind == "nan":
            return StepOutput(loss=self.w.sum() * float("nan"))
        return StepOutput(loss=self.w.sum(), logs={"vec": torch.ones(3)})


@pytest.mark.parametrize("kind, err, msg", [
    ("tensor", TypeError, "StepOutput"), ("nan", FloatingPointError, "non-finite"),
    ("vector_log", ValueError, "scalar"),
])
def test_bad_model_outputs_give_clear_errors(tmp_path, kind, err, msg):
    with pytest.raises(err, match=msg):
        train(tmp_path, model=_BadModel(kind), max_steps=2)


def test_empty_dataset_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train(tmp_path, dataset=ToyDataset(n=0))


def test_plot_skips_torn_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0, "mlm_loss": 1.0}) + "\n"
                    + json.dumps({"step": 2, "loss": 1.5, "mlm_loss": 0.7}) + "\n{\"step\": 3, \"lo")
    assert len(read_metrics(path).rows) == 2
    assert plot_training_curves(path, tmp_path / "fig" / "c.png").stat().st_size > 0
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metric rows"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_bf16_autocast_on_cpu(tmp_path):
    trainer, summary = train(tmp_path, max_steps=30, log_every=10, lr=2e-2, precision="bf16")
    rows = read_metrics(tmp_path / "metrics.jsonl").rows
    assert summary["precision"] == "bf16"
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast keeps fp32 masters


def test_resume_with_more_steps_and_changed_batch(tmp_path):
    train(tmp_path, max_steps=4, save_every=2)
    with pytest.raises(ConfigError, match="batch_size"):
        train(tmp_path, max_steps=8, batch_size=4, resume=True)
    trainer, summary = train(tmp_path, max_steps=8, resume=True)
    assert summary["resumed_from"].endswith("step-0000004") and summary["steps"] == 8
    rows = read_metrics(tmp_path / "metrics.jsonl").rows
    assert [r["step"] for r in rows] == list(range(1, 9))
    # steps 5..8 follow the new 8-step schedule (warm-up 0 steps at ratio 0.1, then decay to 0 at 8)
    assert [r["lr"] for r in rows[4:]] == pytest.approx([1e-2 * (8 - s) / 8 for s in range(4, 8)])


def test_move_to_device_keeps_structure():
    from dataclasses import dataclass as dc

    from muvla.training.trainer import move_to_device

    @dc(frozen=True)
    class Batch:
        x: torch.Tensor
        extra: dict
        name: str

    b = Batch(torch.ones(2), {"y": [torch.zeros(1), (torch.ones(1), 3)]}, "n")
    moved = move_to_device(b, torch.device("cpu"))
    assert isinstance(moved, Batch) and moved.name == "n" and torch.equal(moved.x, b.x)
    assert isinstance(moved.extra["y"][1], tuple) and moved.extra["y"][1][1] == 3
