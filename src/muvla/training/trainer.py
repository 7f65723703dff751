"""Generic, resumable trainer shared by pre-training and fine-tuning.

The trainer knows nothing about the model: ``model(batch)`` must return a :class:`StepOutput`
(a scalar ``loss`` and a dict of named values to log). It adds AdamW with linear warm-up/decay,
gradient accumulation and clipping, mixed precision, DDP under torchrun, atomic checkpoints and
exact resumption.

Exact resumption: the data order and the per-batch randomness are pure functions of (seed, epoch,
rank, batch position) (``muvla.training.sampler``); everything else (model RNG such as dropout,
optimizer, scheduler, grad scaler, the partly filled logging window) is saved per rank in the
checkpoint (``muvla.training.checkpoint``) and restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from muvla.training.checkpoint import (
    checkpoint_dir,
    get_rng_state,
    latest_checkpoint,
    load_model_weights,
    set_rng_state,
    write_checkpoint,
)
from muvla.training.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
)
from muvla.training.optim import linear_warmup_decay, param_groups
from muvla.training.sampler import BatchKey, KeyedBatches, ResumableDistributedSampler, passthrough
from muvla.utils.config import ConfigError, check_choices, setting, to_dict
from muvla.utils.device import DEVICES, PRECISION_HELP, PRECISIONS, resolve_precision
from muvla.utils.progress import progress
from muvla.utils.shards import atomic_file, clean_stale_tmp

# --------------------------------------------------------------------------------------------------
# config and step protocol


# Settings an explicit ``resume`` may change while continuing a run's checkpoints (a longer schedule);
# any other changed setting makes a rerun refuse or, with ``overwrite``, start again.
SCHEDULE_SETTINGS = frozenset({"max_steps", "epochs", "lr"})


@dataclass(kw_only=True)
class TrainerSettings:
    """Optimisation and bookkeeping settings (defaults follow the paper's reference configs).

    Pre-training and fine-tuning configs inherit these fields, so every setting is one CLI flag there
    too; ``train_config(out)`` turns them into the :class:`TrainConfig` the trainer takes.
    """

    max_steps: int = setting(0, help="optimizer steps; > 0 wins over epochs")
    epochs: int = setting(1, help="passes over the data (used when max_steps is 0)")
    batch_size: int = setting(32, help="samples per rank and per micro-step")
    grad_accum: int = setting(1, help="micro-steps per optimizer step")
    lr: float = setting(5e-5, help="peak learning rate of AdamW")
    weight_decay: float = setting(0.01, help="AdamW weight decay (not applied to biases and normalisation weights)")
    betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW betas")
    eps: float = setting(1e-6, help="AdamW epsilon")
    warmup_ratio: float = setting(0.1, help="fraction of the steps with a linear learning-rate warm-up")
    max_grad_norm: float = setting(5.0, help="gradient clipping norm; <= 0 disables clipping (the norm is still logged)")
    precision: str = setting("auto", choices=PRECISIONS, help=PRECISION_HELP)
    device: str = setting("auto", choices=DEVICES, help="auto: this rank's GPU when CUDA is available, else CPU",
                          runtime=True)
    seed: int = setting(42, help="seed of the data order, masking and initialisation")
    log_every: int = setting(10, help="optimizer steps per metrics.jsonl row", runtime=True)
    save_every: int = setting(1000, help="optimizer steps per checkpoint", runtime=True)
    keep_checkpoints: int = setting(3, help="newest checkpoints kept; 0 keeps all", runtime=True)
    num_workers: int = setting(0, help="DataLoader worker processes", runtime=True)
    drop_last: bool = setting(False, help="drop each rank's last partial batch of an epoch")
    find_unused_parameters: bool = setting(False, help="DDP: needed when a step leaves some heads unused",
                                           runtime=True)
    tensorboard: bool = setting(True, help="also log to <out>/tensorboard", runtime=True)
    resume: bool = setting(False, help="continue from the newest complete checkpoint in --out", runtime=True)
    plot: bool = setting(True, help="write <out>/training_curves.png at the end", runtime=True)

    def train_config(self, out: str | Path, **overrides: Any) -> TrainConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainerSettings)}
        return TrainConfig(out=Path(out), **{**values, **overrides})


@dataclass
class TrainConfig(TrainerSettings):
    """What the trainer runs with: the settings plus the run folder."""

    out: Path = setting(help="run folder: metrics.jsonl, tensorboard/, checkpoints/, training_curves.png")

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0 = use epochs), got {self.max_steps}")
        if self.max_steps == 0 and self.epochs < 1:
            raise ConfigError(f"set max_steps > 0 or epochs >= 1 (got max_steps=0, epochs={self.epochs})")
        for name in ("batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0, got {self.eps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_choices(self)
        if self.keep_checkpoints < 0:
            raise ConfigError(f"keep_checkpoints must be >= 0 (0 = keep all), got {self.keep_checkpoints}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class StepOutput:
    """What a model's ``forward(batch)`` returns to the trainer.

    ``loss`` is the scalar to minimise (mean over the micro-batch); ``logs`` holds named scalars
    (floats or 0-d tensors) averaged over the logging window and over ranks, e.g. per-objective
    losses. A rank may omit a key in a step (e.g. an objective absent from its batch).
    """

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Recursively move tensors in dicts / lists / tuples / dataclasses to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to_device(v, device) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move_to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move_to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory in MiB, or on CPU the process's peak resident set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LogWindow:
    """Per-rank sums of what was seen since the last log line (saved in checkpoints for exact logs).

    Sums may be device tensors (float64) so that training steps never wait for the GPU; they are
    turned into Python numbers only when a line is logged or a checkpoint is written.
    """

    def __init__(self) -> None:
        self.loss: float | torch.Tensor = 0.0
        self.micro = 0
        self.steps = 0
        self.grad_norm: float | torch.Tensor = 0.0
        self.bad_grads: int | torch.Tensor = 0
        self.samples = 0
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        def num(v: Any) -> Any:
            return v.item() if isinstance(v, torch.Tensor) else v

        state = {k: num(v) for k, v in self.__dict__.items() if not isinstance(v, dict)}
        state["sums"] = {k: num(v) for k, v in self.sums.items()}
        state["counts"] = dict(self.counts)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()})

    def add(self, out: StepOutput, n_samples: int) -> None:
        """One micro-step's loss and named values."""
        self.loss = self.loss + out.loss.detach().double().reshape(())
        self.micro += 1
        self.samples += n_samples
        for k, v in (out.logs or {}).items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"StepOutput.logs[{k!r}] must be a scalar, got shape {tuple(v.shape)}")
                value: float | torch.Tensor = v.detach().double().reshape(())
            elif isinstance(v, (int, float)):
                value = float(v)
            else:
                raise TypeError(f"StepOutput.logs[{k!r}] must be a number or scalar tensor, got {type(v).__name__}")
            self.sums[k] = self.sums.get(k, 0.0) + value
            self.counts[k] = self.counts.get(k, 0) + 1

    def add_step(self, grad_norm: torch.Tensor) -> None:
        """One optimizer step's gradient norm (a non-finite norm is counted, not summed)."""
        self.steps += 1
        finite = torch.isfinite(grad_norm)
        self.grad_norm = self.grad_norm + torch.where(finite, grad_norm, 0.0)
        self.bad_grads = self.bad_grads + (~finite).long()


