"""Paper-style results table with a Meta-Ave column (``muvla table``).

Results files are JSON, in one of these shapes (metrics are fractions in [0, 1]):

    {"model": "muvla", "task": "vqa", "metrics": {"accuracy": 0.702, ...}}
    {"model": "muvla", "tasks": {"vqa": {"accuracy": 0.702}, "nlvr2": {"accuracy": 0.71, ...}}}
    [ <either of the above>, ... ]

A task name is ``<task>`` or ``<task>/<split>`` (e.g. ``refcoco+/testA``); ``<task>`` is a name or
alias of ``muvla.tasks.registry.TASKS``, whose spec picks the metric shown (``TaskSpec.headline``:
vqa, nlvr2, snli_ve -> accuracy, refcoco+ -> acc_all over ALL expressions, retrieval ->
mean_recall = mean of R@1/5/10 both directions) and the column title. A folder given as a path is
searched recursively for ``results*.json``.

Rows are models (known baselines first: base, round_robin, joint_unaligned, muvla, aligned, then
others in the order met); columns are the tasks present in any row plus Meta-Ave = the mean of
the row's headline metrics. A row missing some column gets its Meta-Ave over the tasks it has,
marked with a dagger in Markdown and by ``n_tasks`` in the CSV. Outputs: Markdown (percent, one
decimal), CSV (percent, two decimals) and a grouped bar chart PNG.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from muvla.tasks.metrics import meta_ave
from muvla.tasks.registry import TASKS, get_task
from muvla.utils.config import ConfigError
from muvla.utils.shards import atomic_file

MODEL_ORDER = ("base", "round_robin", "joint_unaligned", "muvla", "aligned")


@dataclass
class ResultRow:
    """One model's headline metric per task column (fractions) and where each came from."""

    model: str
    scores: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def meta_ave(self) -> float:
        return meta_ave(self.scores)


def canonical_task(task: str) -> str:
    """'SNLI-VE/test' -> 'snli_ve/test'; raises ValueError for an unknown task."""
    base, _, split = task.strip().partition("/")
    try:
        name = get_task(base).name
    except ConfigError as err:
        raise ValueError(f"{err} (optionally '<task>/<split>')") from None
    return f"{name}/{split}" if split else name


def _entries(obj: object, where: str) -> list[tuple[str, str, dict]]:
    """(model, task, metrics) triples of one parsed results file."""
    if isinstance(obj, list):
        out = []
        for i, item in enumerate(obj):
            out += _entries(item, f"{where}[{i}]")
        return out
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), str):
        raise ValueError(f"{where}: a result needs a string 'model' and 'task'+'metrics' or 'tasks'")
    if "tasks" in obj:
        if not isinstance(obj["tasks"], dict):
            raise ValueError(f"{where}: 'tasks' must map task name -> metrics")
        return [(obj["model"], t, m) for t, m in obj["tasks"].items()]
    if "task" in obj and "metrics" in obj:
        return [(obj["model"], obj["task"], obj["metrics"])]
    raise ValueError(f"{where}: a result needs 'task' and 'metrics', or 'tasks'")


