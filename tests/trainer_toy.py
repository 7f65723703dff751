"""Tiny model and data for trainer tests (also imported by the torchrun scripts the tests write)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from muvla.training.trainer import StepOutput


class ToyDataset(Dataset):
    """Noise-free synthetic regression: y = x.w + 0.5 sin(x0); items carry their index."""

    def __init__(self, n: int = 64, dim: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, generator=g)
        self.y = self.x @ w + 0.5 * torch.sin(self.x[:, 0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"idx": i, "x": self.x[i], "y": self.y[i]}


class ToyCollate:
    """Stacks items; optional input noise drawn from the global torch RNG (tests per-batch seeding)."""

    def __init__(self, noise: float = 0.0) -> None:
        self.noise = noise

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.stack([it["x"] for it in items])
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return {"idx": torch.tensor([it["idx"] for it in items]), "x": x,
                "y": torch.stack([it["y"] for it in items])}


class ToyRegressor(nn.Module):
    """MLP regressor returning StepOutput; records what it saw so tests can inspect the data flow."""

    def __init__(self, dim: int = 8, hidden: int = 16, dropout: float = 0.0, unused_head: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))
        # a head the loss never touches, like a multi-task head idle in a step (DDP must be told)
        self.unused = nn.Linear(hidden, 3) if unused_head else None
        self.seen_indices: list[list[int]] = []
        self.calls = 0
        self.fail_at_call: int | None = None  # simulate a crash inside the forward pass

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise RuntimeError("simulated crash")
        pause = float(os.environ.get("MUVLA_TOY_STEP_SLEEP", "0"))
        if pause > 0:  # lets the kill-and-resume test stop a run reliably in its middle
            time.sleep(pause)
        self.seen_indices.append(batch["idx"].tolist())
        pred = self.net(batch["x"]).squeeze(-1)
        mse = F.mse_loss(pred, batch["y"])
        return StepOutput(loss=mse, logs={"mse_loss": mse, "mean_abs_pred": float(pred.detach().abs().mean())})


def make_model(seed: int = 0, dropout: float = 0.0, unused_head: bool = False) -> ToyRegressor:
    torch.manual_seed(seed)
    return ToyRegressor(dropout=dropout, unused_head=unused_head)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
