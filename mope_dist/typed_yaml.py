"""Typed dataclasses from untyped YAML, with where every key was set (the YAML file or the command
line), so that a wrong value is reported in one line as `key in SOURCE: ...`."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from mope_dist.errors import ConfigError


def _check_value(value: Any, tp: Any, key: str, source: str | dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key} in {source_of(source, key)}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{key} in {source_of(source, key)}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} in {source_of(source, key)}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {source_of(source, key)}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key} in {source_of(source, key)}: expected {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build(cls: type, data: Any, prefix: str, source: str | dict[str, str]):
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix or 'config'} in {source_of(source, prefix)}: expected a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key {full} in {source_of(source, full)} (known keys here: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _check_value(data[f.name], hints[f.name], full, source)
    return cls(**kwargs)


def source_of(source: str | dict[str, str], key: str) -> str:
    """Where `key` (or the nearest section above it) was set: an override wins over the file."""
    if isinstance(source, str):
        return source
    for set_key, where in source.items():
        if set_key.startswith(f"{key}."):
            return where
    while key:
        if key in source:
            return source[key]
        key = key.rsplit("[", 1)[0] if key.endswith("]") else key.rpartition(".")[0]
    return source.get("", "defaults")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} on the command line: expected section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value
