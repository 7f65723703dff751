"""Which way imports go (docs/DESIGN.md "Packages"): checked on the source, imports inside functions
included, so a layering mistake or an import cycle fails here rather than in a user's process."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "muvla"
STAGES = ("regions", "text", "retrieval", "phrases")  # the corpus stages
FORMAT = ("corpus.layout", "corpus.provenance", "corpus.region_store", "corpus.synthetic",  # the on-disk format
          "corpus.captions")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every muvla module a file imports (``from muvla.x import y`` counts y when it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "muvla":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "muvla")
    return {m for m in found if m in modules}


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, frozenset[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): frozenset(imports_of(p, modules) - {module_name(p)}) for p in files}


def _sub(module: str) -> str:
    """'muvla.retrieval.stage' -> 'retrieval'; 'muvla.corpus.layout' -> 'corpus.layout'."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    return ".".join(parts[:2]) if parts[0] == "corpus" and len(parts) > 1 else parts[0]


def test_no_import_cycle_anywhere() -> None:
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if dep.startswith(f"{node}."):  # a package importing its own modules is not a cycle
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(g):
        if module not in state:
            visit(module, [module])


def _violations(importer: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in graph().items() if _sub(m) == importer or m.startswith(
        f"muvla.{importer}.") for d in deps if _sub(d) in forbidden)


def test_pretraining_and_tasks_sit_on_the_training_engine_not_on_each_other() -> None:
    assert not _violations("pretraining", {"tasks"})
    assert not _violations("tasks", {"pretraining"})
    assert not _violations("training", {"pretraining", "tasks", "corpus.build", *STAGES})


def test_the_corpus_format_depends_on_no_stage() -> None:
    for owner in FORMAT:
        assert not _violations(owner, {*STAGES, "pretraining", "tasks", "training", "corpus.build", "report"}), owner


def test_corpus_stages_do_not_import_each_other() -> None:
    for stage in STAGES:
        others = set(STAGES) - {stage}
        assert not _violations(stage, others | {"pretraining", "tasks", "training", "corpus.build"}), stage


COCO_CAPTION_KEYS = {"annotations", "caption"}


def reads_coco_captions(source: str) -> bool:
    """True when code names both keys of a COCO captions JSON (``data["annotations"]``, ``ann.get("caption")``,
    a key tuple...): the mark of a parser of that format. Docstrings are sentences, never just the key."""
    names = {node.value for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    return COCO_CAPTION_KEYS.issubset(names)


def test_the_check_sees_a_coco_captions_parser() -> None:
    parser = 'import json\ndef f(p):\n    return [a.get("caption") for a in json.load(open(p))["annotations"]]\n'
    assert reads_coco_captions(parser)
    assert not reads_coco_captions('def f(d):\n    return d["annotations"]\n')  # e.g. COCO instances, VQA


def test_coco_captions_json_is_parsed_in_one_module() -> None:
    """One owner per format (docs/DESIGN.md): everyone else reads captions through muvla.corpus.captions."""
    parsers = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if reads_coco_captions(p.read_text(encoding="utf-8")))
    assert parsers == ["muvla.corpus.captions"]


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (what the code uses, not what it says)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_step_reads_another_steps_config_yaml() -> None:
    """config.yaml is for people and for --config; steps learn their inputs from build records
    (``provenance.recorded_source``). Only ``utils.config`` (which writes and loads it) names it."""
    owner = PACKAGE / "utils" / "config.py"
    found = [f"{path.relative_to(SRC)}:{line}" for path in sorted(PACKAGE.rglob("*.py")) if path != owner
             for line, text in _code_strings(path) if "config.yaml" in text]
    assert not found, f"config.yaml named outside utils/config.py: {found}"
