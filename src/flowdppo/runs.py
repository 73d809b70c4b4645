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
import shutil
from pathlib import Path

import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from flowdppo.checkpoint import complete_checkpoints
from flowdppo.config import ConfigError, TrainConfig, save_config, to_dict
from flowdppo.plots import plot_per_step, plot_training_curves, save_image_grid
from flowdppo.policies.lora import save_lora_adapter, uses_lora

CONFIG_FILE = "config.yaml"
RUN_SUBFOLDERS = ("checkpoints", "tensorboard", "plots", "final")
METRICS_FILE = "metrics.jsonl"


class RunFolder:
    """Everything a run writes, in one folder."""

    def __init__(self, path: Path, cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        self.path, self.cfg = path, cfg
        config_path = path / CONFIG_FILE
        if resume:
            if not config_path.is_file():
                raise ConfigError(f"--resume: {path} is not a run folder (no {CONFIG_FILE})")
            saved = yaml.safe_load(config_path.read_text())
            if saved != to_dict(cfg):
                changed = sorted(k for k in to_dict(cfg) if saved.get(k) != to_dict(cfg)[k])
                raise ConfigError(f"--resume: the config differs from the run's saved one in: {', '.join(changed)}")
        elif config_path.is_file():
            if not overwrite:
                raise ConfigError(f"--out: {path} already holds a run; choose another folder or pass --overwrite")
            for name in RUN_SUBFOLDERS:
                shutil.rmtree(path / name, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_path)
        self.writer: SummaryWriter | None = None

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def checkpoint_dir(self, epoch: int) -> Path:
        return self.path / "checkpoints" / f"epoch_{epoch:06d}"

    def latest_checkpoint(self) -> Path | None:
        found = complete_checkpoints(self.path / "checkpoints")
        return found[-1] if found else None

    def save_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def load_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def rows(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def start(self, start_epoch: int) -> None:
        """Keep the metric rows of epochs before ``start_epoch`` (a resumed run rewrites the rest)."""
        kept = [r for r in self.rows() if r["epoch"] < start_epoch]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = SummaryWriter(str(self.path / "tensorboard"), purge_step=start_epoch)

    def log(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def finish(self, policy: nn.Module, grid_panels: dict) -> None:
        """Plots, the sample grid and the final weights."""
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
