"""A run folder that was tampered with, damaged, left half-written or is in use: resume recovers what can be
recovered and refuses the rest in one line, exit code 2, without changing the folder."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from flowdppo.cli import main

RUN = [
    "prompts_per_epoch=2",
    "group_size=4",
    "eval_samples_per_class=2",
    "eval_every=100",
    "epochs=3",
    "checkpoint_every=1",
    "keep_checkpoints=2",
]


def rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "time_s"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--no-progress", "--out", str(run), *RUN]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run with its last epoch undone (as if killed after checkpoint 2)."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints" / "epoch_000003")
    shutil.rmtree(copy / "final")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    return copy


def resume(run: Path) -> int:
    return main(["train", "--no-progress", "--resume", str(run)])


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(finished, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    newest = copy / "checkpoints" / "epoch_000003" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    assert resume(copy) == 0
    assert "warning: skipping a checkpoint: " in capsys.readouterr().err
    assert rows(copy) == rows(finished)  # epoch 2 -> 3 run again, identically


@pytest.mark.parametrize(
    "damage,pattern",
    [
        (lambda c: (c / "state.json").write_text('{"epoch": -3}'), r"state\.json: no valid epoch"),
        (lambda c: (c / "rng.json").write_text("{not json"), r"rng\.json: unreadable \(JSONDecodeError"),
        (lambda c: (c / "optimizer.json").write_text("{}"), r"does not fit this run \(KeyError"),
        (lambda c: (c / "trainable.safetensors").write_bytes(b"\0" * 64), r"trainable\.safetensors: unreadable"),
    ],
)
def test_the_only_checkpoint_damaged_is_one_line_and_changes_nothing(run, capsys, damage, pattern):
    shutil.rmtree(run / "checkpoints" / "epoch_000001", ignore_errors=True)
    (checkpoint,) = (run / "checkpoints").glob("epoch_*")
    damage(checkpoint)
    before = snapshot(run)
    assert resume(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "warning: skipping a checkpoint" in err[0] and __import__("re").search(pattern, err[0])
    assert err[1].startswith("flowdppo: error: --resume: no checkpoint of") and "could be read" in err[1]
    assert snapshot(run) == before


def test_a_hand_edited_config_is_refused_on_resume(run, capsys):
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["optim"]["lr"] = 0.01
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(run)
    assert resume(run) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and "config.yaml differs from the config epoch_000002 ran with: optim.lr (checkpoint 0.001, now 0.01)" in err
    ), err
    assert snapshot(run) == before


def test_a_run_from_before_newer_keys_existed_resumes_with_their_defaults(run, finished):
    config = yaml.safe_load((run / "config.yaml").read_text())
    for section, key in (
        (config, "logging"),
        (config["text_to_image"], "negative_prompt"),
        (config["optim"], "compile"),
    ):
        del section[key]  # keys a newer library added
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert resume(run) == 0
    assert rows(run) == rows(finished)


def test_a_truncated_last_metrics_row_and_leftovers_of_interrupted_writes(run, finished):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "reward_me')  # killed while writing the row of epoch 2
    (run / "checkpoints" / ".del-epoch_000001").mkdir()  # killed while deleting an old checkpoint
    (run / "checkpoints" / ".tmp-epoch_000003").mkdir()  # killed while writing a checkpoint
    (run / ".tmp-metrics.jsonl").write_text("half")
    assert resume(run) == 0
    assert rows(run) == rows(finished)
    assert not list((run / "checkpoints").glob(".*")) and not (run / ".tmp-metrics.jsonl").exists()


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(run, capsys):
    (run / ".lock").write_text(f"{os.getpid()}\n")  # a live process holds it
    before = snapshot(run)
    assert resume(run) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"is in use by another run (process {os.getpid()})" in err, err
    assert snapshot(run) == before
    (run / ".lock").write_text("999999999\n")  # left by a run that was killed: no such process
    assert resume(run) == 0
    assert not (run / ".lock").exists()


def test_export_of_a_damaged_adapter_is_one_line(finished, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    adapter = copy / "final" / "pytorch_lora_weights.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:50])
    assert main(["export", str(copy), "--out", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pytorch_lora_weights.safetensors: unreadable" in err and "--checkpoint" in err
    assert main(["export", str(copy), "--out", str(tmp_path / "lora"), "--checkpoint"]) == 0


def test_a_second_run_on_a_folder_in_use_changes_nothing_of_the_first(tmp_path, capsys, monkeypatch):
    """Run B starts on run A's folder while A writes it (A's lock is there): B stops, A's files are intact."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getpid()}\n")
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    before = snapshot(out)
    assert main(["train", "--no-progress", "--out", str(out), "--overwrite", *RUN]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import errno

    import flowdppo.runs as runs

    real_log = runs.RunFolder.log

    def log_then_fill_the_disk(self, row):
        if row["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))
        real_log(self, row)

    monkeypatch.setattr(runs.RunFolder, "log", log_then_fill_the_disk)
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(out), *RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"flowdppo: error: No space left on device: {out / 'metrics.jsonl'}; free some space and continue "
        f"with: flowdppo train --resume {out}"
    )
    assert [r["epoch"] for r in rows(out)] == [0, 1] and not (out / ".lock").exists()
    monkeypatch.setattr(runs.RunFolder, "log", real_log)
    assert resume(out) == 0 and [r["epoch"] for r in rows(out)] == [0, 1, 2]


def test_an_empty_run_config_and_a_non_utf8_prompt_file(run, tmp_path, capsys):
    (run / "config.yaml").write_text("")
    assert resume(run) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.yaml is empty or not a mapping of keys" in err
    from flowdppo.errors import ConfigError
    from flowdppo.prompts import load_prompts

    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a cat\n\xff a dog\n")
    with pytest.raises(ConfigError, match=r"prompts: .*p\.txt is not UTF-8 text \(byte 6\)"):
        load_prompts(prompts)


def test_export_with_no_check_loads_no_model(finished, tmp_path, monkeypatch):
    """With --no-check both sources write the adapter without loading the base model (it may not fit in memory)."""
    from safetensors.torch import load_file

    from flowdppo.tasks.digits.task import DigitsTask

    def no_model(*args, **kwargs):
        raise AssertionError("export loaded the model")

    monkeypatch.setattr(DigitsTask, "load_policy", no_model)
    for source in ([], ["--checkpoint"]):
        out = tmp_path / f"lora{len(source)}"
        assert main(["export", str(finished), "--out", str(out), "--no-check", *source]) == 0
        assert set(load_file(str(out / "pytorch_lora_weights.safetensors"))) == set(
            load_file(str(finished / "final" / "pytorch_lora_weights.safetensors"))
        )


def test_a_finished_run_extended_is_the_run_asked_for_more_epochs(finished, tmp_path, capsys):
    """2 epochs, then ``--resume RUN epochs=3``: the rows and final weights of a 3-epoch run, bit for bit (the
    2-epoch run's end-of-run evaluation at epoch 1 is not one a 3-epoch run makes: it is dropped from that row).
    Fewer epochs than the run's is one line, and changes nothing."""
    from safetensors.torch import load_file

    def files(run: Path) -> dict[str, bytes]:  # the adapter's header order varies between writes: compared apart
        return {k: v for k, v in snapshot(run).items() if not k.startswith(("tensorboard/", "final/"))}

    def adapter(run: Path) -> dict:
        return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))

    run = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(run), *RUN, "epochs=2"]) == 0
    assert "eval/accuracy" in rows(run)[1]  # the last epoch of the 2-epoch run evaluates
    before, weights = files(run), adapter(run)
    assert resume(run) == 0  # a finished run resumed as it is: nothing to train, nothing of it changes
    assert files(run) == before and all(adapter(run)[k].equal(w) for k, w in weights.items())
    assert main(["train", "--no-progress", "--resume", str(run), "epochs=3"]) == 0
    assert rows(run) == rows(finished)
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    ours, theirs = adapter(run), adapter(finished)
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    capsys.readouterr()

    before = snapshot(run)
    assert main(["train", "--no-progress", "--resume", str(run), "epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "flowdppo: error: --resume: epochs=2 is fewer than the run's 3; a run can only be extended: give "
        "epochs >= 3 (or leave it out)"
    )
    assert snapshot(run) == before
