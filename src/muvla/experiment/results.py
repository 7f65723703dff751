"""An experiment's results: ``results.csv`` (a row per model and seed), ``results.md`` (mean and spread
over seeds, the corpus's own quality, and what the numbers do and do not show) and the plots."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from muvla.experiment.config import ExperimentConfig
from muvla.experiment.recipes import RECIPES
from muvla.training.plots import read_metrics
from muvla.utils.shards import atomic_file

METRICS = ("mean_recall", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
PAPER_ORDER = ("base", "round_robin", "joint_unaligned", "muvla", "aligned")


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def per_model(runs: list[dict[str, Any]], part: str, metric: str) -> dict[str, list[float]]:
    """model -> the metric of each seed (models in run order)."""
    out: dict[str, list[float]] = {}
    for run in runs:
        value = (run.get(part) or {}).get(metric)
        if isinstance(value, (int, float)):
            out.setdefault(run["model"], []).append(float(value))
    return out


def csv_text(runs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["model", "seed", "pretrain_steps", "pretrain_seconds", "final_loss"] + \
        [f"zero_shot_{m}" for m in METRICS] + [f"probe_{m}" for m in METRICS]
    writer.writerow(header)
    for run in runs:
        train = (run.get("pretrain") or {}).get("train") or {}
        zs, probe = run.get("zero_shot") or {}, run.get("probe") or {}
        writer.writerow([run["model"], run["seed"], train.get("steps", 0), run.get("pretrain_seconds"),
                         train.get("final_loss")] + [zs.get(m) for m in METRICS] + [probe.get(m) for m in METRICS])
    return buf.getvalue()


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _ranks(table: dict[str, dict[str, list[float]]], model: str) -> str:
    cells = [table[f"i2t_r{k}"].get(model) for k in (1, 5, 10)]
    return " / ".join(f"{100 * _mean_std(c)[0]:.1f}" if c else "-" for c in cells)


def results_table(runs: list[dict[str, Any]], models: list[str]) -> str:
    """Markdown: per model, zero-shot and probe mean recall and R@1/5/10 (percent, mean ± std over seeds)."""
    parts = {part: {m: per_model(runs, part, m) for m in METRICS} for part in ("zero_shot", "probe")}
    header = ("| model | what | zero-shot mR | zero-shot R@1 / R@5 / R@10 (image→text) | probe mR | "
              "probe R@1 / R@5 / R@10 (image→text) |")
    lines = [header, "|---|---|---:|---:|---:|---:|"]
    zs, pr = parts["zero_shot"], parts["probe"]
    for model in models:
        lines.append(f"| {model} | {RECIPES[model].label} | {_cell(zs['mean_recall'].get(model))} | "
                     f"{_ranks(zs, model)} | {_cell(pr['mean_recall'].get(model))} | {_ranks(pr, model)} |")
    return "\n".join(lines) + "\n"


def findings(runs: list[dict[str, Any]], models: list[str]) -> list[str]:
    """Plain sentences: does muvla beat joint_unaligned by more than the seed spread, and does the
    paper's ordering hold? (Stated whatever the answer.)"""
    out = []
    for part, name in (("zero_shot", "zero-shot retrieval"), ("probe", "the retrieval probe")):
        scores = per_model(runs, part, "mean_recall")
        if "muvla" in scores and "joint_unaligned" in scores:
            (m, ms), (j, js) = _mean_std(scores["muvla"]), _mean_std(scores["joint_unaligned"])
            spread = max(ms, js)
            gap = m - j
            verdict = "more than" if gap > spread and gap > 0 else "not more than"
            out.append(f"On {name}, muvla - joint_unaligned = {100 * gap:+.1f} points of mean recall, "
                       f"{verdict} the seed spread ({100 * spread:.1f}; {len(scores['muvla'])} seeds).")
        ordered = [m for m in PAPER_ORDER if m in scores]
        if len(ordered) >= 3:
            means = {m: _mean_std(scores[m])[0] for m in ordered}
            ranking = sorted(ordered, key=lambda m: -means[m])
            holds = all(means[a] <= means[b] + 1e-12 for a, b in zip(ordered, ordered[1:]))
            out.append(f"On {name}, the models rank {' > '.join(ranking)}; the paper's ordering "
                       f"({' <= '.join(ordered)}) {'holds' if holds else 'does not hold'} here.")
    return out


