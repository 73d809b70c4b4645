"""Typed configs from nested mappings: YAML files, dotted ``key=value`` overrides, dataclass building.

Generic helpers of ``flowdppo.config``; an unknown key or a value of the wrong type raises ``ConfigError``
naming the dotted key. YAML is read without aliases (``*name``): a few bytes of nested aliases expand to
gigabytes ("billion laughs"), and a config never needs one.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from flowdppo.errors import ConfigError, cut, did_you_mean, require_file, shown


def merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, section by section."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    tree[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars / lists."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {shown(item)} must look like key=value (e.g. loss.kl_mask_threshold=1e-4)")
        _set_dotted(tree, key.strip(), load_yaml_text(raw, f"override {shown(item)}"))
    return tree


class AliasRefused(yaml.YAMLError):
    """An alias (``*name``) in a document read with ``NoAliasLoader``."""

    def __init__(self, anchor: str, mark) -> None:
        super().__init__(f"alias *{anchor}")
        self.anchor, self.mark = anchor, mark


class NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``), so a document never expands beyond its own size."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(event.anchor, event.start_mark)
        return super().compose_node(parent, index)


def load_yaml_text(text: str, where: str) -> Any:
    """``yaml.safe_load`` without aliases, every failure (bad syntax, an alias, a Python-object tag, absurd nesting,
    an integer of thousands of digits) as one line."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader: no Python objects
    except AliasRefused as err:
        raise ConfigError(
            f"{where}: YAML aliases are not accepted (*{cut(err.anchor, 40)} at line "
            f"{err.mark.line + 1}, column {err.mark.column + 1}); write the value out"
        ) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{line} ({problem})") from err
    except RecursionError as err:
        raise ConfigError(f"{where}: YAML nested too deeply") from err
    except ValueError as err:  # Python's int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise ConfigError(f"{where}: a value that cannot be read ({cut(str(err).partition(';')[0])})") from err


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in ``path``; a missing, unreadable, non-UTF-8 or invalid file is one line naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path} ({err.strerror or err})") from err
    return load_yaml_text(text, f"{what} {path}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation (int -> float allowed; 1e-4 strings from YAML parsed)."""
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {shown(value)}")
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return [_coerce(v, item_type, key) for v in value]
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {shown(value)}")


def build(cls: type, tree: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = did_you_mean(key, names, prefix)
            raise ConfigError(f"unknown config key {shown(dotted)}{hint}; allowed: {', '.join(names)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section of keys, got {shown(value)}")
            kwargs[key] = build(annotation, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, annotation, dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten_keys(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_yaml(config_file: str | Path | None) -> dict:
    if config_file is None:
        return {}
    path = require_file(config_file, "--config", "a YAML file of settings")
    tree = read_yaml_file(path, "--config") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys, got {type(tree).__name__}")
    return tree
