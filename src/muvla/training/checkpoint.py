"""Checkpoint folders: ``<out>/checkpoints/step-XXXXXXX/`` written atomically, found, pruned and read.

A checkpoint holds ``model.pt`` (unwrapped weights), ``trainer.pt`` (optimizer, scheduler, scaler,
sampler position, config), ``rank-XXXXX.pt`` per rank (RNG states and the partly filled log window)
and ``meta.json``. Only folders with every file count, so a killed writer's half folder is skipped.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from muvla.utils.shards import atomic_dir

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
CHECKPOINT_FILES = ("model.pt", "trainer.pt", "meta.json")


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``<out>/checkpoints`` (renamed, all files present), oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


def load_model_weights(checkpoint: str | Path, model: nn.Module, strict: bool = True) -> Any:
    """Load a checkpoint's model weights (e.g. pre-trained weights before fine-tuning)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return model.load_state_dict(state, strict=strict)


def get_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(out: Path, step: int, model: nn.Module, trainer_state: dict[str, Any],
                     rank_states: list[dict[str, Any]], meta: dict[str, Any], keep: int) -> Path:
    """Write ``step-XXXXXXX/`` atomically (replacing a damaged folder of that step) and keep the
    newest ``keep`` checkpoints (0 keeps all)."""
    final = checkpoint_dir(out, step)
    if final.exists():  # a damaged folder of this step that resume skipped: replace it
        shutil.rmtree(final)
    with atomic_dir(final) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")  # unwrapped: no "module." prefix
        torch.save(trainer_state, tmp / "trainer.pt")
        for r, s in enumerate(rank_states):
            torch.save(s, tmp / f"rank-{r:05d}.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final
