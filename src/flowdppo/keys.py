"""Every config key ``load_config`` accepts, read from the dataclasses and the registries (plugins' sections too).

    from flowdppo.keys import all_keys, find, reference_markdown
    find("sampler.num")        # [Key(name="sampler.num_steps", type="int", default="10", ...)]

A key's doc is the docstring under its field (the attribute-docstring convention of the sections), its allowed
values the section's ``choices()`` (what its ``check`` enforces), and who reads it comes from the registries: an
algorithm's ``sections`` and ``reads``, a task's options section, else every run.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
import typing
from dataclasses import dataclass
from functools import cache

from flowdppo.config import RunConfig, algorithm_reads, algorithm_sections, section_types, train_config_type
from flowdppo.errors import ConfigError, cut, did_you_mean, shown
from flowdppo.settings import ALGORITHMS, TASKS, Section

RUN = "run"  # the section name of the run's own (top-level) keys


@dataclass(frozen=True)
class Key:
    """One config key: dotted ``name`` (run keys bare), its type, the repr of its default, allowed values
    (empty: free), its docstring, its section and who reads it."""

    name: str
    type: str
    default: str
    choices: tuple[str, ...]
    doc: str
    section: str
    read_by: str


@cache
def _class_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it in ``cls``'s own source (not its bases')."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class made at run time)
        return {}
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in itertools.pairwise(body):
        text = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(text, str):
            docs[node.target.id] = inspect.cleandoc(text)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, a subclass's over its bases'."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_class_docs(klass))
    return docs


def _type_name(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _default(f: dataclasses.Field) -> str:
    return repr(f.default_factory() if f.default is dataclasses.MISSING else f.default)


def read_by(section: str, name: str) -> str:
    """Who reads the key ``name`` of ``section``: the algorithms that read it (a section an algorithm declares),
    the task whose options section it is, else every run."""
    if section in algorithm_sections():
        readers = [a for a, cls in ALGORITHMS.items() if algorithm_reads(cls, name)]
        return f"algorithm{'s' if len(readers) > 1 else ''} {', '.join(readers)}"
    if section in TASKS:
        return f"task {section}"
    return "every run"


def _keys(cls: type, section: str, prefix: str) -> list[Key]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    choices = cls.choices() if issubclass(cls, Section) else {}
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):  # a nested section
            keys += _keys(hints[f.name], section, f"{name}.")
            continue
        allowed = tuple(str(value) for value in choices.get(f.name, ()))
        doc = docs.get(f.name, "")
        keys.append(Key(name, _type_name(f.type), _default(f), allowed, doc, section, read_by(section, name)))
    return keys


def all_keys() -> list[Key]:
    """Every key ``load_config`` accepts: the run's own, then each section's in ``TrainConfig``'s order."""
    train_config_type()  # raises a plugin that failed to import
    keys = _keys(RunConfig, RUN, "")
    for section, cls in section_types().items():
        keys += _keys(cls, section, f"{section}.")
    return keys


def find(prefix: str) -> list[Key]:
    """The keys whose dotted name starts with ``prefix`` (``"sampler."``: the sampler's)."""
    return [key for key in all_keys() if key.name.startswith(prefix)]


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def section_doc(section: str) -> str:
    """The docstring of a section's class (the run's: ``RunConfig``)."""
    cls = RunConfig if section == RUN else section_types()[section]
    return inspect.cleandoc(cls.__doc__) if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(") else ""


def reference_markdown() -> str:
    """The config reference as a Markdown page: one table per section, every key with its type, default, allowed
    values, who reads it and its docstring."""
    lines = [
        "# Config reference",
        "",
        "Every key `flowdppo train` accepts, in a YAML file (`--config`, sections nested) or on the command line",
        "(`key=value`, dotted: `sampler.num_steps=20`). Generated from the code (`flowdppo.keys`); the same list",
        "is in the terminal: `flowdppo config` (all keys), `flowdppo config sampler.` (a section),",
        "`flowdppo config sampler.num_steps` (one key in full).",
    ]
    keys = all_keys()
    for section in dict.fromkeys(key.section for key in keys):
        lines += ["", f"## {section}", ""]
        if doc := section_doc(section):
            lines += [_cell(doc), ""]
        lines += ["| Key | Type | Default | Allowed values | Read by | Description |", "|---|---|---|---|---|---|"]
        for key in (k for k in keys if k.section == section):
            allowed = ", ".join(_code(c) for c in key.choices)
            cells = (_code(key.name), _code(key.type), _code(key.default), allowed, key.read_by, key.doc)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summary(doc: str, limit: int = 90) -> str:
    """The first sentence of ``doc`` on one line, cut to ``limit`` characters."""
    text = " ".join(doc.split())
    return cut(re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0], limit)


def listing(keys: list[Key]) -> str:
    """One line a key: name, type, default and the first sentence of its doc, in aligned columns."""
    defaults = [cut(key.default, 24) for key in keys]
    name_width = max(len(key.name) for key in keys)
    type_width = max(len(key.type) for key in keys)
    default_width = max(map(len, defaults))
    return "\n".join(
        f"{key.name:<{name_width}}  {key.type:<{type_width}}  {default:<{default_width}}  {summary(key.doc)}"
        for key, default in zip(keys, defaults, strict=True)
    )


def described(key: Key) -> str:
    """One key in full: type, default, allowed values, who reads it and its whole doc."""
    rows = [("type", key.type), ("default", key.default)]
    rows += [("allowed", ", ".join(key.choices))] if key.choices else []
    rows += [("read by", key.read_by)]
    paragraphs = [textwrap.fill(" ".join(part.split()), 100) for part in key.doc.split("\n\n")]
    return "\n".join([key.name, *(f"  {label + ':':<9}{value}" for label, value in rows), "", *paragraphs])


def lookup(query: str) -> str:
    """``flowdppo config QUERY``: one key in full, the keys under a prefix, or every key (``""``); an unknown one
    raises ``ConfigError`` with the closest key."""
    keys = all_keys()
    exact = [key for key in keys if key.name == query]
    if exact:
        return described(exact[0])
    matching = find(query)
    if not matching:
        raise ConfigError(
            f"config: no key {shown(query)}{did_you_mean(query, [key.name for key in keys])}; "
            "flowdppo config lists every key"
        )
    return listing(matching)


__all__ = ["Key", "all_keys", "described", "field_docs", "find", "listing", "lookup", "read_by", "reference_markdown"]
