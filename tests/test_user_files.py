"""Nothing of the user's is ever lost on disk: a careless ``--out``, ``--overwrite``, ``export`` or a full disk ends
in one line with exit code 2, and the user's files (and the run's previous ones) are still there, unchanged.
Files are written with the mode a plain ``open()`` gives (the umask's)."""

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import flowdppo.files as files
from flowdppo.cli import main

RUN = [
    "prompts_per_epoch=2",
    "group_size=4",
    "eval_samples_per_class=2",
    "eval_every=100",
    "epochs=2",
    "checkpoint_every=1",
    "keep_checkpoints=2",
]
ADAPTER = "pytorch_lora_weights.safetensors"
FULL = OSError(errno.ENOSPC, "No space left on device")
UMASK = 0o027  # the files of a run made under it: 0o640 (safetensors alone writes 0o600)


def train(*args: str) -> int:
    return main(["train", "--no-progress", *args])


def one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowdppo: error: ") and re.search(pattern, err), err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_files(folder: Path) -> dict[str, bytes]:
    """A user's own files in a folder: next to a run's outputs, inside its folders, and with outputs' names."""
    made = {
        "notes.txt": b"my notes",
        "plots/mine.png": b"my plot",
        "final/README.md": b"# my model card",
        "checkpoints/todo.md": b"- more epochs",
        "tensorboard/mine.txt": b"keep",
    }
    for name, data in made.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return made


