"""Meta-Ave results table (muvla.tasks.table)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from muvla.tasks.table import canonical_task, collect_results, render_table, run_table, table_main


def _results(tmp_path: Path) -> list[Path]:
    d = tmp_path / "results"
    d.mkdir(parents=True)
    # one file per (model, task) ...
    (d / "results_muvla_vqa.json").write_text(json.dumps(
        {"model": "muvla", "task": "vqa", "metrics": {"accuracy": 0.70, "n": 10}}))
    # ... a dict of tasks ...
    (d / "results_muvla_rest.json").write_text(json.dumps(
        {"model": "muvla", "tasks": {"NLVR2": {"accuracy": 0.60, "consistency": 0.2},
                                     "snli-ve": {"accuracy": 0.80},
                                     "refcoco+/testA": {"acc_all": 0.50, "acc_covered": 0.55}}}))
    # ... or a list; 'base' lacks refcoco+ (its Meta-Ave covers its 3 tasks)
    (d / "results_base.json").write_text(json.dumps([
        {"model": "base", "task": "vqa", "metrics": {"accuracy": 0.60}},
        {"model": "base", "tasks": {"nlvr2": {"accuracy": 0.50}, "snli_ve": {"accuracy": 0.70}}}]))
    (d / "summary.json").write_text("{}")  # not a results*.json: ignored when scanning the folder
    return [d]


def test_collect_and_render(tmp_path: Path) -> None:
    rows = collect_results(_results(tmp_path))
    assert [r.model for r in rows] == ["base", "muvla"]  # known baselines first
    muvla = rows[1]
    assert muvla.scores == {"vqa": 0.70, "nlvr2": 0.60, "snli_ve": 0.80, "refcoco+/testA": 0.50}
    assert muvla.meta_ave == pytest.approx((0.70 + 0.60 + 0.80 + 0.50) / 4)  # 0.65
    assert rows[0].meta_ave == pytest.approx((0.60 + 0.50 + 0.70) / 3)  # 0.60

    markdown, csv_text = render_table(rows)
    lines = markdown.splitlines()
    assert lines[0] == "| model | VQA | NLVR2 | SNLI-VE | RefCOCO+ testA | Meta-Ave |"
    assert lines[2] == "| base | 60.0 | 50.0 | 70.0 | - | 60.0 † |"
    assert lines[3] == "| muvla | 70.0 | 60.0 | 80.0 | 50.0 | 65.0 |"
    assert "† Meta-Ave over the tasks this model reports only." in markdown
    table = list(csv.DictReader(io.StringIO(csv_text)))
    assert table[1] == {"model": "muvla", "vqa": "70.00", "nlvr2": "60.00", "snli_ve": "80.00",
                        "refcoco+/testA": "50.00", "meta_ave": "65.00", "n_tasks": "4"}
    assert table[0]["refcoco+/testA"] == "" and table[0]["n_tasks"] == "3"


def test_run_table_writes_markdown_csv_png(tmp_path: Path) -> None:
    summary = run_table(_results(tmp_path), tmp_path / "out")
    files = {k: Path(v) for k, v in summary["files"].items()}
    assert files["markdown"].read_text().startswith("| model |")
    assert files["csv"].read_text().startswith("model,vqa,nlvr2")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["meta_ave"]["muvla"] == pytest.approx(0.65)
    assert table_main([str(p) for p in _results(tmp_path / "again")] + ["--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "table.png").is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"model": "m", "task": "vqa", "metrics": {"accuracy": 72.1}}, "fractions in \\[0, 1\\]"),
        ({"model": "m", "task": "gqa", "metrics": {"accuracy": 0.5}}, "unknown task 'gqa'"),
        ({"model": "m", "task": "refcoco+", "metrics": {"accuracy": 0.5}}, "no 'acc_all' metric"),
        ({"task": "vqa", "metrics": {"accuracy": 0.5}}, "needs a string 'model'"),
        ([{"model": "m", "task": "vqa", "metrics": {"accuracy": 0.5}},
          {"model": "m", "task": "vqa", "metrics": {"accuracy": 0.6}}], "given twice with different values"),
    ],
)
def test_bad_results_give_clear_errors(tmp_path: Path, content: object, message: str) -> None:
    f = tmp_path / "results.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        collect_results([f])
    assert table_main([str(f), "--out", str(tmp_path)]) == 2


def test_canonical_task_and_missing_paths(tmp_path: Path) -> None:
    assert canonical_task("SNLI-VE/test") == "snli_ve/test"
    assert canonical_task("retrieval/coco-5k") == "retrieval/coco-5k"
    with pytest.raises(FileNotFoundError, match="results file not found"):
        collect_results([tmp_path / "missing.json"])
    with pytest.raises(FileNotFoundError, match="no results\\*.json"):
        collect_results([tmp_path])
