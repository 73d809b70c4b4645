"""The run folder: resolved config, metrics, tensorboard events, plots, grids, checkpoints, final weights.

RUN/config.yaml             resolved configuration
RUN/metrics.jsonl           one JSON row per epoch
RUN/tensorboard/            event files (scalars of every row, the config, the sample grids of each evaluation)
RUN/wandb/, RUN/wandb_id    with logging.backends=[wandb]: the W&B run's local files and its id (for --resume)
RUN/plots/curves.png        reward and KL-to-base vs epoch, reward vs KL
RUN/plots/per_step.png      per trained step: mean D and masked fraction
RUN/samples.png             base vs trained samples, one row per prompt
RUN/checkpoints/epoch_N/    resumable checkpoints (safetensors + JSON)
RUN/final/                  the LoRA adapter (diffusers format) or the full policy
RUN/.lock                   held while a run writes the folder (the id of its process)

Every file is written atomically with the umask's mode (``flowdppo.files``). ``--out`` must be a new or empty
folder; ``--overwrite`` replaces a run's outputs (``flowdppo.outputs``: only the names a run writes, anything
else in the folder stays). ``--resume RUN epochs=N`` extends a run (N never below its epochs) exactly as if it had
been asked for N epochs from the start: no schedule depends on the total, and the evaluation its last epoch
made only for being the last is dropped from that row (``as_asked``; TensorBoard keeps it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from flowdppo.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from flowdppo.config import TrainConfig, config_from_dict, flatten_keys, save_config, saved_config, to_dict
from flowdppo.errors import CheckpointError, ConfigError
from flowdppo.files import disk_errors, remove, staged, write_text_atomic
from flowdppo.outputs import leftovers, misplaced_files, output_entries, remove_outputs
from flowdppo.plots import plot_per_step, plot_training_curves, reward_label, save_image_grid
from flowdppo.policies.lora import save_lora_adapter, uses_lora
from flowdppo.tracking import open_trackers

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
EVAL_PREFIXES = ("eval/", "eval_heldout/")  # the keys a task's evaluate() adds to a row


class RunFolder:
    """Everything a run writes, in one folder. Only the writer (process 0) writes; every process reads."""

    def __init__(
        self, path: Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False, writer: bool = True
    ) -> None:
        """Check that ``path`` may hold this run (``create`` then writes it)."""
        self.path, self.cfg, self.resume, self.is_writer = path, cfg, resume, writer
        flag = "--resume" if resume else "--out"
        check_folder_path(path, flag)
        self.made_folder = not path.exists()  # a failure before the first epoch removes what this run made
        self.locked = False
        check_not_in_use(path / LOCK_FILE)
        if resume:
            # keys added to the library since the run started take their defaults (they did not exist then)
            saved = flatten_keys(to_dict(config_from_dict(saved_config(path, "--resume"))))
            if cfg.epochs < saved["epochs"]:
                raise ConfigError(
                    f"--resume: epochs={cfg.epochs} is fewer than the run's {saved['epochs']}; a run "
                    f"can only be extended: give epochs >= {saved['epochs']} (or leave it out)"
                )
            wanted = flatten_keys(to_dict(cfg))
            changed = sorted(k for k in wanted.keys() | saved.keys() if saved.get(k) != wanted.get(k) and k != "epochs")
            if changed:
                shown = ", ".join(f"{k} (run {saved.get(k)!r}, now {wanted.get(k)!r})" for k in changed[:3])
                raise ConfigError(f"--resume: the config conflicts with the run's saved one: {shown}")
        else:
            check_new_run_folder(path, overwrite)
        misplaced = misplaced_files(path)
        if misplaced:
            raise ConfigError(
                f"{flag}: {misplaced[0]} is a file where the run keeps its {misplaced[0].name}/ "
                f"folder; move or rename it, then run the command again"
            )
        self.trackers: list = []

    def create(self) -> None:
        """Lock the folder and write the resolved config; a new run over an old one (``--overwrite``) deletes the
        old run's outputs, a resumed one the leftovers of interrupted writes and deletions."""
        if not self.is_writer:
            return
        flag = "--resume" if self.resume else "--out"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.locked = take_lock(self.path / LOCK_FILE)
            if self.resume:
                for leftover in leftovers(self.path):
                    remove(leftover)
            else:
                remove_outputs(self.path)
                save_config(self.cfg, self.path / CONFIG_FILE)  # a resumed run's, once its checkpoint is read
        except PermissionError as err:
            raise ConfigError(
                f"{flag}: cannot write in {self.path} ({err.strerror}); choose a writable folder"
            ) from err
        except (FileExistsError, NotADirectoryError) as err:
            raise ConfigError(
                f"{flag}: cannot make the run folder {self.path} ({err.strerror}: {err.filename}); "
                f"choose another folder"
            ) from err

    def close(self, failed: bool) -> None:
        """Release the lock. A run that failed before finishing its first epoch leaves nothing behind: the
        folder if it made it, else what it wrote (so the same command can simply be run again)."""
        if not self.is_writer or not self.locked:  # it wrote nothing (or the folder is another run's)
            return
        try:
            self.close_trackers()
        finally:
            if failed and not self.resume and not self.rows():
                if self.made_folder:
                    shutil.rmtree(self.path, ignore_errors=True)
                else:
                    remove_outputs(self.path)
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.locked = False

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def checkpoint_dir(self, epoch: int) -> Path:
        return self.path / "checkpoints" / f"epoch_{epoch:06d}"

    def load_latest_checkpoint(self, policy: nn.Module, optimizer, rng, algorithm=None) -> dict:
        """Restore the newest checkpoint that reads (a broken newer one is skipped with a warning) and return
        its state (``{"epoch": 0}`` when there is none yet). The run's config must be the one it ran with."""
        found = complete_checkpoints(self.path / "checkpoints")
        for directory in reversed(found):
            try:
                state = load_checkpoint(directory, policy, optimizer, rng, algorithm)
            except CheckpointError as err:
                tqdm.write(f"flowdppo: warning: skipping a checkpoint: {err}", file=sys.stderr)
                continue
            self._check_same_config(state.get("config"), directory)
            if state["epoch"] > self.cfg.epochs:
                raise CheckpointError(f"{directory}: epoch {state['epoch']} is past the run's {self.cfg.epochs} epochs")
            return state
        if found:
            raise CheckpointError(f"--resume: no checkpoint of {self.path} could be read (see the warnings above)")
        return {"epoch": 0}

    def _check_same_config(self, ran_with: dict | None, directory: Path) -> None:
        """A ``config.yaml`` edited after the checkpoint was written would misreport the run: refuse it."""
        if ran_with is None:  # a checkpoint from before configs were recorded in it
            return
        saved, now = flatten_keys(ran_with), flatten_keys(to_dict(self.cfg))
        extended = {"epochs"} if now["epochs"] >= saved.get("epochs", 0) else set()  # a run extended to more epochs
        changed = sorted(k for k in saved.keys() & now.keys() - extended if saved[k] != now[k])
        if changed:
            shown = ", ".join(f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in changed[:3])
            raise ConfigError(
                f"--resume: {self.path / CONFIG_FILE} differs from the config {directory.name} ran "
                f"with: {shown}; restore it, or start a new run to change it"
            )

    def save_json(self, name: str, data: dict) -> None:
        if self.is_writer:
            write_text_atomic(self.path / name, json.dumps(data, indent=2) + "\n")

    def save_checkpoint(
        self, epoch: int, policy: nn.Module, optimizer, rng, algorithm=None, extra_state: dict | None = None
    ) -> None:
        """The state after ``epoch`` epochs, under ``checkpoints/`` (the newest ``keep_checkpoints`` kept), with
        the config it ran with and ``extra_state`` in its ``state.json``.

        Every process calls it: a sharded policy's state is gathered first."""
        state = {"config": to_dict(self.cfg), **(extra_state or {})}
        save_checkpoint(
            self.checkpoint_dir(epoch),
            policy,
            optimizer,
            rng,
            epoch,
            self.cfg.keep_checkpoints,
            write=self.is_writer,
            algorithm=algorithm,
            extra_state=state,
        )

    def load_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def rows(self) -> list[dict]:
        """The metric rows; a last row cut short by a kill is left out (its epoch is run again on resume)."""
        if not self.metrics_path.is_file():
            return []
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if n < len(lines):
                    raise ConfigError(f"{self.metrics_path}: line {n} is not a JSON row ({err.msg})") from err
        return rows

    def start(self, start_epoch: int) -> None:
        """Keep the metric rows of epochs before ``start_epoch`` (a resumed run rewrites the rest), as a run asked
        for ``cfg.epochs`` wrote them (``as_asked``); a resumed run's config is written now (an extension grows
        ``epochs``), once its checkpoint was read."""
        if not self.is_writer:
            return
        if self.resume:
            save_config(self.cfg, self.path / CONFIG_FILE)
        kept = as_asked([r for r in self.rows() if r["epoch"] < start_epoch], self.cfg)
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.trackers = open_trackers(self.path, self.cfg, start_epoch)

    def log(self, row: dict) -> None:
        if not self.is_writer:
            return
        with disk_errors(self.metrics_path), self.metrics_path.open("a") as f:  # a row cut short: see rows()
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(row)

    def log_images(self, grids: dict, epoch: int) -> None:
        """Sample grids ``{name: (rows, cols, H, W[, 3])}`` to the trackers."""
        for tracker in self.trackers if self.is_writer else ():
            tracker.log_images(grids, epoch)

    def close_trackers(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def finish(self, policy: nn.Module | None, grid_panels: dict, row_labels: list[str] | None = None) -> None:
        """Plots, the sample grid (rows labelled by ``row_labels``, e.g. the prompts) and the final weights (written
        by process 0; ``policy`` may be None elsewhere)."""
        if not self.is_writer:
            return
        rows, cfg = self.rows(), self.cfg
        (self.path / "plots").mkdir(exist_ok=True)
        reward = reward_label(cfg.reward.names, cfg.reward.weights)
        plot_training_curves(rows, self.path / "plots" / "curves.png", title=cfg.method, reward=reward)
        plot_per_step(rows, self.path / "plots" / "per_step.png", tau=flow_dppo_tau(cfg))
        save_image_grid(grid_panels, self.path / "samples.png", row_labels)
        with staged(self.path / "final") as final:  # each file replaces its old self; other files in final/ stay
            if uses_lora(policy):
                save_lora_adapter(policy, final)
            else:
                policy.save_pretrained(final)


def flow_dppo_tau(cfg: TrainConfig) -> float | None:
    """The Flow-DPPO mask threshold tau of a run whose loss has one (``loss.kl_mask_threshold``), else None."""
    flow_dppo = cfg.algorithm == "policy_gradient" and cfg.loss.loss_mode == "flow_dppo"
    return cfg.loss.kl_mask_threshold if flow_dppo else None


def evaluates(epoch: int, cfg: TrainConfig) -> bool:
    """Whether ``epoch`` ends with an evaluation: every ``eval_every`` epochs, and the last."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs


def as_asked(rows: list[dict], cfg: TrainConfig) -> list[dict]:
    """The rows as a run asked for ``cfg.epochs`` from the start writes them: the evaluation a shorter run made at
    its last epoch (not one of ``evaluates``) is dropped from that row."""
    return [
        row if evaluates(row["epoch"], cfg) else {k: v for k, v in row.items() if not k.startswith(EVAL_PREFIXES)}
        for row in rows
    ]


def check_folder_path(path: Path, flag: str) -> None:
    """``path`` and its parents are folders or do not exist yet: no file, broken link or link loop on the way."""
    for folder in reversed((path, *path.parents)):
        try:
            folder.stat()
        except FileNotFoundError:
            if folder.is_symlink():
                raise ConfigError(
                    f"{flag}: {folder} is a link to {os.readlink(folder)}, which does not exist; "
                    f"create that folder or choose another one"
                ) from None
            return
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ConfigError(
                    f"{flag}: {folder} is a symlink loop; point the link at a folder or choose another one"
                ) from None
            raise
        if not folder.is_dir():
            raise ConfigError(f"{flag}: {folder} is a file, not a folder; choose another run folder")


def check_new_run_folder(path: Path, overwrite: bool) -> None:
    """``--out`` is new or empty; with ``--overwrite`` it may hold a run (its outputs are replaced) or other files
    (kept; none may have the name of an output, which is only known to be the run's in a run's folder)."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    if (path / CONFIG_FILE).is_file():
        if not overwrite:
            raise ConfigError(
                f"--out: {path} already holds a run; continue it with --resume {path}, choose another "
                f"folder, or pass --overwrite to replace its outputs (other files stay)"
            )
        return
    if not overwrite:
        raise ConfigError(
            f"--out: {path} is not empty and holds no flowdppo run (no {CONFIG_FILE}); choose a new or "
            f"empty folder, or pass --overwrite to write the run next to its files (none is deleted)"
        )
    taken = output_entries(path)
    if taken:
        raise ConfigError(
            f"--overwrite: {taken[0]} is not a flowdppo run's (no {CONFIG_FILE} in {path}) but has the "
            f"name of a file the run writes; move it away or choose another --out"
        )


def take_lock(lock: Path) -> bool:
    """Create ``lock`` holding this process's id; a lock whose process is gone (a killed run) is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            check_not_in_use(lock)
            lock.unlink(missing_ok=True)  # stale: left by a run that was killed
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True
    raise ConfigError(f"--out: cannot lock {lock.parent}; another run keeps taking it")


def check_not_in_use(lock: Path) -> None:
    """A ``lock`` held by a live process: the folder is another run's now."""
    holder = _lock_holder(lock) if lock.is_file() else None
    if holder is not None and _alive(holder):
        raise ConfigError(
            f"--out: {lock.parent} is in use by another run (process {holder}); wait for it "
            f"or choose another folder (remove {lock} if that process is gone)"
        )


def _lock_holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