def still_there(folder: Path, made: dict[str, bytes]) -> None:
    assert {name: (folder / name).read_bytes() for name in made} == made


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch run, trained under ``UMASK``."""
    run = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(UMASK)
    files.file_mode.cache_clear()
    try:
        assert train("--out", str(run), *RUN) == 0
    finally:
        os.umask(previous)
        files.file_mode.cache_clear()
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def test_every_file_of_a_run_has_the_umasks_mode(finished):
    modes = {str(p.relative_to(finished)): oct(p.stat().st_mode & 0o777) for p in finished.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes) and any(name.startswith("plots/") for name in modes)
    assert set(modes.values()) == {oct(0o666 & ~UMASK)}, modes


def test_a_folder_that_is_not_a_run_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    made = user_files(out)
    (out / "metrics.jsonl").write_text("my own metrics\n")  # a user's file with the name of a run's output
    made["metrics.jsonl"] = b"my own metrics\n"
    before = snapshot(out)
    assert train("--out", str(out), *RUN) == 2
    one_line_error(
        capsys,
        r"--out: .*mine is not empty and holds no flowdppo run \(no config\.yaml\); choose a new "
        r"or empty folder, or pass --overwrite",
    )
    assert train("--out", str(out), "--overwrite", *RUN) == 2  # a file named as an output, not known to be a run's
    one_line_error(
        capsys,
        r"--overwrite: .*mine/metrics\.jsonl is not a flowdppo run's .*; move it away or choose "
        r"another --out",
    )
    assert snapshot(out) == before


def test_overwrite_of_a_folder_that_is_not_a_run_writes_next_to_the_users_files(tmp_path):
    out = tmp_path / "mine"
    made = user_files(out)
    assert train("--out", str(out), "--overwrite", *RUN, "epochs=1") == 0
    still_there(out, made)
    assert (out / "final" / ADAPTER).is_file() and (out / "plots" / "curves.png").is_file()


def test_overwrite_of_a_run_replaces_its_outputs_only(run, capsys):
    made = user_files(run)
    assert train("--out", str(run), *RUN, "epochs=1") == 2  # without --overwrite: refused
    one_line_error(
        capsys,
        r"already holds a run; continue it with --resume .*, choose another folder, or pass "
        r"--overwrite to replace its outputs \(other files stay\)",
    )
    assert train("--out", str(run), "--overwrite", *RUN, "epochs=1", "seed=3") == 0
    still_there(run, made)
    # epoch_000002 was the old run's
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["epoch_000001", "todo.md"]
    assert "seed: 3" in (run / "config.yaml").read_text() and len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_failed_first_epoch_removes_only_what_the_run_wrote(tmp_path, capsys):
    out = tmp_path / "mine"
    made = user_files(out)
    assert train("--out", str(out), "--overwrite", *RUN, "reward.names=[user_rewards:nan_reward]") == 2
    one_line_error(capsys, r"non-finite reward at epoch 0")
    assert snapshot(out) == made


def test_out_a_symlink_loop_or_a_dangling_link(finished, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    for out in (loop, loop / "run"):
        assert train("--out", str(out), *RUN) == 2
        one_line_error(
            capsys,
            rf"--out: {re.escape(str(loop))} is a symlink loop; point the link at a folder or "
            rf"choose another one",
        )
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    assert train("--out", str(dangling), *RUN) == 2
    one_line_error(capsys, r"--out: .*dangling is a link to .*gone, which does not exist; create that folder")
    assert main(["export", str(finished), "--out", str(loop)]) == 2  # export's --out is checked the same way
    one_line_error(capsys, r"--out: .*loop is a symlink loop")


def test_a_file_where_the_run_keeps_a_folder_is_named_on_resume(run, capsys):
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("my file")
    before = snapshot(run)
    assert train("--resume", str(run), "epochs=3") == 2
    one_line_error(
        capsys,
        r"--resume: .*run/tensorboard is a file where the run keeps its tensorboard/ folder; move "
        r"or rename it, then run the command again",
    )
    assert snapshot(run) == before


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(run, capsys, monkeypatch):
    import flowdppo.checkpoint as checkpoint

    real_save_file = checkpoint.save_file

    def fills_the_disk(tensors, filename, *args, **kwargs):
        if "epoch_000003" in filename:  # safetensors reports a full disk as its own error
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    before = snapshot(run / "checkpoints")
    assert train("--resume", str(run), "epochs=4") == 2
    where = re.escape(str(run / "checkpoints"))
    one_line_error(
        capsys,
        rf"^flowdppo: error: No space left on device: {where}; free some space and continue "
        rf"with: flowdppo train --resume {re.escape(str(run))}$",
    )
    assert snapshot(run / "checkpoints") == before  # epoch_000001 and 2 intact, no temporary folder left
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    assert train("--resume", str(run)) == 0
    assert (run / "checkpoints" / "epoch_000004").is_dir()


def test_a_full_disk_while_writing_plots_or_final_weights_keeps_the_old_ones(run, capsys, monkeypatch):
    import matplotlib.figure

    import flowdppo.runs as runs

    def half_then_full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise FULL

    before = snapshot(run)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_full)
    assert train("--resume", str(run)) == 2  # the finished run writes its plots again
    one_line_error(
        capsys,
        rf"No space left on device: {re.escape(str(run / 'plots' / 'curves.png'))}; free some "
        rf"space and continue with",
    )
    assert before.items() <= snapshot(run).items()  # every file as it was (a new TensorBoard event file added)
    monkeypatch.undo()

    def full(policy, directory):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(runs, "save_lora_adapter", full)
    assert train("--resume", str(run)) == 2
    one_line_error(capsys, rf"No space left on device: {re.escape(str(run / 'final'))}; free some space")
    assert (run / "final" / ADAPTER).read_bytes() == before[f"final/{ADAPTER}"]
    assert not list(run.rglob(".tmp-*")) and not (run / ".lock").exists()


def test_export_refuses_an_existing_adapter_and_the_runs_own_final(finished, tmp_path, capsys):
    out = tmp_path / "lora"
    theirs = {ADAPTER: b"another run's adapter", "README.md": b"mine"}
    for name, data in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    assert main(["export", str(finished), "--out", str(out)]) == 2
    one_line_error(
        capsys,
        rf"--out: {re.escape(str(out / ADAPTER))} already exists; choose another folder, or pass "
        rf"--overwrite to replace it",
    )
    still_there(out, theirs)
    before = snapshot(finished)
    assert main(["export", str(finished), "--out", str(finished / "final"), "--overwrite"]) == 2
    one_line_error(
        capsys,
        r"--out: .*final is the run's own final/ folder, which already holds its adapter; export "
        r"to another folder",
    )
    assert snapshot(finished) == before
    assert main(["export", str(finished), "--out", str(out), "--overwrite"]) == 0
    assert (out / ADAPTER).read_bytes() == (finished / "final" / ADAPTER).read_bytes()
    assert (out / "README.md").read_bytes() == b"mine" and oct((out / ADAPTER).stat().st_mode & 0o777) == oct(
        files.file_mode()
    )


def test_a_full_disk_during_export_keeps_the_previous_export(finished, tmp_path, capsys, monkeypatch):
    import flowdppo.evaluate as evaluate

    out = tmp_path / "lora"
    assert main(["export", str(finished), "--out", str(out), "--no-check"]) == 0
    before = snapshot(out)

    def copy_half(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise FULL

    monkeypatch.setattr(evaluate.shutil, "copyfile", copy_half)
    assert main(["export", str(finished), "--out", str(out), "--overwrite"]) == 2
    one_line_error(
        capsys,
        rf"^flowdppo: error: No space left on device: {re.escape(str(out))}; free some space and "
        rf"run the same command again$",
    )
    assert snapshot(out) == before


def test_export_of_an_adapter_that_does_not_move_the_velocity_is_one_line(run, tmp_path, capsys):
    adapter = run / "final" / ADAPTER
    tensors = load_file(str(adapter))
    with __import__("safetensors").safe_open(str(adapter), "pt") as f:
        metadata = f.metadata()
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, str(adapter), metadata=metadata)
    out = tmp_path / "lora"
    assert main(["export", str(run), "--out", str(out)]) == 2  # loaded into a fresh base model: the same velocity
    one_line_error(
        capsys,
        r"export: the adapter for .*lora, loaded into a fresh base model, does not change its "
        r"velocity .*; nothing was written \(--no-check skips this check\)",
    )
    assert not out.exists()
    assert main(["export", str(run), "--out", str(out), "--format", "comfyui"]) == 2
    one_line_error(capsys, r"export: the adapter for .*lora is all zeros \(every lora_B is 0\)")
    assert not out.exists()
    assert main(["export", str(run), "--out", str(out), "--checkpoint"]) == 0  # the trained checkpoint: it moves
    assert load_file(str(out / ADAPTER)).keys() == tensors.keys()
