"""The downstream-task API: one explicit mapping of task specs whose aliases agree in every stage,
evaluation reading back what fine-tuning recorded, a sixth task added through the public API, and
the module layering (no import cycles, no task-name branches in the stages, fine-tuning independent
of pre-training)."""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from finetune_helpers import grid_boxes, tiny_model_dir, torch_threads, write_jsonl, write_store
from muvla.cli import main
from muvla.tasks import table
from muvla.tasks.evaluate import EvaluateConfig, run_evaluate
from muvla.tasks.files import NO_REGIONS
from muvla.tasks.finetune import FinetuneConfig, run_finetune
from muvla.tasks.model import read_task_info
from muvla.tasks.registry import TASKS, get_task, task_names
from muvla.utils.config import ConfigError
from toy_task import TOY

SRC = Path(__file__).resolve().parents[1] / "src" / "muvla"
TASK_MODULES = ("vqa", "nlvr2", "snli_ve", "refcoco", "image_text_retrieval")
IMAGES = {str(i): {"boxes": grid_boxes(2 + i % 3)} for i in range(1, 7)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("api")
    return {"model": tiny_model_dir(root / "tiny"), "regions": write_store(root / "regions", IMAGES)}


def finetune_cfg(env: dict, out: Path, **kw) -> FinetuneConfig:
    base = dict(out=out, model=str(env["model"]), regions=env["regions"], max_steps=3, batch_size=2, lr=1e-3,
                log_every=1, save_every=10, plot=False, device="cpu", max_text_len=16)
    return FinetuneConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- registry


def test_every_spec_is_registered_under_its_own_name() -> None:
    assert list(TASKS) == ["vqa", "nlvr2", "snli_ve", "refcoco+", "retrieval"]
    assert all(name == spec.name for name, spec in TASKS.items())
    aliases = [a for spec in TASKS.values() for a in spec.aliases]
    assert len(aliases) == len(set(aliases)) and not set(aliases) & set(TASKS)
    assert task_names() == list(TASKS)
    assert set(task_names(aliases=True)) == set(TASKS) | set(aliases)


@pytest.mark.parametrize("alias", [a for spec in TASKS.values() for a in (*spec.aliases, spec.name.upper())])
def test_an_alias_means_the_same_task_in_finetune_evaluate_and_table(alias: str, tmp_path: Path) -> None:
    """The old stages disagreed: 'vqav2' worked for the table but not for fine-tuning."""
    name = get_task(alias).name
    train = [tmp_path / "a", tmp_path / "b"][: 2 if name == "vqa" else 1]
    ft = FinetuneConfig(out=tmp_path, task=alias, train=train, regions=tmp_path)
    ft.validate()
    ev = EvaluateConfig(out=tmp_path, task=alias, data=train, regions=tmp_path)
    ev.validate()
    assert ft.task == ev.task == name
    assert table.canonical_task(f"{alias}/val") == f"{name}/val"


def test_unknown_task_is_one_clear_line(tmp_path: Path) -> None:
    for make in (lambda: FinetuneConfig(out=tmp_path, task="gqa", train=[tmp_path], regions=tmp_path).validate(),
                 lambda: EvaluateConfig(out=tmp_path, task="gqa", data=[tmp_path], regions=tmp_path).validate()):
        with pytest.raises(ConfigError, match="unknown task 'gqa'; expected one of vqa, nlvr2"):
            make()


def test_retrieval_without_captions_says_which_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--task", "retrieval", "--out", str(tmp_path / "e"), "--regions", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for fmt in ("COCO captions JSON", "JSON lines", "TSV image<TAB>caption", ".jsonl", ".tsv"):
        assert fmt in err


# ---------------------------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    """Every muvla module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("muvla"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("muvla"))
    return found


def test_task_modules_form_no_cycle_and_stages_import_no_sibling_stage() -> None:
    graph = {p.stem: {m.rsplit(".", 1)[-1] for m in _imports(p) if m.startswith("muvla.tasks.")}
             for p in (SRC / "tasks").glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    stages = {"finetune", "evaluate", "table"}
    for stage in stages:
        assert not graph[stage] & (stages - {stage}), f"{stage} imports another stage"
    for task in TASK_MODULES:  # a task module sees only the shared modules
        assert not graph[task] & (stages | {"registry"} | set(TASK_MODULES)), task


def test_tasks_and_pretraining_do_not_import_each_other() -> None:
    for path in (SRC / "tasks").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("muvla.pretraining")}, path.name
    for path in (SRC / "pretraining").rglob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("muvla.tasks")}, path.name


def test_no_task_name_branches_outside_the_task_modules() -> None:
    names = "|".join(re.escape(n) for n in TASKS)
    branch = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    for path in (SRC / "tasks").glob("*.py"):
        if path.stem in TASK_MODULES:
            continue
        hits = [line for line in path.read_text(encoding="utf-8").splitlines() if branch.search(line)]
        assert not hits, f"{path.name}: {hits}"


# ---------------------------------------------------------------------------------------------- read back


