"""The run folder: resolved config, metrics, tensorboard events, plots, grids, checkpoints, final weights.

RUN/config.yaml             resolved configuration
RUN/metrics.jsonl           one JSON row per epoch
RUN/tensorboard/            event files (scalars of every row)
RUN/plots/curves.png        reward and KL-to-base vs epoch, reward vs KL
RUN/plots/per_step.png      per trained step: mean D and masked fraction
RUN/samples.png             base vs trained samples, one row per prompt
RUN/checkpoints/epoch_N/    resumable checkpoints (safetensors + JSON)
RUN/final/                  the LoRA adapter (diffusers format) or the full policy
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from flowdppo.checkpoint import complete_checkpoints, save_checkpoint
from flowdppo.config import TrainConfig, flatten_keys, save_config, to_dict
from flowdppo.errors import ConfigError
from flowdppo.plots import plot_per_step, plot_training_curves, save_image_grid
from flowdppo.policies.lora import save_lora_adapter, uses_lora

CONFIG_FILE = "config.yaml"
RUN_SUBFOLDERS = ("checkpoints", "tensorboard", "plots", "final")
METRICS_FILE = "metrics.jsonl"


class RunFolder:
    """Everything a run writes, in one folder. Only the writer (process 0) writes; every process reads."""

    def __init__(self, path: Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
                 writer: bool = True) -> None:  # fmt: skip
        """Check that ``path`` may hold this run (``create`` then writes it)."""
        self.path, self.cfg, self.resume, self.is_writer = path, cfg, resume, writer
        config_path = path / CONFIG_FILE
        if resume:
            if not config_path.is_file():
                raise ConfigError(f"--resume: {path} is not a run folder (no {CONFIG_FILE})")
            saved, wanted = flatten_keys(yaml.safe_load(config_path.read_text())), flatten_keys(to_dict(cfg))
            changed = sorted(k for k in wanted.keys() | saved.keys() if saved.get(k) != wanted.get(k))
            if changed:
                shown = ", ".join(f"{k} (run {saved.get(k)!r}, now {wanted.get(k)!r})" for k in changed[:3])
                raise ConfigError(f"--resume: the config conflicts with the run's saved one: {shown}")
        elif config_path.is_file() and not overwrite:
            raise ConfigError(f"--out: {path} already holds a run; choose another folder or pass --overwrite")
        self.writer: SummaryWriter | None = None

    def create(self) -> None:
        """Write the resolved config; a new run over an old one (``--overwrite``) clears the old files."""
        if not self.is_writer:
            return
        if not self.resume:
            for name in RUN_SUBFOLDERS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.path / CONFIG_FILE)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def checkpoint_dir(self, epoch: int) -> Path:
        return self.path / "checkpoints" / f"epoch_{epoch:06d}"

    def latest_checkpoint(self) -> Path | None:
        found = complete_checkpoints(self.path / "checkpoints")
        return found[-1] if found else None

    def save_json(self, name: str, data: dict) -> None:
        if self.is_writer:
            _write_atomic(self.path / name, json.dumps(data, indent=2) + "\n")

    def save_checkpoint(self, epoch: int, policy: nn.Module, optimizer, rng, algorithm=None) -> None:
        """The state after ``epoch`` epochs, under ``checkpoints/`` (the newest ``keep_checkpoints`` kept).

        Every process calls it: a sharded policy's state is gathered first."""
        save_checkpoint(self.checkpoint_dir(epoch), policy, optimizer, rng, epoch, self.cfg.keep_checkpoints,
                        write=self.is_writer, algorithm=algorithm)  # fmt: skip

    def load_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def rows(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def start(self, start_epoch: int) -> None:
        """Keep the metric rows of epochs before ``start_epoch`` (a resumed run rewrites the rest)."""
        if not self.is_writer:
            return
        kept = [r for r in self.rows() if r["epoch"] < start_epoch]
        _write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        self.writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=start_epoch)

    def log(self, row: dict) -> None:
        if not self.is_writer:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def finish(self, policy: nn.Module | None, grid_panels: dict) -> None:
        """Plots, the sample grid and the final weights (written by process 0; ``policy`` may be None elsewhere)."""
        if not self.is_writer:
            return
        rows = self.rows()
        (self.path / "plots").mkdir(exist_ok=True)
        plot_training_curves(rows, self.path / "plots" / "curves.png", title=self.cfg.method)
        plot_per_step(rows, self.path / "plots" / "per_step.png")
        save_image_grid(grid_panels, self.path / "samples.png")
        final = self.path / "final"
        final.mkdir(exist_ok=True)
        if uses_lora(policy):
            save_lora_adapter(policy, final)
        else:
            policy.save_pretrained(final)
        if self.writer is not None:
            self.writer.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)

