"""The evaluation protocol's result (``protocol.py``): the JSON file, read back with its checks, and the table
``flowdppo eval`` prints (``eval --report FILE.json`` again, from the file alone)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from flowdppo.errors import ConfigError
from flowdppo.files import write_text_atomic
from flowdppo.protocol_stats import excludes_zero

RESULT_FORMAT = "flowdppo-eval-protocol/1"
RESULT_KEYS = ("format", "run", "protocol", "prompts", "scores", "summary")


def write_result(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    # a list of numbers on one line (a prompt's K scores, not one line per score)
    text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    write_text_atomic(path, text + "\n")
    return path


def load_result(path: Path) -> dict:
    """A result written by ``write_result``; anything else is one ``ConfigError`` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--report: no such file {str(path)!r}")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--report: {path} is not a flowdppo eval result (not JSON: {err})") from err
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT:
        raise ConfigError(f'--report: {path} is not a flowdppo eval result (no "format": "{RESULT_FORMAT}")')
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise ConfigError(f"--report: {path} is not a complete eval result (missing {', '.join(missing)})")
    try:
        format_table(result)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise ConfigError(f"--report: {path} is a damaged eval result ({type(err).__name__}: {err})") from err
    return result


# --------------------------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------------------------


def row_decimals(difference: dict[str, float]) -> int:
    """Decimals for a reward's row: 4, or enough (up to 8) to show two digits of the difference's CI width."""
    width = difference["high"] - difference["low"]
    return 4 if width <= 0 else int(min(8, max(4, 1 - np.floor(np.log10(width)))))


def format_interval(interval: dict[str, float], decimals: int = 4, signed: bool = False) -> str:
    spec = f"{'+' if signed else ''}.{decimals}f"
    return f"{interval['mean']:{spec}} [{interval['low']:{spec}}, {interval['high']:{spec}}]"


def format_table(result: dict) -> str:
    """The protocol in three lines, then per reward: base and trained means and the paired difference with their
    bootstrap CIs (``*``: the difference's CI excludes 0). A function of the saved result alone."""
    p = result["protocol"]
    boot = p["bootstrap"]
    model, adapter = p["model"], p["adapter"]
    short = lambda digest: (digest or "unknown")[:12]  # noqa: E731
    lines = [
        f"run {result['run']} ({p['method']}), seed {p['seed']}",
        f"prompts {p['prompts_file']} ({p['prompts_count']} prompts, sha256 {short(p['prompts_sha256'])}) x "
        f"{p['samples_per_prompt']} samples; {p['sampler']} {p['steps']} steps, CFG {p['guidance_scale']:g}, "
        f"{p['resolution']} px",
        f"model {model['model']} (sha256 {short(model['sha256'])}), adapter sha256 {short(adapter['sha256'])}; "
        + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
        f"mean over prompts [{boot['confidence']:.0%} bootstrap CI, {boot['resamples']:,} resamples of prompts]",
        "",
    ]
    rows = [("reward", "base", "trained", "trained - base")]
    for name, stats in result["summary"].items():
        mark = " *" if excludes_zero(stats["difference"]) else ""
        decimals = row_decimals(stats["difference"])
        rows.append(
            (
                name,
                format_interval(stats["base"], decimals),
                format_interval(stats["trained"], decimals),
                format_interval(stats["difference"], decimals, signed=True) + mark,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append("* the difference's CI excludes 0")
    return "\n".join(lines)
