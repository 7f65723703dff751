"""Typed configs: YAML and flags in, validated dataclasses out, resolved YAML written next to outputs.

Every stage has one ``@dataclass`` config. Each field is declared with :func:`setting`, which
records its help text (what ``--help`` shows), its allowed values (checked once, when the config is
loaded) and whether it changes a stage's outputs or only how fast they are made (``runtime``, left
out of a stage's build record). A setting therefore has exactly one home: its field.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import platform
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value or input is missing, unknown or out of range (shown to the user as one line)."""


HELP = "help"
CHOICES = "choices"
RUNTIME = "runtime"
ALIASES = "aliases"


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None,
            runtime: bool = False, default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
            kw_only: bool | Any = dataclasses.MISSING, aliases: Mapping[str, Any] | None = None) -> Any:
    """A config field with its ``--help`` text, its allowed values and whether it only affects speed.

    ``runtime=True`` marks settings that never change what a stage writes (batch sizes, devices,
    threads, shards, progress bars): they are left out of the stage's build record, so changing
    them does not make the outputs look stale. ``aliases`` maps deprecated values to their current
    names, so old configs keep working while configs and build records only hold the current one.
    """
    metadata = {HELP: help, CHOICES: tuple(choices) if choices is not None else None, RUNTIME: runtime,
                ALIASES: dict(aliases or {})}
    kwargs: dict[str, Any] = {"metadata": metadata}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    if kw_only is not dataclasses.MISSING:
        kwargs["kw_only"] = kw_only
    return dataclasses.field(**kwargs)


def setting_aliases(cfg: Any) -> dict[str, dict[str, Any]]:
    """Setting name -> {deprecated value: current value} for every setting of ``cfg`` that has them
    (a build record written under an old name still describes the same output)."""
    return {f.name: dict(f.metadata[ALIASES]) for f in dataclasses.fields(cfg) if f.metadata.get(ALIASES)}


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get(HELP, ""))


def field_choices(f: dataclasses.Field) -> tuple[Any, ...] | None:
    return f.metadata.get(CHOICES)


def is_runtime(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(RUNTIME, False))


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, with a clear error on mismatch."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], name)
        return value
    if dataclasses.is_dataclass(annotation):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expects a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, where=name, validate=False)  # the owner's validate() checks it
    if origin in (list, tuple):
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expects a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, name) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expects a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expects true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or (annotation is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name}: expects {annotation.__name__}, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}: expects {annotation.__name__}, got {value!r}") from err
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expects a string, got {value!r}")
        return str(value)
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name}: expects a path, got {value!r}")
        return Path(value)
    return value


def _resolve_alias(value: Any, f: dataclasses.Field, name: str) -> Any:
    """A deprecated value -> its current name, with one warning line; any other value unchanged."""
    aliases = f.metadata.get(ALIASES) or {}
    if isinstance(value, str) and value in aliases:
        logger.warning("%s: %r is deprecated, it is now called %r", name, value, aliases[value])
        return aliases[value]
    return value


def _check_choices(value: Any, choices: tuple[Any, ...] | None, name: str) -> None:
    if choices is None or value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in choices]
    if bad:
        raise ConfigError(f"{name}: expected one of {', '.join(map(str, choices))}; got {bad[0]!r}")


def check_choices(obj: Any, where: str = "") -> None:
    """Every setting of ``obj`` declared with ``choices`` holds one of them (call from ``validate``);
    a deprecated alias is replaced by its current name first."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        value = _resolve_alias(getattr(obj, f.name), f, prefix + f.name)
        if value is not getattr(obj, f.name):
            setattr(obj, f.name, value)
        _check_choices(value, field_choices(f), prefix + f.name)


MIN_TEXT_LEN = 3  # [CLS] + one token + [SEP]


def check_max_text_len(value: int | None, name: str = "max_text_len") -> None:
    """The one ``max_text_len`` rule, for every config and collator that truncates text (None = decided
    later): the collators need room for [CLS], one token and [SEP]."""
    if value is not None and value < MIN_TEXT_LEN:
        raise ConfigError(f"{name} must be >= {MIN_TEXT_LEN} ([CLS] + a token + [SEP]), got {value}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", validate: bool = True) -> T:
    """Build dataclass ``cls`` from a dict: unknown keys and bad values are one-line errors.

    ``where`` is the dotted path of a nested section (for messages such as ``retrieval.k``); a
    nested section is type-checked here and validated by its owner's ``validate()`` (which knows,
    e.g., that the experiment sets the regions' image folder itself).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _resolve_alias(_coerce(value, hints[key], prefix + key), fields[key], prefix + key)
        _check_choices(kwargs[key], field_choices(fields[key]), prefix + key)
    missing = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"{cls.__name__}: missing required value(s) {', '.join(prefix + m for m in missing)} "
                          f"(flags {flags} or YAML keys)")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if validate and callable(check):
        check()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-YAML view of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def output_settings(cfg: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The settings of ``cfg`` that change what a stage writes (runtime fields left out). ``out`` is
    never one: it is where a stage writes, so a moved or copied output is still the same output."""
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if not is_runtime(f) and f.name != "out" and f.name not in exclude}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a syntax error is one line naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is unreadable: {err}") from err
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem})") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of settings at the top level")
    return loaded


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"`` (creating the nested mappings)."""
    target = data
    parts = key.split(".")
    for part in parts[:-1]:
        nested = target.setdefault(part, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        target = nested
    target[parts[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from an optional YAML file, then apply overrides (``None`` values are ignored).

    Override keys may be dotted (``retrieval.k``) to reach nested sections. A ``config.yaml`` written
    next to an output (:func:`save_config`) loads back as the config it records, so "rerun exactly
    what produced this" is ``--config <out>/config.yaml``.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    if path is not None and set(data) >= RECORD_KEYS:  # a config.yaml that save_config wrote next to an output
        if data["stage_config"] != cls.__name__:
            raise ConfigError(f"{path} records a {data['stage_config']}, not the {cls.__name__} this command takes")
        data = dict(data["config"] or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    return from_dict(cls, data)


RECORD_KEYS = frozenset({"stage_config", "config"})  # the keys save_config writes around the config


def save_config(cfg: Any, out_dir: str | Path, inputs: dict[str, Any] | None = None,
                name: str = "config.yaml") -> Path:
    """Record the resolved config, its inputs and the software versions next to a stage's outputs."""
    import muvla

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "stage_config": type(cfg).__name__,
        "config": to_dict(cfg),
        "inputs": to_dict(inputs or {}),
        "muvla_version": muvla.__version__,
        "python": platform.python_version(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / name
    if path.is_file():  # the same config again (a rerun): keep the file, and with it when it was first written
        try:
            old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            old = {}
        if all(old.get(k) == record[k] for k in ("stage_config", "config", "inputs", "muvla_version")):
            return path
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
