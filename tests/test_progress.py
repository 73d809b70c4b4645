"""Status lines while nothing else shows progress (``progress.py``): ``flowdppo eval RUN`` names each policy it
evaluates, a pipeline load names the model, on a terminal only (a log or a pipe keeps one line per error), and
``train --no-progress`` turns them off."""

from __future__ import annotations

import sys

import pytest
from tiny_pipelines import digits_run, save_tiny_pipeline

from flowdppo import progress
from flowdppo.cli import main
from flowdppo.policies.pipelines import load_pipeline_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_says_which_policy_it_evaluates_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    run, _ = digits_run(tmp_path)
    assert main(["eval", str(run), "--per-class", "2"]) == 0
    assert capsys.readouterr().err == ""  # not a terminal: nothing
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["eval", str(run), "--per-class", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "flowdppo: evaluating the base policy (2 samples per class) ...",
        "flowdppo: evaluating the trained policy (2 samples per class) ...",
    ]


def test_a_pipeline_load_is_named_and_quiet_silences_it(tmp_path, capsys, monkeypatch):
    model = save_tiny_pipeline("sd3", tmp_path / "sd3")
    capsys.readouterr()  # (transformers' own bars, while saving and loading: not ours)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # stderr as a terminal (pytest's capture is not one)
    load_pipeline_policy(str(model), 32, None, "cpu")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowdppo")]
    assert lines == [f"flowdppo: loading the StableDiffusion3Pipeline {model} ..."]
    with progress.quiet():
        load_pipeline_policy(str(model), 32, None, "cpu")
    assert "flowdppo" not in capsys.readouterr().err
    (tmp_path / "a_file").write_text("not a folder")
    assert main(["train", "--no-progress", "--out", str(tmp_path / "a_file")]) == 2  # stopped inside train
    load_pipeline_policy(str(model), 32, None, "cpu")  # quiet only while train ran
    assert "flowdppo: loading the" in capsys.readouterr().err
