"""Experiment trackers: every metrics row, the resolved config and the sample grids of each evaluation.

``logging.backends`` picks them: "tensorboard" (``RUN/tensorboard/``, the default) and "wandb" (Weights &
Biases; ``pip install 'flowdppo[wandb]'``, offline with ``WANDB_MODE=offline``). A resumed run continues
the same tracker run: TensorBoard purges the epochs after the checkpoint, W&B reuses the run id kept in
``RUN/wandb_id`` (rows it already holds for the replayed epochs keep their first values, which a resumed
run reproduces). W&B failing to import, or to start a run (online without ``wandb login``, the server out of
reach), is one line naming ``logging.backends`` and the fix.
"""

from __future__ import annotations

import importlib.util
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from flowdppo.errors import ConfigError, cut, did_you_mean, shown
from flowdppo.files import write_text_atomic
from flowdppo.overrides import to_dict
from flowdppo.settings import Section, register_section

BACKENDS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_id"


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (lists such as ``trained_steps`` and the epoch itself left out)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


class TensorBoardTracker:
    """Scalars, the config as text and the grids as images in ``RUN/tensorboard``."""

    def __init__(self, run_path: Path, cfg, start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_path / "tensorboard"), purge_step=start_epoch)
        if start_epoch == 0:
            self.writer.add_text("config", f"```\n{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```", 0)

    def log(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def log_images(self, grids: dict[str, np.ndarray], epoch: int) -> None:
        from flowdppo.plots import grid_mosaic

        for name, grid in grids.items():
            self.writer.add_image(f"samples/{name}", grid_mosaic(grid), epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per run folder: the resolved config, every row at ``step = epoch``, the grids as images."""

    def __init__(self, run_path: Path, cfg, start_epoch: int) -> None:
        self.wandb = wandb = import_wandb()
        id_file = run_path / WANDB_ID_FILE
        if start_epoch == 0 or not id_file.is_file():
            write_text_atomic(id_file, secrets.token_hex(4))  # a W&B run id: lowercase letters and digits
        log = cfg.logging
        try:
            self.run = wandb.init(
                project=log.project,
                name=log.run_name or run_path.name,
                tags=list(log.tags),
                config=to_dict(cfg),
                id=id_file.read_text().strip(),
                resume="allow",
                dir=str(run_path),
            )
        except (wandb.errors.Error, TimeoutError) as err:  # UsageError (no API key), CommError (no server), ...
            first = cut(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            raise ConfigError(
                f"logging.backends: wandb could not start a run ({first}); run `wandb login`, or "
                "set WANDB_MODE=offline to log locally and sync later, or remove wandb"
            ) from err

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["epoch"])

    def log_images(self, grids: dict[str, np.ndarray], epoch: int) -> None:
        from flowdppo.plots import grid_mosaic

        self.run.log(
            {f"samples/{name}": self.wandb.Image(grid_mosaic(grid)) for name, grid in grids.items()}, step=epoch
        )

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
INSTALL = {"wandb": "pip install 'flowdppo[wandb]'"}


def import_wandb():
    """``import wandb``; an install that fails to import (a broken or mismatched dependency) is one line."""
    try:
        import wandb
    except Exception as err:  # ImportError, or whatever a broken install raises (protobuf's TypeError, ...)
        raise ConfigError(
            f"logging.backends: wandb is installed but fails to import ({type(err).__name__}: "
            f"{cut(' '.join(str(err).split()))}); reinstall it ({INSTALL['wandb']} --force-reinstall) "
            "or remove it"
        ) from err
    return wandb


def check_backends(backends: list[str]) -> None:
    """Known names whose library is installed and imports; otherwise one line saying what to do."""
    for name in backends:
        if name not in TRACKERS:
            raise ConfigError(
                f"logging.backends: unknown backend {shown(name)}{did_you_mean(name, BACKENDS)}; choose "
                f"from {', '.join(BACKENDS)}"
            )
        if name in INSTALL and importlib.util.find_spec(name) is None:
            raise ConfigError(f"logging.backends: {name} is not installed; {INSTALL[name]} (or remove it)")
        if name == "wandb":
            import_wandb()


@dataclass
class LoggingConfig(Section):
    """Experiment trackers (``logging.*``); the metrics always go to RUN/metrics.jsonl as well."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers: "tensorboard" (RUN/tensorboard) and / or "wandb" (pip install 'flowdppo[wandb]')."""
    project: str = "flowdppo"
    """W&B project the run is logged to (backend wandb)."""
    run_name: str = ""
    """Tracker run name ("": the run folder's name)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run (backend wandb)."""

    @classmethod
    def choices(cls) -> dict[str, tuple]:
        return {"backends": BACKENDS}

    def check(self, prefix: str = "logging.") -> None:
        check_backends(self.backends)  # the names (with a hint), then that each one's library imports


register_section("logging", LoggingConfig)


def open_trackers(run_path: Path, cfg, start_epoch: int) -> list:
    return [TRACKERS[name](run_path, cfg, start_epoch) for name in dict.fromkeys(cfg.logging.backends)]
