"""Typed dataclasses from YAML: values coerced to each field's type, unknown keys and wrong types
errors that name the dotted field, dotted `a.b=value` overrides (fwl_scale/config.py's machinery)."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and field."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; users write it that way.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = coerce(v, hints[k], f"{where}.{k}" if where else k)
    obj = cls(**kwargs)
    return obj


def parse_override(item: str, source: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"{source}: override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: override {key}: cannot parse {raw!r}: {e}") from None
    return key.strip().split("."), value


def merge_override(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {} if p not in node or node[p] is None else node[p]
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {'.'.join(path)}: {p} is not a section")
        node = node[p]
    node[path[-1]] = value


def read_yaml(path: Path, what: str = "config file", error: type[ConfigError] = ConfigError) -> Any:
    """The parsed YAML of `path`; a missing file or malformed YAML raises `error` naming the file."""
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: malformed YAML: {e}") from None
