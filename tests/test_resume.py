"""Exact resume after a SIGKILL, and checkpoints that survive a kill at any point of their write.

Each trial runs ``flowdppo`` in a subprocess and kills it with SIGKILL at a random moment, as a cluster
scheduler or the OOM killer would. The default suite runs a few trials; ``-m slow`` runs many.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowdppo.checkpoint import complete_checkpoints, load_checkpoint

EPOCHS = 6
RUN = [
    "prompts_per_epoch=2",
    "group_size=4",
    "eval_samples_per_class=2",
    "eval_every=3",
    f"epochs={EPOCHS}",
    "checkpoint_every=1",
    "keep_checkpoints=2",
    "optim.minibatch_size=8",
]
SKIP = ["on_nonfinite=skip", "max_nonfinite_in_a_row=6", "reward.names=[user_rewards:sometimes_nan]"]
MODES = {"stop": [], "skip": SKIP}  # skip: some rollouts have NaN rewards and are skipped, counted in the rows
NONDETERMINISTIC = {"time_s"}


def flowdppo_train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # the tests' user rewards
    return subprocess.Popen(
        [sys.executable, "-m", "flowdppo", "train", "--no-progress", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


def deterministic_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in NONDETERMINISTIC} for row in rows]


@pytest.fixture(scope="module", params=list(MODES))
def reference(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """The mode (``on_nonfinite``) and the metric rows of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(flowdppo_train("--out", str(run_dir), *RUN, *MODES[request.param]))
    rows = deterministic_rows(run_dir)
    if request.param == "skip":
        assert 0 < rows[-1]["nonfinite_skipped"] < EPOCHS, "the trial must skip some rollouts, not all"
    return request.param, rows


def kill_and_resume(run_dir: Path, rng: random.Random, mode: str = "stop") -> int:
    """Start the run, SIGKILL it at a random moment after checkpoint ``k``, resume; returns ``k``."""
    after = rng.randint(1, EPOCHS - 2)
    process = flowdppo_train("--out", str(run_dir), *RUN, *MODES[mode])
    while not any(int(p.name.split("_")[1]) >= after for p in complete_checkpoints(run_dir / "checkpoints")):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.6))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finish(flowdppo_train("--resume", str(run_dir)))
    return after


def test_killed_and_resumed_run_gives_identical_metrics(reference, tmp_path):
    mode, rows = reference
    kill_and_resume(tmp_path / "run", random.Random(0), mode)
    assert deterministic_rows(tmp_path / "run") == rows


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(1, 6))
def test_killed_and_resumed_run_gives_identical_metrics_many_trials(reference, tmp_path, trial):
    mode, rows = reference
    kill_and_resume(tmp_path / "run", random.Random(trial), mode)
    assert deterministic_rows(tmp_path / "run") == rows


WRITER = """
import sys
from pathlib import Path

import torch

from flowdppo.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint


class Holder(torch.nn.Module):  # what checkpoints see of a fully fine-tuned policy: .transformer
    def __init__(self):
        super().__init__()
        self.transformer = torch.nn.Linear(512, 512)


root = Path(sys.argv[1])
policy, rng = Holder(), torch.Generator()
optimizer = torch.optim.AdamW(policy.parameters())
found = complete_checkpoints(root)
epoch = load_checkpoint(found[-1], policy, optimizer, rng)["epoch"] if found else 0
print("ready", flush=True)
while True:  # checkpoints as fast as possible, until killed
    epoch += 1
    policy.transformer.weight.grad = torch.ones_like(policy.transformer.weight)
    optimizer.step()
    with torch.no_grad():
        policy.transformer.weight.fill_(epoch)
    torch.randn(3, generator=rng)
    save_checkpoint(root / f"epoch_{epoch:06d}", policy, optimizer, rng, epoch, keep=2)
"""


def kill_writer_repeatedly(root: Path, kills: int, seed: int) -> list[int]:
    """Kill a checkpoint-writing loop ``kills`` times at random moments; after each kill every complete
    checkpoint must load and hold what was saved for its epoch. Returns the latest epoch after each kill."""
    rng, latest = random.Random(seed), []
    for _ in range(kills):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        found = complete_checkpoints(root)
        assert found, "no complete checkpoint after a kill"
        assert [p.name for p in found] == sorted(p.name for p in root.glob("epoch_*"))  # no partial epoch_* folder
        for directory in found:
            linear = torch.nn.Linear(512, 512)
            holder = torch.nn.Module()
            holder.transformer = linear
            optimizer = torch.optim.AdamW(holder.parameters())
            epoch = load_checkpoint(directory, holder, optimizer, torch.Generator())["epoch"]
            assert directory.name == f"epoch_{epoch:06d}"
            assert torch.equal(linear.weight, torch.full_like(linear.weight, epoch))
            assert optimizer.state_dict()["state"][0]["step"] == epoch
        latest.append(epoch)
    return latest


def test_latest_checkpoint_always_loads_after_kills_during_writes(tmp_path):
    latest = kill_writer_repeatedly(tmp_path / "checkpoints", kills=4, seed=0)
    assert latest == sorted(latest) and latest[-1] > latest[0]  # each restart went on from the last checkpoint


@pytest.mark.slow
def test_latest_checkpoint_always_loads_after_kills_during_writes_many_trials(tmp_path):
    latest = kill_writer_repeatedly(tmp_path / "checkpoints", kills=25, seed=1)
    assert latest == sorted(latest)
