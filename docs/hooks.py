"""MkDocs hooks: the pages generated at build time, so that they cannot drift from the code.

- ``reference/config.md``: every config key, from ``flowdppo.keys.reference_markdown()`` (the same source as
  ``flowdppo config``);
- ``reference/cli.md``: the help of every command, from the parser ``flowdppo.cli.build_parser`` builds;
- ``digitsbench/``: the committed DigitsBench reports and plots of ``benchmarks/digitsbench/``, as they are, each
  preset's report added to the nav under ``BENCH_NAV``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "digitsbench"
BENCH_NAV = "DigitsBench reports"  # the nav section that lists every preset's report
BENCH_REPORT = "REPORT.md"
GENERATED_PAGES = ("reference/config.md", "reference/cli.md")
HELP_COLUMNS = "100"  # the width argparse wraps the help to, whatever the terminal


def bench_files() -> dict[str, Path]:
    """Site path -> file, for each DigitsBench report and plot (a preset's NOTES.md is part of its report)."""
    return {
        f"digitsbench/{path.relative_to(BENCH).as_posix()}": path
        for path in sorted(BENCH.rglob("*"))
        if path.is_file() and (path.name == BENCH_REPORT or path.suffix == ".png")
    }


def generated_pages() -> list[str]:
    """Every page the hook adds (what the nav may name beside the files under docs/)."""
    return [*GENERATED_PAGES, *(uri for uri in bench_files() if uri.endswith(".md"))]


def config_page() -> str:
    from flowdppo.keys import reference_markdown

    return reference_markdown()


def _commands(parser: argparse.ArgumentParser) -> list[tuple[argparse.ArgumentParser, str]]:
    """``(parser, help)`` of ``parser`` and of each of its subcommands, depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((sub, helps.get(name, "")))
                found += _commands(sub)
    return found


def cli_page() -> str:
    from flowdppo.cli import build_parser

    parser = build_parser()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        parts = [
            "# Command line\n\n"
            "Every command's `--help`, generated from the parser when this site is built. Errors a user can fix end "
            "in one line and exit code 2 (130 when interrupted); `--debug` anywhere on the command line shows the "
            "traceback instead.\n",
            f"## flowdppo\n\n```text\n{parser.format_help()}```\n",
        ]
        for sub, text in _commands(parser):
            parts.append(f"## {sub.prog}\n\n{text[:1].upper() + text[1:]}.\n\n```text\n{sub.format_help()}```\n")
    finally:
        if previous is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def on_config(config):
    """List each preset's report in the nav, after the page over all presets."""
    presets = [
        {path.parent.name: f"digitsbench/{path.parent.name}/{BENCH_REPORT}"}
        for path in sorted(BENCH.glob(f"*/{BENCH_REPORT}"))
    ]
    for item in config.nav:
        if isinstance(item, dict) and BENCH_NAV in item:
            item[BENCH_NAV] = [*item[BENCH_NAV], *presets]
    return config


def on_files(files, config):
    from mkdocs.structure.files import File  # here: the tests read this module without mkdocs installed

    files.append(File.generated(config, "reference/config.md", content=config_page()))
    files.append(File.generated(config, "reference/cli.md", content=cli_page()))
    for uri, path in bench_files().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
