"""Experiment trackers: what TensorBoard and W&B (offline) wrote, read back; resume into the same W&B run."""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowdppo.checkpoint import complete_checkpoints
from flowdppo.cli import main

RUN = [
    "prompts_per_epoch=2",
    "group_size=4",
    "eval_samples_per_class=2",
    "optim.minibatch_size=8",
    "epochs=4",
    "eval_every=2",
    "checkpoint_every=2",
    "logging.backends=[tensorboard,wandb]",
    "logging.tags=[smoke]",
]


def wandb_records(run_file):
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir, wait_s: float = 30.0):
    """``{step: {key: value}}`` and the run record of each offline W&B run in the folder. W&B's service process
    writes the file on its own: on a loaded machine the run record can land after ``finish`` returns, so a file
    without it is read again, for up to ``wait_s`` seconds."""
    runs = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (run_file,) = folder.glob("run-*.wandb")
        deadline = time.monotonic() + wait_s
        while True:
            history, run = {}, None
            for record in wandb_records(run_file):
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    history.setdefault(items["_step"], {}).update(items)
                elif record.WhichOneof("record_type") == "run":
                    run = record.run
            if run is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        runs[folder] = (run, history)
    return runs


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_trackers_hold_every_row_the_config_and_the_grids_and_a_resumed_run_continues_them(tmp_path, offline):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *RUN]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = yaml.safe_load((run / "config.yaml").read_text())

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("reward_mean")] == pytest.approx([r["reward_mean"] for r in rows])
    assert [e.step for e in events.Images("samples/base")] == [0]
    assert [e.step for e in events.Images("samples/trained")] == [1, 3]  # each evaluation
    assert "kl_mask_threshold" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    ((record, history),) = wandb_history(run).values()
    assert record.run_id == (run / "wandb_id").read_text() and record.display_name == "run"
    assert list(record.tags) == ["smoke"] and record.project == "flowdppo"
    logged_config = {u.key: json.loads(u.value_json) for u in record.config.update}
    assert logged_config["loss"]["kl_mask_threshold"] == config["loss"]["kl_mask_threshold"]
    assert [history[r["epoch"]]["reward_mean"] for r in rows] == pytest.approx([r["reward_mean"] for r in rows])
    assert history[3]["eval/accuracy"] == pytest.approx(rows[3]["eval/accuracy"])
    assert history[0]["samples/base/_type"] == "image-file"
    image = next((run / "wandb").glob("offline-run-*")) / "files" / history[3]["samples/trained/path"]
    assert image.is_file() and image.suffix == ".png"

    shutil.rmtree(complete_checkpoints(run / "checkpoints")[-1])  # as if killed after epoch 2's checkpoint
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    runs = wandb_history(run)
    assert len(runs) == 2 and {record.run_id for record, _ in runs.values()} == {(run / "wandb_id").read_text()}
    (_, first), (_, resumed) = runs.values()
    assert sorted(resumed) == [2, 3] and resumed[3]["reward_mean"] == pytest.approx(first[3]["reward_mean"])
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1, 2, 3]  # epochs 2-3 purged, then rewritten


@pytest.mark.parametrize(
    ("backend", "missing", "expected"),
    [("wandb", True, "wandb is not installed; pip install 'flowdppo[wandb]'"), ("mlflow", False, "unknown backend")],
)
def test_a_tracker_that_is_not_there_is_one_line(tmp_path, capsys, monkeypatch, backend, missing, expected):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if missing and name == backend else find_spec(name, *a)
    )
    code = main(["train", "--out", str(tmp_path / "run"), f"logging.backends=[{backend}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0] and err[0].startswith("flowdppo: error: logging.backends")
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_a_login_is_one_line_and_leaves_nothing(tmp_path):
    """In a process of its own: W&B keeps its settings (mode, credentials) for the whole process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path / "home"), "WANDB_SILENT": "true"}  # no ~/.netrc, no saved W&B settings
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowdppo",
            "train",
            "--no-progress",
            "--out",
            str(out),
            *RUN[:4],
            "epochs=1",
            "logging.backends=[wandb]",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith("flowdppo: error: logging.backends: wandb could not start a run (") and err[0].endswith(
        "); run `wandb login`, or set WANDB_MODE=offline to log locally and sync later, or remove wandb"
    ), err
    assert not out.exists()


def test_a_wandb_install_that_fails_to_import_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    broken = tmp_path / "site" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        'raise TypeError("Descriptors cannot be created directly.\\nIf this call '
        'came from a _pb2.py file, your generated code is out of date")\n'
    )
    for name in [m for m in sys.modules if m == "wandb" or m.startswith("wandb.")]:
        monkeypatch.delitem(sys.modules, name)  # restored at teardown
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    code = main(["train", "--out", str(tmp_path / "run"), "logging.backends=[tensorboard, wandb]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        "flowdppo: error: logging.backends: wandb is installed but fails to import (TypeError: "
        "Descriptors cannot be created directly. If this call came from a _pb2.py file, your generated "
        "code is out of date); reinstall it (pip install 'flowdppo[wandb]' --force-reinstall) or remove "
        "it"
    )
    assert not (tmp_path / "run").exists()
