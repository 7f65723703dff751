"""Training curves from ``metrics.jsonl``: one figure for the run folder's PNG and the HTML report.

Every logged loss is drawn: the total loss, then each objective with its parts in one panel
(``loss_rt`` with ``loss_rt_mlm``, ``loss_rt_mrc``, ...), then the ITM accuracy, the curriculum
weight and the learning rate when they were logged.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from muvla.utils.shards import atomic_file

EXTRA_PANELS = ("itm_acc", "w_itm_mean", "lr")  # non-loss series worth a panel of their own


@dataclass
class MetricsLog:
    """Parsed metric rows, and how many lines were not (a torn last line of a killed writer, ...)."""

    rows: list[dict] = field(default_factory=list)
    bad_lines: int = 0


def read_metrics(metrics_jsonl: str | Path) -> MetricsLog:
    """Rows with a numeric ``step``; anything else is counted in ``bad_lines``, never fatal."""
    log = MetricsLog()
    for line in Path(metrics_jsonl).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.bad_lines += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            log.rows.append(row)
        else:
            log.bad_lines += 1
    return log


def _numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def curve_panels(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """(panel title, series keys) in display order: total loss, each objective with its parts,
    other losses, then ITM accuracy / curriculum weight / learning rate."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and _numeric(v)]
    losses = [k for k in keys if "loss" in k]
    panels: list[tuple[str, list[str]]] = []
    if "loss" in losses:
        panels.append(("loss", ["loss"]))
    grouped: set[str] = {"loss"}
    for head in (k for k in losses if k.count("_") == 1 and k != "loss"):  # loss_rt, loss_rn, loss_is, ...
        parts = [k for k in losses if k.startswith(head + "_")]
        panels.append((head, [head, *parts]))
        grouped.update([head, *parts])
    panels += [(k, [k]) for k in losses if k not in grouped]
    panels += [(k, [k]) for k in EXTRA_PANELS if k in keys]
    return panels


def training_curves_figure(rows: list[dict]) -> Figure:
    panels = curve_panels(rows) or [("step", ["step"])]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.0 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if _numeric(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.4 if key == title else 1.0,
                    label=key if len(keys) > 1 else None, marker="." if len(pts) < 30 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def training_curves_png(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    training_curves_figure(rows).savefig(buf, format="png")
    return buf.getvalue()


def plot_training_curves(metrics_jsonl: str | Path, png_path: str | Path) -> Path:
    """Write the training-curves PNG of a run (all logged losses, see the module docstring)."""
    log = read_metrics(metrics_jsonl)
    if not log.rows:
        raise ValueError(f"{metrics_jsonl}: no metric rows to plot")
    png_path = Path(png_path)
    with atomic_file(png_path) as tmp:
        tmp.write_bytes(training_curves_png(log.rows))
    return png_path
