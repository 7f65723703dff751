"""An experiment's results, as files a reader (and the README) can check:

- ``results.csv``: a row per model, seed, held-out split (dev/test) and kind (zero-shot/probe);
- ``per_image.csv``: every scored image's rank as a query and its captions' ranks, per row of the
  above (everything any other statistic needs);
- ``gaps.csv``: every compared gap (the paper's claims) with its paired bootstrap interval;
- ``results.json``: all of it with the protocol (split sizes, seeds, which settings were tuned and
  on which images), the machine and the time;
- ``results.md``: the claims first (gap, interval, verdict worded from the interval), then the
  per-model tables of the reported split and of dev, then the protocol.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from muvla.experiment.config import ExperimentConfig
from muvla.experiment.recipes import RECIPES
from muvla.experiment.stats import Gap, ImageHits, paired_gap
from muvla.training.plots import read_metrics
from muvla.utils.shards import atomic_file

METRICS = ("mean_recall", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
PAPER_ORDER = ("base", "round_robin", "joint_unaligned", "muvla", "aligned")
KINDS = {"zero_shot": "zero-shot", "probe": "probe"}


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims, as the gap ``a - b`` it predicts to be positive."""

    a: str
    b: str
    text: str


CLAIMS = (
    Claim("muvla", "joint_unaligned", "retrieved pairs beat random pairs (μ-VLA's main claim)"),
    Claim("muvla", "base", "μ-VLA pre-training beats no V+L pre-training"),
    Claim("muvla", "round_robin", "joint training beats round robin (U-VisualBERT)"),
    Claim("aligned", "muvla", "aligned captions beat μ-VLA (the supervised upper bound)"),
    Claim("aligned_ratio_0.5", "joint_unaligned", "quality rises with the aligned ratio: 0.5 beats 0 (random)"),
    Claim("aligned", "aligned_ratio_0.5", "quality rises with the aligned ratio: 1 beats 0.5"),
    Claim("muvla_rt_rn", "muvla_rt", "region-phrase (R-N) helps over R-T only"),
    Claim("muvla_rt_is", "muvla_rt", "image-sentence (I-S) helps over R-T only"),
    Claim("muvla", "muvla_rt_rn", "I-S helps on top of R-T + R-N"),
    Claim("muvla", "muvla_rt_is", "R-N helps on top of R-T + I-S"),
    Claim("muvla", "muvla_k1", "K = 5 retrieved sentences beat K = 1"),
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def per_model(runs: list[dict[str, Any]], kind: str, part: str, metric: str) -> dict[str, list[float]]:
    """model -> the metric of each seed (models in run order) on one held-out split."""
    out: dict[str, list[float]] = {}
    for run in runs:
        value = ((run.get(kind) or {}).get(part) or {}).get(metric)
        if isinstance(value, (int, float)):
            out.setdefault(run["model"], []).append(float(value))
    return out


def csv_text(runs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "seed", "split", "kind", "pretrain_steps", "pretrain_seconds", "final_loss",
                     "n_images", "n_captions", *METRICS])
    for run in runs:
        train = (run.get("pretrain") or {}).get("train") or {}
        for kind in KINDS:
            for part, metrics in (run.get(kind) or {}).items():
                writer.writerow([run["model"], run["seed"], part, kind, train.get("steps", 0), run.get("pretrain_seconds"),
                                 train.get("final_loss"), metrics.get("n_images"), metrics.get("n_captions"),
                                 *(metrics.get(m) for m in METRICS)])
    return buf.getvalue()


