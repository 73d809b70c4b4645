"""A new algorithm is one file plus one registry line, with nothing to edit in the package: reward-weighted
regression in ``tests/plugins/rwr_algorithm.py`` (its settings section, checks, preset and ``register_algorithms``
line inside) trains through ``flowdppo train`` as a user runs it and through ``flowdppo compare``."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowdppo import settings
from flowdppo.cli import main
from flowdppo.config import load_config

PLUGINS = Path(__file__).resolve().parent / "plugins"
TINY = ["epochs=6", "eval_every=3", "prompts_per_epoch=10", "group_size=8", "eval_samples_per_class=5"]


def flowdppo(args: list[str], plugins: str = "rwr_algorithm") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        settings.PLUGINS_VARIABLE: plugins,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "flowdppo", *args], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture
def registered_rwr(monkeypatch):
    """The plugin registered in this process (and in compare's worker processes, through the environment); the
    registries as they were afterwards."""
    saved = {name: dict(getattr(settings, name)) for name in ("SECTIONS", "ALGORITHMS", "PRESETS")}
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv(settings.PLUGINS_VARIABLE, "rwr_algorithm")
    sys.modules.pop("rwr_algorithm", None)
    importlib.import_module("rwr_algorithm")
    yield
    sys.modules.pop("rwr_algorithm", None)
    for name, value in saved.items():
        getattr(settings, name).clear()
        getattr(settings, name).update(value)
    settings._version[0] += 1


def test_a_plugin_algorithm_trains_through_flowdppo_train(tmp_path):
    out = tmp_path / "run"
    done = flowdppo(["train", "--method", "rwr", "--out", str(out), "--no-progress", *TINY])
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["algorithm"] == "rwr" and saved["rwr"] == {"temperature": 0.5, "train_timesteps": 4}
    base = json.loads((out / "base_eval.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval/accuracy"] > base["eval/accuracy"] + 0.05  # measured: 0.56 -> 0.72 in 6 epochs


def test_a_plugin_checks_its_own_section_and_is_unknown_without_it():
    bad = flowdppo(["train", "--method", "rwr", "rwr.temperature=0"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "flowdppo: error: rwr.temperature: must be > 0, got 0.0"
    missing = flowdppo(["train", "--method", "rwr"], plugins="")
    assert missing.returncode == 2 and "method: must be one of flow_dppo" in missing.stderr
    typo = flowdppo(["train"], plugins="no_such_plugin")
    assert typo.returncode == 2 and "FLOWDPPO_PLUGINS: cannot import 'no_such_plugin'" in typo.stderr


def test_a_plugin_algorithm_runs_in_flowdppo_compare(tmp_path, registered_rwr):
    assert load_config("rwr").rwr.train_timesteps == 4
    out = tmp_path / "bench"
    args = ["compare", "--preset", "smoke", "--methods", "rwr,flow_dppo", "--seeds", "1", "--out", str(out)]
    assert main([*args, "epochs=2", "group_size=4", "eval_every=1"]) == 0
    report = (out / "REPORT.md").read_text()
    assert "| rwr |" in report and "| flow_dppo |" in report
    rows = json.loads((out / "results.json").read_text())["arms"]["rwr"]["seeds"]["0"]["rows"]
    assert len(rows) == 2 and all(0 <= r["reward_mean"] <= 1 for r in rows)