def _result_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("results*.json"))
            if not found:
                raise FileNotFoundError(f"no results*.json under {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"results file not found: {p}")
    return files


def collect_results(paths: Sequence[str | Path]) -> list[ResultRow]:
    """Read results files (or folders of them) into one row per model."""
    rows: dict[str, ResultRow] = {}
    for path in _result_files(paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        for model, task, metrics in _entries(data, str(path)):
            try:
                col = canonical_task(str(task))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            key = get_task(col.split("/")[0]).headline
            if not isinstance(metrics, dict) or key not in metrics:
                raise ValueError(f"{path}: {model}/{task} has no '{key}' metric (the headline of {col.split('/')[0]})")
            value = metrics[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0 \
                    or math.isnan(value):
                raise ValueError(f"{path}: {model}/{task} {key} = {value!r}; metrics must be fractions in [0, 1]")
            row = rows.setdefault(model, ResultRow(model))
            if col in row.scores and row.scores[col] != float(value):
                raise ValueError(f"{model}/{col} given twice with different values: {row.sources[col]} and {path}")
            row.scores[col] = float(value)
            row.sources[col] = str(path)
    if not rows:
        raise ValueError("no results found")
    known = [rows[m] for m in MODEL_ORDER if m in rows]
    return known + [r for m, r in rows.items() if m not in MODEL_ORDER]


def table_columns(rows: Sequence[ResultRow]) -> list[str]:
    """Task columns present in any row, in TASKS order then split name."""
    cols = {c for r in rows for c in r.scores}
    order = list(TASKS)
    return sorted(cols, key=lambda c: (order.index(c.split("/")[0]), c))


def _display(col: str) -> str:
    base, _, split = col.partition("/")
    return f"{get_task(base).display} {split}".strip()


def render_table(rows: Sequence[ResultRow]) -> tuple[str, str]:
    """(Markdown, CSV text) of the table; values are percentages."""
    cols = table_columns(rows)
    header = ["model"] + [_display(c) for c in cols] + ["Meta-Ave"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    partial = False
    for r in rows:
        cells = [r.model] + [f"{100 * r.scores[c]:.1f}" if c in r.scores else "-" for c in cols]
        mark = ""
        if len(r.scores) < len(cols):
            partial, mark = True, " †"
        cells.append(f"{100 * r.meta_ave:.1f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    if partial:
        lines += ["", "† Meta-Ave over the tasks this model reports only."]
    markdown = "\n".join(lines) + "\n"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model"] + cols + ["meta_ave", "n_tasks"])
    for r in rows:
        writer.writerow([r.model] + [f"{100 * r.scores[c]:.2f}" if c in r.scores else "" for c in cols]
                        + [f"{100 * r.meta_ave:.2f}", len(r.scores)])
    return markdown, buf.getvalue()


def plot_table(rows: Sequence[ResultRow], png_path: str | Path) -> Path:
    """Grouped bar chart (tasks + Meta-Ave on x, one bar per model). Uses the Agg canvas directly,
    so no global matplotlib backend is switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = table_columns(rows)
    labels = [_display(c) for c in cols] + ["Meta-Ave"]
    fig = Figure(figsize=(max(6.0, 1.3 * len(labels) + 1), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [100 * r.scores.get(c, math.nan) for c in cols] + [100 * r.meta_ave]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=r.model)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 100
    png_path = Path(png_path)
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return png_path


def run_table(paths: Sequence[str | Path], out_dir: str | Path, name: str = "table") -> dict:
    """Write <out>/<name>.md, .csv, .png; return a summary (files, models, columns, meta_ave)."""
    rows = collect_results(paths)
    markdown, csv_text = render_table(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / f"{name}.md", "csv": out / f"{name}.csv", "png": out / f"{name}.png"}
    for key, text in (("markdown", markdown), ("csv", csv_text)):
        with atomic_file(files[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    plot_table(rows, files["png"])
    return {"files": {k: str(v) for k, v in files.items()}, "models": [r.model for r in rows],
            "columns": table_columns(rows), "meta_ave": {r.model: r.meta_ave for r in rows}, "markdown": markdown}


def table_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``muvla table RESULTS... [--out DIR] [--name NAME]``."""
    parser = argparse.ArgumentParser(prog="muvla table", description="Collect results files into the Meta-Ave table.")
    parser.add_argument("paths", nargs="+", help="results JSON files or folders (searched for results*.json)")
    parser.add_argument("--out", default=".", help="output folder for <name>.md/.csv/.png")
    parser.add_argument("--name", default="table", help="output file stem")
    args = parser.parse_args(argv)
    try:
        summary = run_table(args.paths, args.out, args.name)
    except (ValueError, FileNotFoundError) as e:
        print(f"muvla table: error: {e}")
        return 2
    print(summary["markdown"], end="")
    print(f"wrote {', '.join(summary['files'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(table_main())