def per_image_csv(hits: dict[tuple[str, str, str, int], ImageHits]) -> str:
    """(model, kind, split, seed) -> hits, as one row per scored image: its rank as an image->text
    query and the ranks of its captions as text->image queries (0-based; a hit at k is rank < k)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "seed", "split", "kind", "image_id", "i2t_rank", "t2i_ranks"])
    for (model, kind, part, seed), h in hits.items():
        for row, image in enumerate(h.image_ids):
            ranks = h.t2i_rank[h.text_to_image == row]
            writer.writerow([model, seed, part, kind, image, int(h.i2t_rank[row]), " ".join(str(int(r)) for r in ranks)])
    return buf.getvalue()


def compute_gaps(hits: dict[tuple[str, str, str, int], ImageHits], models: list[str], n_boot: int
                 ) -> list[dict[str, Any]]:
    """Every claim whose two models were run, for each kind and scored split: its paired gap."""
    rows = []
    parts = sorted({key[2] for key in hits})
    for kind in KINDS:
        for part in parts:
            for claim in CLAIMS:
                if claim.a not in models or claim.b not in models:
                    continue
                by_seed = {name: {key[3]: h for key, h in hits.items() if key[:3] == (name, kind, part)}
                           for name in (claim.a, claim.b)}
                if not by_seed[claim.a] or not by_seed[claim.b]:
                    continue
                gap = paired_gap(claim.a, claim.b, by_seed[claim.a], by_seed[claim.b], n_boot=n_boot)
                rows.append({"claim": claim.text, "kind": kind, "split": part, **_gap_dict(gap)})
    return rows


def _gap_dict(gap: Gap) -> dict[str, Any]:
    out = asdict(gap)
    out["per_seed"] = list(gap.per_seed)
    out["seeds"] = list(gap.seeds)
    out["verdict"] = gap.verdict
    return out


def gaps_csv(gaps: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    cols = ["claim", "kind", "split", "a", "b", "gap", "low", "high", "verdict", "per_seed", "seeds", "n_images",
            "n_boot"]
    writer.writerow(cols)
    for g in gaps:
        writer.writerow([" ".join(f"{v:.6f}" for v in g[c]) if c == "per_seed" else
                         " ".join(str(v) for v in g[c]) if c == "seeds" else
                         f"{g[c]:.6f}" if isinstance(g[c], float) else g[c] for c in cols])
    return buf.getvalue()


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _ranks(table: dict[str, dict[str, list[float]]], model: str, way: str) -> str:
    cells = [table[f"{way}_r{k}"].get(model) for k in (1, 5, 10)]
    return " / ".join(f"{100 * _mean_std(c)[0]:.1f}" if c else "-" for c in cells)


def results_table(runs: list[dict[str, Any]], models: list[str], part: str) -> str:
    """Markdown: per model, zero-shot and probe mean recall (mean ± std over seeds) and R@1/5/10
    both ways (mean over seeds), percent, on one held-out split."""
    zs = {m: per_model(runs, "zero_shot", part, m) for m in METRICS}
    pr = {m: per_model(runs, "probe", part, m) for m in METRICS}
    lines = ["| model | what | zero-shot mR | zero-shot R@1/5/10 image→text | zero-shot R@1/5/10 text→image | "
             "probe mR | probe R@1/5/10 image→text | probe R@1/5/10 text→image |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in models:
        lines.append(f"| {model} | {RECIPES[model].label} | {_cell(zs['mean_recall'].get(model))} | "
                     f"{_ranks(zs, model, 'i2t')} | {_ranks(zs, model, 't2i')} | {_cell(pr['mean_recall'].get(model))} | "
                     f"{_ranks(pr, model, 'i2t')} | {_ranks(pr, model, 't2i')} |")
    return "\n".join(lines) + "\n"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def claims_table(gaps: list[dict[str, Any]], part: str) -> str:
    """Markdown: each claim on one split, zero-shot and probe: gap, paired 95% interval, per-seed gaps, verdict."""
    lines = ["| claim | gap | measure | a - b (points of mean recall) | paired 95% interval | per seed | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    for g in gaps:
        if g["split"] != part:
            continue
        lines.append(f"| {g['claim']} | {g['a']} - {g['b']} | {KINDS[g['kind']]} | {_points(g['gap'])} | "
                     f"[{_points(g['low'])}, {_points(g['high'])}] | {' '.join(_points(v) for v in g['per_seed'])} | "
                     f"{g['verdict']} |")
    return "\n".join(lines) + "\n"


def findings(gaps: list[dict[str, Any]], part: str) -> list[str]:
    """One sentence per claim on one split, worded from its paired interval (whatever it shows)."""
    out = []
    for g in gaps:
        if g["split"] != part:
            continue
        interval = f"[{_points(g['low'])}, {_points(g['high'])}]"
        head = f"{KINDS[g['kind']].capitalize()}, {part}: {g['a']} - {g['b']} = {_points(g['gap'])} points {interval}"
        if g["verdict"] == "holds":
            out.append(f"{head}: {g['a']} beats {g['b']} ({g['claim']}: holds).")
        elif g["verdict"] == "reversed":
            out.append(f"{head}: {g['b']} beats {g['a']} ({g['claim']}: does not hold).")
        else:
            out.append(f"{head}: not distinguishable at this size ({len(g['seeds'])} seeds x {g['n_images']} images).")
    return out


def ordering(runs: list[dict[str, Any]], models: list[str], part: str) -> list[str]:
    """The paper's ordering of the models, by mean over seeds (descriptive; the claims carry the intervals)."""
    out = []
    for kind in KINDS:
        scores = per_model(runs, kind, part, "mean_recall")
        ordered = [m for m in PAPER_ORDER if m in scores and m in models]
        if len(ordered) >= 3:
            means = {m: _mean_std(scores[m])[0] for m in ordered}
            ranking = sorted(ordered, key=lambda m: -means[m])
            holds = all(means[a] <= means[b] + 1e-12 for a, b in zip(ordered, ordered[1:]))
            out.append(f"{KINDS[kind].capitalize()}, {part}, by mean over seeds: {' > '.join(ranking)}; the paper's "
                       f"ordering ({' <= '.join(ordered)}) {'holds' if holds else 'does not hold'} in the means "
                       f"(see the intervals above for which differences are distinguishable).")
    return out


