"""muvla: vision-and-language pre-training without paired image-caption data.

Each command takes ``--config FILE.yaml`` plus flags, one per setting of the command's config
dataclass (``--max-regions 50`` sets ``max_regions``; a nested section's setting gets its own name
when that is unambiguous, e.g. ``muvla corpus --k 10`` sets ``retrieval.k``), plus ``--set key=value``
for any (nested) setting. Flags beat the YAML file. Help texts and allowed values come from the
settings' declarations (``muvla.utils.config.setting``). Command modules are imported only when
their command runs, so ``muvla --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from muvla.utils.config import ConfigError, field_choices, field_help, load_config


@dataclass(frozen=True)
class Command:
    """A CLI command backed by a config dataclass and a ``run(cfg) -> summary`` function.

    ``describe`` (optional, same module) turns the summary into the few lines printed at the end;
    the full summary is in the command's ``summary.json``.
    """

    name: str
    help: str
    module: str
    config_class: str
    run_function: str
    describe_function: str | None = None
    positional: str | None = None  # a setting that may also be given as the first plain argument


COMMANDS = [
    Command("regions", "detect regions (boxes, tags, features) into a sharded region store",
            "muvla.regions.stage", "RegionsConfig", "run_regions", "describe"),
    Command("text", "read text corpora (plain, CC3M TSV, COCO JSON, book) into a sentence store",
            "muvla.text.stage", "TextConfig", "run_text", "describe"),
    Command("retrieve", "retrieve each image's top-K sentences with Sentence-BERT + FAISS",
            "muvla.retrieval.stage", "RetrievalConfig", "run_retrieval", "describe"),
    Command("pairs", "baseline pairings in the retrieval format: random, aligned (captions), aligned_ratio",
            "muvla.retrieval.pairs", "PairsConfig", "run_pairs", "describe"),
    Command("phrases", "extract noun phrases of retrieved sentences and match them to regions",
            "muvla.phrases.stage", "PhrasesConfig", "run_phrases", "describe"),
    Command("corpus", "build the weakly-aligned corpus: regions, text, retrieve, phrases, report",
            "muvla.corpus.build", "CorpusConfig", "run_corpus", "describe"),
    Command("pretrain", "pre-train the single-stream model on a corpus (R-T, R-N, I-S; ITM curriculum)",
            "muvla.pretraining.run", "PretrainConfig", "run_pretrain", "describe"),
    Command("finetune", "fine-tune a model folder on VQA, NLVR2, SNLI-VE, RefCOCO+ or retrieval",
            "muvla.tasks.finetune", "FinetuneConfig", "run_finetune", "describe"),
    Command("evaluate", "evaluate a model folder with the official metrics (retrieval: zero-shot via ITM)",
            "muvla.tasks.evaluate", "EvaluateConfig", "run_evaluate", "describe"),
    Command("experiment", "pre-train every compared model on the same budget and evaluate all on held-out images",
            "muvla.experiment.run", "ExperimentConfig", "run_experiment", "describe"),
    Command("report", "write a self-contained HTML report of a run folder",
            "muvla.report.html", "ReportConfig", "run_report", "describe", positional="run_dir"),
    Command("demo", "run the whole pipeline on the embedded default (sample images + captions)",
            "muvla.demo", "DemoConfig", "run_demo", "describe"),
]

# Commands with their own argument parsers: everything after the name is passed through.
DELEGATED = {
    "table": ("collect results files into the Meta-Ave table (Markdown, CSV, bar chart)",
              "muvla.tasks.table", "table_main"),
}


# ---------------------------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the (dotted) setting it sets."""

    flag: str
    key: str
    kind: str  # "value" | "list" | "bool"
    convert: Callable[[str], Any]
    help: str
    choices: tuple[Any, ...] | None
    group: str


