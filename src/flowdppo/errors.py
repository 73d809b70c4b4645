"""Errors the user can act on. The CLI prints them as one line and exits with code 2 (``--debug`` for the traceback).

Helpers for their messages: ``shown`` (a value echoed in a message, cut to a readable length), ``cut`` (text cut to
a length), ``did_you_mean`` (the closest known name) and ``require_file`` (a file, not missing, not a folder).
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from pathlib import Path

SHOWN = reprlib.Repr()  # the repr of a value echoed in a message: long strings and lists cut with "..."
SHOWN.maxstring = SHOWN.maxother = 80
SHOWN.maxlist = SHOWN.maxtuple = SHOWN.maxdict = SHOWN.maxset = 8
SHOWN.maxlevel = 3


class FlowDPPOError(Exception):
    """Base of every error that says what to fix."""


class ConfigError(FlowDPPOError, ValueError):
    """A configuration or input problem: the message names the key and what is allowed."""


class RewardError(FlowDPPOError, ValueError):
    """A reward could not be loaded, or returned something other than one finite score per image."""


class ConsistencyError(FlowDPPOError, RuntimeError):
    """The replayed policy does not reproduce the rollout policy before any update."""


class NonFiniteError(FlowDPPOError, FloatingPointError):
    """A reward, advantage, loss or gradient norm was NaN or infinite (and was not trained on)."""


class CheckpointError(FlowDPPOError, ValueError):
    """A checkpoint file is missing, truncated, malformed or does not fit the run."""


class StallError(FlowDPPOError, RuntimeError):
    """Training went ``stall_epochs`` epochs in a row without a learning signal or without moving the policy."""


def shown(value: object) -> str:
    """``repr(value)``, long strings and containers cut with ``...`` (a message stays one readable line)."""
    return SHOWN.repr(value)


def cut(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters with ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(name: object, names: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean PREFIX+X?)`` for the known name X closest to ``name``, or "" if none is close."""
    close = difflib.get_close_matches(str(name), [str(n) for n in names], n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def require_file(path: str | Path, option: str, expected: str) -> Path:
    """``path`` as a ``Path`` if it is a file; else a ``ConfigError`` naming ``option``: no such file, or a folder
    where ``expected`` (e.g. "a .txt or .jsonl prompt file") was asked for."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; give {expected}")
    if not path.is_file():
        raise ConfigError(f"{option}: no such file {shown(str(path))}; give {expected}")
    return path
