"""Settings sections and the registries the parts fill: each part declares its keys beside its code.

A section is a dataclass of typed fields, a docstring under each, whose ``check(prefix)`` raises ``ConfigError``
naming ``prefix + key`` for a value out of range. The parts register themselves when imported (the package imports
the built-in ones, ``FLOWDPPO_PLUGINS`` names others); ``flowdppo.config`` composes ``TrainConfig`` from what is
registered and runs the checks that span parts:

    register_section("sampler", SamplerConfig)                      # samplers.py
    register_algorithms({"awm": AWM})                               # algorithms/__init__.py: one line an algorithm
    register_task("digits", "flowdppo.tasks.digits.task:DigitsTask", DigitsConfig, {"digits_upsample": "upsample"})

An algorithm class brings its sections (``sections = {"nft": NFTConfig}``) and its method presets
(``presets = {"diffusion_nft": {...}}``: a tree of keys over the defaults, ``--method NAME``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import fields
from typing import Any

from flowdppo.errors import ConfigError, did_you_mean, shown

PLUGINS_VARIABLE = "FLOWDPPO_PLUGINS"  # comma-separated modules imported with the built-in parts

SECTIONS: dict[str, type] = {}  # top-level key -> its section's dataclass
ALIASES: dict[str, list[tuple[str, str]]] = {}  # a top-level key of an older release -> [(section, key)] now
ALGORITHMS: dict[str, type] = {}  # algorithm name -> its class
PRESETS: dict[str, dict[str, Any]] = {}  # --method name -> keys over the defaults (with "algorithm")
TASKS: dict[str, str] = {}  # task name -> "module:Class", imported when the task is loaded
PLUGIN_ERRORS: list[str] = []  # plugins that did not import, raised when a config is built
_version = [0]  # bumped by every registration: config recomposes TrainConfig


class Section:
    """Base of a settings section (a dataclass): ``check`` validates its own values; ``choices`` names the keys
    with a fixed set of values (``check_choices`` checks them; ``flowdppo config`` lists them)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        """Key -> its allowed values (a list key: of its items), read when called (a registry may have grown)."""
        return {}

    def check_choices(self, prefix: str) -> None:
        """Every key of ``choices`` holds one of its values (``require_choice``)."""
        for key, allowed in self.choices().items():
            require_choice(self, prefix, key, allowed)

    def check(self, prefix: str) -> None:
        """Raise ``ConfigError`` naming ``prefix + key`` for a value out of range; the choices by default."""
        self.check_choices(prefix)


def require(section: Any, prefix: str, rule: str, *keys: str) -> None:
    """Range rules for numeric keys: ``"> 0"``, ``">= 0"`` or ``"in [0, 1]"`` (a decay, a fraction)."""
    tests = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}
    for key in keys:
        value = getattr(section, key)
        if not tests[rule](value):
            raise ConfigError(f"{prefix}{key}: must be {rule}, got {shown(value)}")


def require_choice(section: Any, prefix: str, key: str, allowed: tuple | list) -> None:
    """``key`` must be one of ``allowed`` (a list: each of its items)."""
    value = getattr(section, key)
    for item in value if isinstance(value, list) else [value]:
        if item not in allowed:
            raise ConfigError(
                f"{prefix}{key}: must be one of {', '.join(map(str, allowed))}; got {shown(item)}"
                f"{did_you_mean(item, allowed)}"
            )


def _register(registry: dict, name: str, value: Any, what: str) -> None:
    if name in registry and registry[name] is not value:
        raise ConfigError(f"{what} {name!r} is registered twice; give the second one another name")
    registry[name] = value
    _version[0] += 1


def register_section(name: str, section: type, aliases: dict[str, str] | None = None) -> None:
    """Add the top-level section ``name``; ``aliases`` maps top-level keys of older releases to its keys."""
    if not issubclass(section, Section) or not fields(section):
        raise ConfigError(f"section {name!r}: {section.__name__} must be a dataclass subclassing settings.Section")
    _register(SECTIONS, name, section, "config section")
    for old, key in (aliases or {}).items():
        ALIASES.setdefault(old, []).append((name, key))


def register_algorithms(algorithms: dict[str, type]) -> dict[str, type]:
    """Add algorithms by name, with their sections and method presets; returns ``algorithms``."""
    for name, algorithm in algorithms.items():
        _register(ALGORITHMS, name, algorithm, "algorithm")
        for section_name, section in getattr(algorithm, "sections", {}).items():
            register_section(section_name, section)
        for method, tree in getattr(algorithm, "presets", {}).items():
            _register(PRESETS, method, {"algorithm": name, **tree}, "method preset")
    return algorithms


def register_task(name: str, target: str, section: type | None = None, aliases: dict[str, str] | None = None) -> None:
    """Add the task ``name`` (``"module:Class"``, imported when loaded) and its options section of the same name."""
    _register(TASKS, name, target, "task")
    if section is not None:
        register_section(name, section, aliases)


def version() -> int:
    """Changes whenever something registers (``config`` composes its dataclass anew)."""
    return _version[0]


def load_plugins(value: str | None = None) -> None:
    """Import the modules named in ``FLOWDPPO_PLUGINS`` (comma-separated): each registers what it adds. A module
    that does not import is remembered in ``PLUGIN_ERRORS`` (``check_plugins`` raises it as one line) rather than
    failing the import of the package."""
    for module in filter(None, (part.strip() for part in (value or os.environ.get(PLUGINS_VARIABLE, "")).split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            PLUGIN_ERRORS.append(
                f"{PLUGINS_VARIABLE}: cannot import {module!r} ({err}); fix the module name or PYTHONPATH"
            )


def check_plugins() -> None:
    """Raise the first plugin that failed to import as a ``ConfigError``."""
    if PLUGIN_ERRORS:
        raise ConfigError(PLUGIN_ERRORS[0])


__all__ = [
    "ALGORITHMS",
    "PRESETS",
    "SECTIONS",
    "TASKS",
    "Section",
    "load_plugins",
    "register_algorithms",
    "register_section",
    "register_task",
    "require",
    "require_choice",
]