def write_plots(runs: list[dict[str, Any]], models: list[str], plots: Path, model_dir: Any) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for part, title in (("zero_shot", "zero-shot retrieval, held-out images"), ("probe", "retrieval probe")):
        scores = per_model(runs, part, "mean_recall")
        if not scores:
            continue
        fig = Figure(figsize=(1.4 * len(models) + 2, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for i, model in enumerate(models):
            vals = [100 * v for v in scores.get(model, [])]
            if not vals:
                continue
            mean, std = _mean_std(vals)
            ax.bar(i, mean, yerr=std, capsize=4, color="#4363d8" if model == "muvla" else "#9aa1ad")
            ax.scatter([i] * len(vals), vals, color="black", s=10, zorder=3)
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
        ax.set_ylabel("mean recall (%)")
        ax.set_title(f"{title}: mean ± std over seeds (dots)", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, plots / f"{part}.png"))
    ratio = [(0.0, "joint_unaligned"), *((RECIPES[m].p, m) for m in models if RECIPES[m].p is not None),
             (1.0, "aligned")]
    ratio = [(p, m) for p, m in ratio if m in models]
    if len(ratio) >= 2:
        fig = Figure(figsize=(4.5, 3.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for part in ("zero_shot", "probe"):
            scores = per_model(runs, part, "mean_recall")
            pts = [(p, _mean_std(scores[m])) for p, m in sorted(ratio) if m in scores]
            if pts:
                ax.errorbar([p for p, _ in pts], [100 * s[0] for _, s in pts], yerr=[100 * s[1] for _, s in pts],
                            marker="o", capsize=3, label=part.replace("_", "-"))
        ax.set_xlabel("fraction of images paired with their own captions (p)")
        ax.set_ylabel("mean recall (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, plots / "aligned_ratio.png"))
    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for model in models:
        metrics = model_dir(model) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows = read_metrics(metrics).rows
        for ax, key in zip(axes, ("loss", "itm_acc")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=model, lw=1.2)
    for ax, key in zip(axes, ("total loss", "ITM accuracy (I-S batches)")):
        ax.set_title(f"{key}, first seed", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, plots / "training_curves.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def write_results(cfg: ExperimentConfig, root: Path, runs: list[dict[str, Any]], quality: dict[str, Any],
                  split: dict[str, list[str]]) -> dict[str, Any]:
    table = results_table(runs, cfg.models)
    found = findings(runs, cfg.models)
    pretrain = cfg.pretrain_config("base", root / "x", None, 0)
    lines = [f"# muvla experiment: {root.name}", "",
             f"Images: {cfg.images} ({len(split['train'])} for pre-training; held out: "
             f"{len(split['probe_train'])} to train the retrieval probe, {len(split['probe_test'])} to test, "
             f"{cfg.evaluation.captions_per_image} caption(s) each). Text setting `{cfg.text_setting}` "
             f"({', '.join(str(p) for p in cfg.pool) or 'no pool'}). Regions: `{cfg.regions.backend}`.", "",
             f"Every model: init `{pretrain.init}`, {pretrain.max_steps or pretrain.epochs} "
             f"{'steps' if pretrain.max_steps else 'epochs'}, batch {pretrain.batch_size}, lr {pretrain.lr}, "
             f"seeds {cfg.seeds}. Probe: {cfg.evaluation.probe_steps} steps of retrieval fine-tuning, batch "
             f"{cfg.evaluation.probe_batch_size}.", "",
             "Mean recall = mean of R@1/5/10 in both directions, in percent, mean ± std over seeds.", "",
             table, "", "Weak corpus quality (the retrieved pairs of the training images): "
             + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items()), ""]
    lines += [f"- {sentence}" for sentence in found]
    md = "\n".join(lines) + "\n"
    with atomic_file(root / "results.md") as tmp:
        tmp.write_text(md, encoding="utf-8")
    with atomic_file(root / "results.csv") as tmp:
        tmp.write_text(csv_text(runs), encoding="utf-8")
    first_seed = cfg.seeds[0]
    plots = write_plots(runs, cfg.models, root / "plots", lambda m: root / "models" / m / f"seed-{first_seed}")
    return {"table": table, "findings": found, "quality": quality, "results_md": str(root / "results.md"),
            "results_csv": str(root / "results.csv"), "plots": [str(p) for p in plots],
            "n_train_images": len(split["train"]), "n_test_images": len(split["probe_test"]),
            "seeds": cfg.seeds, "runs": runs}
