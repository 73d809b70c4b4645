"""The library examples of the documentation run as written; CI runs the README's commands."""

import re
from pathlib import Path

from flowdppo.losses import LOSSES

ROOT = Path(__file__).parents[1]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def test_extending_guide_python_examples_run(capsys):
    first, extending, plugin, *_ = code_blocks(ROOT / "docs" / "guides" / "extending.md", "python")
    # the algorithm example is the plugin tests/test_new_algorithm.py trains (the file but its docstring)
    assert plugin in (Path(__file__).parent / "plugins" / "rwr_algorithm.py").read_text()
    exec(compile(first, "extending.md", "exec"), {})
    assert capsys.readouterr().out.startswith("tensor(")
    namespace = {}
    try:
        exec(compile(extending, "extending.md", "exec"), namespace)  # registers a loss and trains with it
    finally:
        LOSSES.pop("symmetric_mask", None)
    row = namespace["run"].rows()[-1]
    assert "ratio_mean" not in row and 0 <= row["masked_fraction"] <= 1  # the new loss's metrics, not DPPO's
    assert namespace["cfg"].loss.loss_mode == "symmetric_mask"


def test_ci_runs_the_readmes_test_and_docs_commands_as_written():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for block in code_blocks(ROOT / "README.md", "bash") for line in block.splitlines()]
    test = next(line for line in commands if line.endswith("&& .venv/bin/pytest"))
    docs = next(line for line in commands if "mkdocs build" in line)
    assert test in ci and docs in ci
    assert ci.index(test) < ci.index(docs)  # the docs extra installs into the venv the tests made
