"""Training-curve figure for the HTML report (drawn from metrics.jsonl, so it also works after a run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

from muvla.utils.shards import atomic_file

matplotlib.use("Agg")  # headless: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """Parsed metric rows; a torn last line (killed writer) is skipped rather than fatal."""
    rows = []
    for line in Path(metrics_jsonl).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def loss_keys(rows: list[dict]) -> list[str]:
    """Every logged value whose name says it is a loss ('loss' first), in first-seen order."""
    keys: list[str] = []
    for row in rows:
        for k in row:
            if "loss" in k and k not in keys:
                keys.append(k)
    if "loss" in keys:
        keys.remove("loss")
        keys.insert(0, "loss")
    return keys


def plot_training_curves(metrics_jsonl: str | Path, png_path: str | Path) -> Path:
    """One panel per logged loss (total loss, then each objective) against the optimizer step."""
    rows = read_metrics(metrics_jsonl)
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no metric rows to plot")
    keys = loss_keys(rows) or ["lr"]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return png_path
