"""The documentation site: its pages exist, its commands and keys are the CLI's, and it builds with --strict."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowdppo.cli import build_parser
from flowdppo.config import load_config
from flowdppo.keys import all_keys
from flowdppo.rewards.registry import REWARDS

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages(nav) -> list[str]:
    """Every page the nav of mkdocs.yml names."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def test_every_page_in_the_nav_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    generated = set(load_hooks().generated_pages())
    pages = nav_pages(config["nav"])
    assert "reference/config.md" in pages and "reference/cli.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file() and page not in generated]
    assert not missing, f"pages in mkdocs.yml's nav that neither docs/ holds nor docs/hooks.py generates: {missing}"
    assert "digitsbench/single/REPORT.md" in generated  # a preset's committed report is on the site


def test_readme_sections_the_pages_include_are_marked():
    readme = (ROOT / "README.md").read_text()
    included = {name for page in PAGES for name in re.findall(r'--8<-- "README\.md:(\w+)"', page.read_text())}
    assert {"commands", "methods"} <= included
    for name in included:
        assert f"--8<-- [start:{name}]" in readme and f"--8<-- [end:{name}]" in readme, name


def test_every_built_in_reward_is_in_the_rewards_guide():
    guide = (DOCS / "guides" / "rewards.md").read_text()
    assert not [name for name in REWARDS if f"`{name}`" not in guide]


def shell_commands(path: Path) -> list[list[str]]:
    """The ``flowdppo`` command lines of the bash blocks of ``path``, as tokens from the subcommand on."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if "FLOWDPPO_PLUGINS" in line or "flowdppo" not in tokens:  # a plugin's keys are not built in
                continue
            found.append(tokens[tokens.index("flowdppo") + 1 :])
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_option_and_key_the_docs_show_exists(tmp_path, monkeypatch):
    keys = {key.name for key in all_keys()}
    monkeypatch.chdir(tmp_path)  # files the guides' earlier commands write (make-pairs' pairs.jsonl) stand here
    commands = subparsers(build_parser())
    checked = 0
    for path in [ROOT / "README.md", *PAGES]:
        for tokens in shell_commands(path):
            where = f"{path.relative_to(ROOT)}: flowdppo {' '.join(tokens)}"
            assert tokens[0] in commands, where
            parser = commands[tokens[0]]
            rest = tokens[1:]
            if tokens[0] == "digits":
                parser, rest = subparsers(parser)[tokens[1]], tokens[2:]
            for token in rest:
                option = token.split("=")[0]
                if token.startswith("--"):
                    assert option in parser._option_string_actions, f"{where}: no option {option}"
                elif "=" in token:
                    assert option in keys, f"{where}: no key {option}"
            recipe = rest[rest.index("--config") + 1] if "--config" in rest else ""
            if recipe.startswith("examples/"):  # the shipped recipes (my.yaml: the reader's own)
                assert (ROOT / recipe).is_file(), where
            if tokens[0] == "train" and not {"--config", "--resume", "..."} & set(rest):
                method = rest[rest.index("--method") + 1] if "--method" in rest else None
                for value in (t.split("=", 1)[1] for t in rest if t.startswith("dpo.pairs_file=")):
                    Path(value).touch()  # written by the page's make-pairs line before it
                load_config(method, None, [t for t in rest if "=" in t and not t.startswith("--")])
            checked += 1
    assert checked > 40  # the guides' commands were found


@pytest.mark.slow  # CI builds the site itself after the tests (.ci/run); this is the same build, from pytest
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason='mkdocs not installed (pip install ".[docs]")')
def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["NO_MKDOCS_2_WARNING"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "site"
    assert "sampler.num_steps" in (site / "reference" / "config" / "index.html").read_text()
    assert "flowdppo reward-server" in (site / "reference" / "cli" / "index.html").read_text()
    assert "flow_dppo_loss" in (site / "reference" / "api" / "losses" / "index.html").read_text()
    assert (site / "digitsbench" / "single" / "frontier.png").is_file()
