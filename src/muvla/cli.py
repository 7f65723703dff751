"""muvla: vision-and-language pre-training without paired image-caption data.

Each stage command takes ``--config FILE.yaml`` plus flags, one per field of the stage's config
dataclass (``--max-regions 50`` sets ``max_regions``), plus ``--set key=value`` for nested fields.
Flags beat the YAML file; the resolved config is written next to the stage's outputs.
Stage modules are imported only when their command runs, so ``muvla --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from muvla.utils.config import ConfigError, load_config


@dataclasses.dataclass(frozen=True)
class StageCommand:
    """A CLI command backed by a config dataclass and a ``run(cfg) -> summary`` function."""

    name: str
    help: str
    module: str
    config_class: str
    run_function: str
    positional: str | None = None  # a field that may also be given positionally


STAGES = [
    StageCommand("regions", "detect regions (boxes, tags, features) into a sharded region store",
                 "muvla.regions.stage", "RegionsConfig", "run_regions"),
    StageCommand("text", "read text corpora (plain, CC3M TSV, COCO JSON, book) into a sentence store",
                 "muvla.text.stage", "TextConfig", "run_text"),
    StageCommand("retrieve", "retrieve each image's top-K sentences with Sentence-BERT + FAISS",
                 "muvla.retrieval.stage", "RetrievalConfig", "run_retrieval"),
    StageCommand("pairs", "baseline pairings in the retrieval format: random, aligned (captions), aligned_ratio",
                 "muvla.retrieval.pairs", "PairsConfig", "run_pairs"),
    StageCommand("phrases", "extract noun phrases of retrieved sentences and match them to regions",
                 "muvla.phrases.stage", "PhrasesConfig", "run_phrases"),
    StageCommand("corpus", "build the weakly-aligned corpus: regions, text, retrieve, phrases, report",
                 "muvla.corpus.build", "CorpusConfig", "run_corpus"),
    StageCommand("pretrain", "pre-train the single-stream model on a corpus (R-T, R-N, I-S; ITM curriculum)",
                 "muvla.pretraining.run", "PretrainConfig", "run_pretrain"),
    StageCommand("finetune", "fine-tune a model folder on VQA, NLVR2, SNLI-VE, RefCOCO+ or retrieval",
                 "muvla.tasks.finetune", "FinetuneConfig", "run_finetune"),
    StageCommand("evaluate", "evaluate a model folder with the official metrics (retrieval: zero-shot via ITM)",
                 "muvla.tasks.evaluate", "EvaluateConfig", "run_evaluate"),
    StageCommand("demo", "run the whole pipeline on the embedded default (sample images + captions)",
                 "muvla.demo", "DemoConfig", "run_demo"),
]


def _flag_type(annotation: Any) -> tuple[Callable[[str], Any] | None, bool, bool]:
    """(converter, is_list, is_bool) for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _flag_type(non_none[0]) if len(non_none) == 1 else (str, False, False)
    if origin in (list, tuple):
        inner = _flag_type(args[0])[0] if args else str
        return inner, True, False
    if annotation is bool:
        return None, False, True
    if annotation in (int, float, str, Path):
        return annotation, False, False
    return None, False, False  # dicts and nested configs: YAML or --set only


def _field_comments(config_cls: type) -> dict[str, str]:
    """Trailing ``# comments`` of the dataclass's field lines: the config's documentation doubles as --help."""
    pattern = re.compile(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", re.MULTILINE)
    comments: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):  # inherited settings first, subclasses may re-document
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        comments.update((name, text.strip()) for name, text in pattern.findall(source))
    return comments


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type, positional: str | None) -> list[str]:
    """Add one flag per simple dataclass field; return the field names that got flags."""
    hints = typing.get_type_hints(config_cls)
    comments = _field_comments(config_cls)
    names = []
    # the stage's own fields first, inherited keyword-only settings (e.g. the trainer's) after them
    for f in sorted(dataclasses.fields(config_cls), key=lambda f: bool(f.kw_only)):
        conv, is_list, is_bool = _flag_type(hints[f.name])
        if conv is None and not is_bool:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = comments.get(f.name, "")
        if default is not None:
            help_text = f"{help_text} (default: {default})".strip()
        flag = "--" + f.name.replace("_", "-")
        if is_bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif is_list:
            parser.add_argument(flag, dest=f.name, nargs="+", type=conv, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=help_text)
        names.append(f.name)
    if positional:
        parser.add_argument(f"{positional}_positional", nargs="?", default=None, metavar=positional.upper(),
                            help=f"same as --{positional.replace('_', '-')}")
    return names


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser(command: str | None = None
                 ) -> tuple[argparse.ArgumentParser, dict[str, tuple[StageCommand, type, list[str]]]]:
    """The parser; only ``command``'s config module is imported (its flags come from its dataclass)."""
    import muvla

    parser = argparse.ArgumentParser(prog="muvla", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"muvla {muvla.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered: dict[str, tuple[StageCommand, type, list[str]]] = {}
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        if stage.name != command:
            continue
        config_cls = getattr(importlib.import_module(stage.module), stage.config_class)
        p.add_argument("--config", type=Path, default=None, help="YAML config file (flags override it)")
        p.add_argument("--set", dest="set_pairs", action="append", default=[], metavar="KEY=VALUE",
                       help="override any (nested, dotted) config field, e.g. --set retrieval.k=10")
        names = _add_config_flags(p, config_cls, stage.positional)
        registered[stage.name] = (stage, config_cls, names)

    report = sub.add_parser("report", help="write a self-contained HTML report of a run folder")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="HTML path (default: RUN_DIR/report.html)")
    report.add_argument("--max-images", type=int, default=50)
    # Commands with their own argument parsers: everything after the name is passed through.
    for name, help_text in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, registered


# name -> help of commands that parse their own arguments (``muvla NAME --help`` shows them).
DELEGATED = {
    "table": "collect results files into the Meta-Ave table (Markdown, CSV, bar chart)",
}


def _delegate(name: str, argv: list[str]) -> int:
    if name == "table":
        from muvla.tasks.table import table_main

        return table_main(argv)
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser, registered = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from muvla.report import ReportError

    try:
        if args.command == "report":
            from muvla.report.html import write_report

            path = write_report(args.run_dir, out_html=args.out, max_images=args.max_images)
            print(f"report: {path}")
            return 0
        stage, config_cls, names = registered[args.command]
        overrides = {name: getattr(args, name) for name in names}
        if stage.positional and getattr(args, f"{stage.positional}_positional", None) is not None:
            overrides[stage.positional] = getattr(args, f"{stage.positional}_positional")
        overrides.update(_parse_set(args.set_pairs))
        cfg = load_config(config_cls, args.config, overrides)
        run = getattr(importlib.import_module(stage.module), stage.run_function)
        summary = run(cfg)
    except (ConfigError, ReportError, FileNotFoundError) as err:
        print(f"muvla {args.command}: error: {err}", file=sys.stderr)
        return 2
    if summary is not None and int(os.environ.get("RANK", 0)) == 0:  # under torchrun: once, not per rank
        print(json.dumps(summary, indent=2, default=str))
        if isinstance(summary, dict) and summary.get("report"):
            print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