def write_plots(runs: list[dict[str, Any]], models: list[str], part: str, plots: Path, model_dir: Any) -> list[Path]:
    """Per-model bars of the reported split, the aligned-ratio curve and the training curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, title in (("zero_shot", f"zero-shot retrieval, {part} images"), ("probe", f"retrieval probe, {part}")):
        scores = per_model(runs, kind, part, "mean_recall")
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
        written.append(_save(fig, plots / f"{kind}.png"))
    ratio = [(0.0, "joint_unaligned"), *((RECIPES[m].p, m) for m in models if RECIPES[m].p is not None),
             (1.0, "aligned")]
    ratio = [(p, m) for p, m in ratio if m in models]
    if len(ratio) >= 2:
        fig = Figure(figsize=(4.5, 3.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for kind in KINDS:
            scores = per_model(runs, kind, part, "mean_recall")
            pts = [(p, _mean_std(scores[m])) for p, m in sorted(ratio) if m in scores]
            if pts:
                ax.errorbar([p for p, _ in pts], [100 * s[0] for _, s in pts], yerr=[100 * s[1] for _, s in pts],
                            marker="o", capsize=3, label=KINDS[kind])
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


def collect_hits(cfg: ExperimentConfig, layout: Any, runs: list[dict[str, Any]]
                 ) -> dict[tuple[str, str, str, int], ImageHits]:
    """(model, kind, split, seed) -> the per-image ranks of every evaluation the experiment ran."""
    hits = {}
    for run in runs:
        for kind in KINDS:
            for part in (run.get(kind) or {}):
                folder = layout.evaluation(run["model"], run["seed"], part, probe=kind == "probe")
                hits[(run["model"], kind, part, run["seed"])] = ImageHits.from_evaluation(folder, f"retrieval_{part}")
    return hits


def protocol_lines(cfg: ExperimentConfig, split: dict[str, list[str]]) -> list[str]:
    """What the numbers were measured on, and which settings were chosen by looking at results."""
    ev = cfg.evaluation
    pretrain = cfg.pretrain_config("base", Path("x"), None, 0)
    lines = [f"Images: `{cfg.images}`, split seed {ev.split_seed}: {len(split['train'])} pre-train; held out "
             f"{len(split['probe_train'])} probe-train, {len(split['dev'])} dev, {len(split['test'])} test "
             f"({ev.captions_per_image} caption(s) per dev/test image; image→text counts a hit when any of an image's "
             f"captions is in the top k, text→image ranks every caption). Text setting `{cfg.text_setting}` "
             f"({', '.join(f'`{p}`' for p in cfg.pool) or 'no pool'}). Regions: `{cfg.regions.backend}`.", "",
             f"Every model: init `{pretrain.init}`, {pretrain.max_steps or pretrain.epochs} "
             f"{'steps' if pretrain.max_steps else 'epochs'}, batch {pretrain.batch_size}, lr {pretrain.lr}, "
             f"seeds {cfg.seeds}, precision `{cfg.precision}`. Probe: {ev.probe_steps} steps of retrieval fine-tuning "
             f"on the probe-train images, batch {ev.probe_batch_size}, lr {ev.probe_lr}.", "",
             "Mean recall (mR) = mean of R@1/5/10 in both directions, percent; per-model cells: mean ± std over "
             "seeds. Gaps: mean over seeds of the per-seed gap; interval: paired bootstrap "
             f"({ev.bootstrap} resamples of the images and the seeds together, the same resample for both models).", ""]
    if ev.tuned:
        lines.append("Settings chosen by looking at results (not tuned on this run's test images unless stated):")
        lines += [f"- `{name}`: {where}" for name, where in ev.tuned.items()]
    else:
        lines.append("No setting of this config is recorded as chosen by looking at results (`evaluation.tuned`).")
    if ev.report_on == "dev":
        lines += ["", "**Tuning mode** (`report_on: dev`): the test images were not scored."]
    return lines


def write_results(cfg: ExperimentConfig, layout: Any, runs: list[dict[str, Any]], quality: dict[str, Any],
                  split: dict[str, list[str]]) -> dict[str, Any]:
    """results.md / .csv / .json, per_image.csv, gaps.csv and the plots, from the evaluations on disk."""
    root = layout.root
    ev = cfg.evaluation
    reported = ev.report_on
    hits = collect_hits(cfg, layout, runs)
    gaps = compute_gaps(hits, cfg.models, ev.bootstrap)
    found = findings(gaps, reported)
    table = results_table(runs, cfg.models, reported)
    n_reported = len(split[reported])
    lines = [f"# muvla experiment: {root.name}", "",
             f"## Claims, {reported} split ({n_reported} images x {ev.captions_per_image} captions, "
             f"seeds {cfg.seeds})", ""]
    if reported == "dev":
        lines += ["Tuning mode: these are dev numbers; the test split is untouched.", ""]
    lines += [claims_table(gaps, reported) if gaps else "No two compared models form one of the paper's claims.", ""]
    lines += [f"- {sentence}" for sentence in found + ordering(runs, cfg.models, reported)]
    lines += ["", f"## Models, {reported} split", "", table]
    if reported == "test":
        lines += ["## Dev split (where settings may be chosen)", "", results_table(runs, cfg.models, "dev"), "",
                  claims_table(gaps, "dev") if gaps else "", ""]
    lines += ["## Protocol", "", *protocol_lines(cfg, split), "", "## Corpus", "",
              "Weak corpus quality (the retrieved pairs of the training images): "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items()), ""]
    md = "\n".join(lines) + "\n"
    files = {"results.md": md, "results.csv": csv_text(runs), "per_image.csv": per_image_csv(hits),
             "gaps.csv": gaps_csv(gaps)}
    for name, text in files.items():
        with atomic_file(root / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    first_seed = cfg.seeds[0]
    plots = write_plots(runs, cfg.models, reported, root / "plots", lambda m: layout.model(m, first_seed))
    record = {"report_on": reported, "models": cfg.models, "seeds": cfg.seeds,
              "split": {part: len(members) for part, members in split.items()}, "split_seed": ev.split_seed,
              "captions_per_image": ev.captions_per_image, "tuned": ev.tuned, "quality": quality, "gaps": gaps,
              "per_model": {kind: {part: {m: per_model(runs, kind, part, m) for m in METRICS}
                                   for part in ev.scored_splits} for kind in KINDS},
              "pretrain_seconds": {f"{r['model']}/seed-{r['seed']}": r.get("pretrain_seconds") for r in runs},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_end": list(os.getloadavg())}}
    with atomic_file(root / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return {"table": table, "findings": found, "gaps": gaps, "quality": quality,
            "results_md": str(root / "results.md"), "results_csv": str(root / "results.csv"),
            "results_json": str(root / "results.json"), "plots": [str(p) for p in plots],
            "n_train_images": len(split["train"]), "n_test_images": n_reported, "report_on": reported,
            "seeds": cfg.seeds, "runs": runs}
