"""Typed stage configs: YAML in, resolved YAML out.

Every stage has one ``@dataclass`` config. A user may pass a YAML file and command-line overrides;
the resolved config is written next to the stage outputs together with the inputs it read.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range."""


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
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return from_dict(annotation, value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {name!r} expects a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, name) for v in value]
        return items if origin is list else tuple(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config field {name!r} expects true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config field {name!r} expects {annotation.__name__}, got {value!r}") from err
    if annotation is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys (typos must not pass silently)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], k) for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"{cls.__name__}: missing required value(s) {missing} (flags {flags} or YAML keys)")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-YAML view of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from an optional YAML file, then apply overrides (``None`` values are ignored).

    Override keys may be dotted (``retrieval.k``) to reach nested stage configs.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return from_dict(cls, data)


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