def _snli_files(tmp_path: Path) -> Path:
    labels = ["entailment", "neutral", "contradiction"]
    rows = [{"Flickr30K_ID": str(i), "sentence2": f"a long hypothesis about image number {i} and its many parts",
             "gold_label": labels[i % 3], "pairID": f"p{i}"} for i in range(1, 7)]
    return write_jsonl(tmp_path / "ve.jsonl", rows)


def test_evaluate_reads_back_task_and_max_text_len_and_a_flag_wins(env: dict, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = _snli_files(tmp_path)
    out = tmp_path / "ve"
    s = run_finetune(finetune_cfg(env, out, task="snli_ve", train=[data], val=[data], max_text_len=6, max_steps=2))
    assert read_task_info(out / "model").max_text_len == 6
    # neither --task nor --max-text-len: both come from task.json
    res = run_evaluate(EvaluateConfig(out=tmp_path / "e1", model=str(out), data=[data], regions=env["regions"],
                                      device="cpu"))
    assert res["task"] == "snli_ve" and res["max_text_len"] == 6
    assert res["metrics"] == s["val_metrics"]
    assert (tmp_path / "e1" / "predictions_snli_ve_val.jsonl").read_text() == \
        (out / "predictions_snli_ve_val.jsonl").read_text()
    # an explicit flag wins; the difference is one warning line
    with caplog.at_level(logging.WARNING, logger="muvla.tasks.evaluate"):
        res = run_evaluate(EvaluateConfig(out=tmp_path / "e2", task="SNLI-VE", model=str(out), data=[data],
                                          regions=env["regions"], device="cpu", max_text_len=40))
    assert res["max_text_len"] == 40
    assert [r.getMessage() for r in caplog.records] == [
        "max_text_len 40 (given) differs from 6 used in fine-tuning (task.json); using 40"]
    # the task cannot be overridden: its head is another task's
    with pytest.raises(ConfigError, match="was fine-tuned for 'snli_ve', not 'nlvr2'"):
        EvaluateConfig(out=tmp_path / "e3", task="nlvr2", model=str(out), data=[data], regions=env["regions"]).validate()
    with pytest.raises(ConfigError, match="give the task"):
        EvaluateConfig(out=tmp_path / "e4", data=[data], regions=env["regions"]).validate()


def test_zero_shot_retrieval_from_a_tsv_with_a_malformed_row(env: dict, tmp_path: Path) -> None:
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("image\tcaption\n" + "".join(f"{i}\tcaption {k} of image {i}\n" for i in IMAGES for k in range(2))
                   + "3 only an image\n" + "777\tan image without regions\n", encoding="utf-8")
    res = run_evaluate(EvaluateConfig(out=tmp_path / "zs", task="retrieval", model=str(env["model"]), captions=tsv,
                                      regions=env["regions"], device="cpu", max_images=3))
    assert res["metrics"]["n_images"] == 3 and res["metrics"]["n_captions"] == 6 and res["metrics"]["zero_shot"]
    rejected = [json.loads(line) for line in (tmp_path / "zs" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rejected] == [
        (str(tsv), 14, "expected image<TAB>caption, got 1 field(s)"), (str(tsv), 15, NO_REGIONS)]


# ---------------------------------------------------------------------------------------------- a sixth task


def test_a_sixth_task_is_one_module_and_one_mapping_line(env: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TASKS, "toy", TOY)  # the one line in muvla/tasks/registry.py
    rows = [{"id": f"t{i}", "image": str(i), "text": f"image {i} is {'even' if i % 2 == 0 else 'odd'}",
             "label": i % 2} for i in range(1, 7)]
    rows += [{"id": "t7", "image": "777", "text": "no regions", "label": 0},
             {"id": "t8", "image": "1", "text": "bad label", "label": 2}]
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    out = tmp_path / "toy"
    s = run_finetune(finetune_cfg(env, out, task="TOY-task", train=[data], val=[data]))
    assert s["task"] == "toy" and s["train"]["steps"] == 3
    assert s["train_load_report"]["skipped"] == {NO_REGIONS: 1, "label 2 is not 0/1": 1}
    assert set(json.loads((out / "predictions_toy_val.json").read_text())) == {f"t{i}" for i in range(1, 7)}
    assert read_task_info(out / "model").task == "toy"
    assert "toy_loss" in (out / "metrics.jsonl").read_text()

    res = run_evaluate(EvaluateConfig(out=tmp_path / "eval", model=str(out), data=[data], regions=env["regions"],
                                      device="cpu"))
    assert res["task"] == "toy" and res["max_text_len"] == 16
    assert res["metrics"]["accuracy"] == pytest.approx(s["val_metrics"]["accuracy"])
    rows_ = table.collect_results([tmp_path / "eval" / "results.json"])
    markdown, _ = table.render_table(rows_)
    assert markdown.splitlines()[0] == "| model | Toy parity val | Meta-Ave |"
    assert torch.isfinite(torch.tensor(rows_[0].meta_ave))