def _simple_type(annotation: Any) -> tuple[str, Callable[[str], Any]] | None:
    """(kind, converter) for annotations a flag can carry; None for mappings and nested sections."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _simple_type(non_none[0]) if len(non_none) == 1 else ("value", str)
    if origin in (list, tuple):
        inner = args[0] if args else str
        return ("list", inner if inner in (int, float, str, Path) else str)
    if annotation is bool:
        return ("bool", str)
    if annotation in (int, float, str, Path):
        return ("value", annotation)
    return None


def _describe_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING and f.default is not None:
        value = f.default
        if isinstance(value, tuple):
            value = " ".join(map(str, value))
        return f" (default: {value})"
    return ""


def config_flags(config_cls: type) -> list[Flag]:
    """Flags of every simple setting, nested sections included (``--k`` for ``retrieval.k`` when no
    other section or top-level setting is called ``k``, else ``--retrieval-k``)."""
    hints = typing.get_type_hints(config_cls)
    top = [f for f in dataclasses.fields(config_cls)]
    sections = {f.name: hints[f.name] for f in top if dataclasses.is_dataclass(hints[f.name])}
    leaf_count: dict[str, int] = {}
    for f in top:
        if f.name not in sections:
            leaf_count[f.name] = leaf_count.get(f.name, 0) + 1
    for cls in sections.values():
        for f in dataclasses.fields(cls):
            leaf_count[f.name] = leaf_count.get(f.name, 0) + 1

    flags: list[Flag] = []

    def add(f: dataclasses.Field, annotation: Any, key: str, name: str, group: str) -> None:
        simple = _simple_type(annotation)
        if simple is None:
            return
        kind, convert = simple
        flags.append(Flag("--" + name.replace("_", "-"), key, kind, convert,
                          field_help(f) + _describe_default(f), field_choices(f), group))

    # the command's own settings first, inherited keyword-only ones (e.g. the trainer's) after them
    for f in sorted(top, key=lambda f: bool(f.kw_only)):
        if f.name in sections:
            sub_hints = typing.get_type_hints(sections[f.name])
            for sf in dataclasses.fields(sections[f.name]):
                name = sf.name if leaf_count[sf.name] == 1 else f"{f.name}_{sf.name}"
                add(sf, sub_hints[sf.name], f"{f.name}.{sf.name}", name, f"{f.name} settings")
        else:
            add(f, hints[f.name], f.name, f.name, "settings")
    return flags


def _set_example(config_cls: type) -> str:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sub = dataclasses.fields(hints[f.name])
            leaf = next((s for s in sub if s.default is not dataclasses.MISSING and s.default is not None), sub[0])
            return f"{f.name}.{leaf.name}={leaf.default}"
        if typing.get_origin(hints[f.name]) is dict or hints[f.name] is dict:
            return f"{f.name}.<key>=<value>"
    numbers = [f for f in dataclasses.fields(config_cls) if hints[f.name] in (int, float)
               and f.default is not dataclasses.MISSING]
    return f"{numbers[0].name}={numbers[0].default}" if numbers else "<setting>=<value>"


def build_command_parser(command: Command, config_cls: type) -> tuple[argparse.ArgumentParser, list[Flag]]:
    parser = argparse.ArgumentParser(prog=f"muvla {command.name}", description=command.help)
    parser.add_argument("--config", type=Path, default=None, help="YAML config file (flags override it)")
    parser.add_argument("--set", dest="set_pairs", action="append", default=[], metavar="KEY=VALUE",
                        help=f"set any (nested, dotted) setting, e.g. --set {_set_example(config_cls)}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    flags = config_flags(config_cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for i, flag in enumerate(flags):
        group = groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        dest = f"setting_{i}"
        if flag.kind == "bool":
            group.add_argument(flag.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=flag.help)
        else:
            metavar = "|".join(map(str, flag.choices)) if flag.choices else flag.key.split(".")[-1].upper()
            group.add_argument(flag.flag, dest=dest, nargs="+" if flag.kind == "list" else None, type=flag.convert,
                               default=None, help=flag.help, metavar=metavar)
    if command.positional:
        parser.add_argument("positional", nargs="?", default=None, metavar=command.positional.upper(),
                            help=f"same as --{command.positional.replace('_', '-')}")
    return parser, flags


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def command_overrides(args: argparse.Namespace, flags: list[Flag], positional: str | None = None) -> dict[str, Any]:
    """Dotted setting -> value from the flags and ``--set``; one setting given twice is an error."""
    overrides: dict[str, Any] = {}
    given: dict[str, str] = {}
    if positional and getattr(args, "positional", None) is not None:
        overrides[positional] = args.positional
        given[positional] = str(args.positional)
    for i, flag in enumerate(flags):
        value = getattr(args, f"setting_{i}")
        if value is not None:
            if flag.key in given:
                raise ConfigError(f"{flag.key} is given twice: {given[flag.key]} and {flag.flag} {value}")
            overrides[flag.key] = value
            given[flag.key] = f"{flag.flag} {value}"
    for key, value in _parse_set(args.set_pairs).items():
        if key in given:
            raise ConfigError(f"{key} is given twice: {given[key]} and --set {key}={value}; give it once")
        overrides[key] = value
        given[key] = f"--set {key}={value}"
    return overrides


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the commands (each command's own flags are in ``muvla CMD --help``)."""
    import muvla

    parser = argparse.ArgumentParser(prog="muvla", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"muvla {muvla.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub.add_parser(command.name, help=command.help, add_help=False)
    for name, (help_text, _, _) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _print_summary(command: Command, module: Any, summary: Any) -> None:
    if summary is None or int(os.environ.get("RANK", 0)) != 0:  # under torchrun: once, not per rank
        return
    describe = getattr(module, command.describe_function, None) if command.describe_function else None
    if describe is not None and isinstance(summary, dict):
        lines = describe(summary)
    else:
        lines = [f"{k}: {v}" for k, v in summary.items() if isinstance(v, (str, int, float, bool))][:12] \
            if isinstance(summary, dict) else [str(summary)]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in COMMANDS}
    if not argv or argv[0] not in by_name:
        if argv and argv[0] in DELEGATED:
            _, module, function = DELEGATED[argv[0]]
            return int(getattr(importlib.import_module(module), function)(argv[1:]))
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # --help / --version exit here; an unknown command is an error
        return 2
    command = by_name[argv[0]]
    debug = "--debug" in argv
    try:
        module = importlib.import_module(command.module)
        config_cls = getattr(module, command.config_class)
        parser, flags = build_command_parser(command, config_cls)
        args = parser.parse_args(argv[1:])
        cfg = load_config(config_cls, args.config, command_overrides(args, flags, command.positional))
        summary = getattr(module, command.run_function)(cfg)
    except (ConfigError, FileNotFoundError) as err:
        if debug:
            traceback.print_exc()
        print(f"muvla {command.name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"muvla {command.name}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the user sees one line; --debug shows the traceback
        if debug:
            traceback.print_exc()
        print(f"muvla {command.name}: unexpected error: {type(err).__name__}: {err} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    _print_summary(command, module, summary)
    return 0


def _leave_process_group() -> None:
    """Under torchrun: leave the process group the command joined, if any, before the interpreter exits.

    Without a barrier: a finished rank has completed all its collectives, a failed one must not wait
    for the others, and some commands let ranks > 0 end while rank 0 still writes results (experiment).
    """
    distributed = sys.modules.get("muvla.training.distributed")  # imported only by commands that may join one
    if distributed is not None:
        distributed.cleanup_distributed(wait_for_all=False)


if __name__ == "__main__":
    raise SystemExit(main())