class Trainer:
    """Runs the optimisation loop for any model that returns :class:`StepOutput`.

    Use under torchrun for DDP (one process per GPU, or per CPU slot with gloo). Rank 0 writes
    ``<out>/metrics.jsonl``, ``<out>/tensorboard/``, ``<out>/checkpoints/step-XXXXXXX/`` and
    ``<out>/training_curves.png``.
    """

    def __init__(self, model: nn.Module, train_dataset: Dataset, collate_fn: Callable[[list[Any]], Any],
                 cfg: TrainConfig, dist_info: DistInfo | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        try:
            n = len(train_dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError("Trainer needs a map-style dataset with __len__ and __getitem__") from err
        if n == 0:
            raise ValueError("the training dataset is empty")
        self.dataset = train_dataset
        self.collate_fn = collate_fn
        self.sampler = ResumableDistributedSampler(n, cfg.batch_size, self.dist.rank, self.dist.world,
                                                   cfg.seed, cfg.drop_last)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, cfg.epochs * len(self.sampler) // cfg.grad_accum)
        self.warmup_steps = int(cfg.warmup_ratio * self.total_steps)

        # Runtime randomness (dropout): reproducible, different per rank. Weights were initialised by
        # the caller; DDP broadcasts rank 0's weights so all ranks start equal.
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed((cfg.seed + self.dist.rank) % 2**32)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=tuple(cfg.betas), eps=cfg.eps)
        # A partial (not a callable object) so that LambdaLR.load_state_dict does not bring back the
        # checkpoint's step counts: resuming with a new max_steps re-shapes the remaining schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            linear_warmup_decay, warmup_steps=self.warmup_steps, total_steps=self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        self.step = 0
        self.epoch = 0
        self.consumed_batches = 0
        self.window = LogWindow()
        self.resumed_from: Path | None = None
        self.ddp: DDP | None = None

    # ---- data ---------------------------------------------------------------------------------

    def _stream(self) -> Iterator[tuple[BatchKey, Any]]:
        """Endless (key, batch) stream starting at the saved data position, epoch after epoch."""
        keyed = KeyedBatches(self.dataset, self.collate_fn, self.cfg.seed)
        epoch, start = self.epoch, self.consumed_batches
        while True:
            self.sampler.set_state(epoch, start)
            loader = DataLoader(keyed, batch_size=None, sampler=self.sampler, collate_fn=passthrough,
                                num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
            yield from loader
            epoch, start = epoch + 1, 0

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``step-XXXXXXX/`` atomically from rank 0, with every rank's RNG and log window."""
        rank_state = {"rng": get_rng_state(), "window": self.window.state_dict()}
        states = all_gather_object(rank_state)  # collective: every rank must call save_checkpoint
        if not self.dist.is_main:
            return checkpoint_dir(self.out, self.step)
        self.sampler.set_state(self.epoch, self.consumed_batches)
        trainer_state = {
            "step": self.step, "epoch": self.epoch, "total_steps": self.total_steps,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
            "world": self.dist.world, "precision": self.precision, "config": to_dict(self.cfg),
        }
        meta = {"step": self.step, "epoch": self.epoch, "consumed_batches": self.consumed_batches,
                "world": self.dist.world, "total_steps": self.total_steps}
        return write_checkpoint(self.out, self.step, self.model, trainer_state, states, meta,
                                self.cfg.keep_checkpoints)

    def _apply_schedule(self) -> None:
        """Set every group's lr from this run's config and schedule at the restored step.

        For an exact resume this reproduces the saved values; when ``lr`` or ``max_steps`` changed it
        makes the remaining steps follow the new settings instead of the checkpoint's.
        """
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        for group, fn in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * fn(self.scheduler.last_epoch)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, scaler, data position and this rank's RNG state."""
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta["world"] != self.dist.world:
            raise ConfigError(f"{path} was written by {meta['world']} process(es); resume it with the "
                              f"same number (got {self.dist.world}) so that data order and RNG match")
        load_model_weights(path, self.model)
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_schedule()
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.epoch = int(state["sampler"]["epoch"])
        self.consumed_batches = int(state["sampler"]["consumed_batches"])
        rank_file = path / f"rank-{self.dist.rank:05d}.pt"
        if not rank_file.is_file():
            raise FileNotFoundError(f"{path} lacks {rank_file.name}; the checkpoint is incomplete")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(rank_state["rng"])
        self.window.load_state_dict(rank_state["window"])
        self.resumed_from = path

    # ---- logging ------------------------------------------------------------------------------

    def _prepare_metrics_file(self) -> None:
        """Fresh run: empty file. Resume: keep only rows up to the checkpoint step (no duplicates)."""
        path = self.out / "metrics.jsonl"
        kept: list[str] = []
        if self.step > 0 and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # torn last line of a killed writer
                    continue
                if isinstance(row, dict) and int(row.get("step", 0)) <= self.step:
                    kept.append(line)
        with atomic_file(path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def _gather_log(self, lr: float, elapsed: float) -> dict[str, Any]:
        """Average the window over micro-steps and ranks (collective: all ranks call it)."""
        w = self.window.state_dict()
        keys = sorted(set().union(*[set(k) for k in all_gather_object(sorted(w["sums"]))]))
        vec = torch.tensor([w["loss"], w["micro"], w["grad_norm"], w["steps"] - w["bad_grads"], w["bad_grads"],
                            w["samples"]] + [w["sums"].get(k, 0.0) for k in keys]
                           + [w["counts"].get(k, 0) for k in keys], dtype=torch.float64, device=self.device)
        vec = all_reduce_sum(vec).cpu().tolist()
        loss, micro, gnorm, good, bad, samples = vec[:6]
        row: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "lr": lr,
                               "loss": loss / max(micro, 1),
                               "grad_norm": gnorm / good if good else float("nan"),
                               "samples_per_s": samples / max(elapsed, 1e-9),
                               "peak_mem_mb": peak_memory_mb(self.device)}
        if bad:
            row["nonfinite_grad_steps"] = int(bad)
        sums, counts = vec[6:6 + len(keys)], vec[6 + len(keys):]
        for k, s, c in zip(keys, sums, counts):
            if c:
                row[k] = s / c
        if bad and self.precision != "fp16":
            raise FloatingPointError(
                f"non-finite gradient norm in {int(bad)} step(s) up to step {self.step} (loss {row['loss']}); "
                "check the inputs and lr, or use fp32")
        return row

    # ---- main loop ----------------------------------------------------------------------------

    def _check_output(self, out: Any) -> None:
        loss = getattr(out, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"model(batch) must return a StepOutput with a scalar loss tensor, got "
                            f"{type(out).__name__} with loss={type(loss).__name__}")

    def _start(self) -> None:
        """Resume from the newest checkpoint when asked (refuse to overwrite one otherwise); wrap in DDP."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_stale_tmp(self.out / "checkpoints")
        barrier()
        existing = latest_checkpoint(self.out) if self.dist.is_main else None
        existing = broadcast_object(str(existing) if existing else None)
        if existing and not self.cfg.resume:
            raise ConfigError(f"{self.out} already holds checkpoints (latest {existing}); pass --resume "
                              "to continue that run, or choose another --out")
        if existing:
            self.load_checkpoint(Path(existing))
        if self.dist.world > 1:
            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=self.cfg.find_unused_parameters)

    def _micro_steps(self, net: nn.Module, stream: Iterator[tuple[BatchKey, Any]]) -> None:
        """Forward and backward ``grad_accum`` micro-batches (DDP syncs gradients on the last one)."""
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        for micro in range(self.cfg.grad_accum):
            key, batch = next(stream)
            batch = move_to_device(batch, self.device)
            final_micro = micro == self.cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (self.ddp is None or final_micro) else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = net(batch)
                self._check_output(out)
                self.scaler.scale(out.loss.float() / self.cfg.grad_accum).backward()
            self.window.add(out, len(key.indices))
            self.epoch, self.consumed_batches = key.epoch, key.position + 1
            if self.consumed_batches == len(self.sampler):
                self.epoch, self.consumed_batches = key.epoch + 1, 0

    def _optimizer_step(self) -> float:
        """Clip, step, schedule; returns the learning rate the step used."""
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).detach().double()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.window.add_step(gnorm)
        return lr

    def train(self) -> dict[str, Any]:
        """Train to ``total_steps`` (continuing the latest checkpoint when ``cfg.resume``)."""
        self._start()
        net: nn.Module = self.ddp if self.ddp is not None else self.model
        net.train()
        writer, metrics_f = self._open_logs()
        stream = self._stream()
        last_row: dict[str, Any] = {}
        start_step = self.step
        t_window = t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = progress(range(start_step, self.total_steps), desc="train", total=self.total_steps - start_step,
                       unit="step", enabled=self.dist.is_main)
        try:
            for _ in bar:
                self._micro_steps(net, stream)
                lr = self._optimizer_step()
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    last_row = self._log(self._gather_log(lr, now - t_window), writer, metrics_f)
                    self.window = LogWindow()
                    t_window = now
                    bar.set_postfix(loss=f"{last_row['loss']:.4f}", sps=f"{last_row['samples_per_s']:.1f}")
                if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
        finally:
            stream.close()  # ends the DataLoader iterator now (its worker processes, if any), not at exit
            bar.close()
            if metrics_f is not None:
                metrics_f.close()
            if writer is not None:
                writer.close()
        barrier()
        return self._summary(last_row, time.perf_counter() - t_start)

    def _open_logs(self) -> tuple[Any, Any]:
        """(TensorBoard writer or None, metrics.jsonl handle or None): rank 0 only."""
        if not self.dist.is_main:
            return None, None
        self._prepare_metrics_file()
        writer = None
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
        return writer, (self.out / "metrics.jsonl").open("a", encoding="utf-8")

    def _log(self, row: dict[str, Any], writer: Any, metrics_f: Any) -> dict[str, Any]:
        if metrics_f is not None:
            metrics_f.write(json.dumps(row) + "\n")
            metrics_f.flush()
        if writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(f"train/{k}", v, self.step)
        return row

    def _summary(self, last_row: dict[str, Any], elapsed: float) -> dict[str, Any]:
        plot_path = None
        if self.dist.is_main and self.cfg.plot and (self.out / "metrics.jsonl").stat().st_size > 0:
            from muvla.training.plots import plot_training_curves

            plot_path = plot_training_curves(self.out / "metrics.jsonl", self.out / "training_curves.png")
        return {
            "steps": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "final_loss": last_row.get("loss"), "last_metrics": last_row,
            "checkpoint": str(latest_checkpoint(self.out)) if self.dist.is_main else None,
            "training_curves": str(plot_path) if plot_path else None,
            "precision": self.precision, "world": self.dist.world, "device": str(self.device),
            "wall_s": elapsed, "config": to_dict(self.cfg),
        }
