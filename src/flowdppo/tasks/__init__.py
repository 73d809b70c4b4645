"""Tasks: what the trainer trains on (base policy, prompts, rewards, evaluation); see ``tasks.base.Task``.

``digits`` is a small self-contained world shipped in the package; ``text_to_image`` runs a diffusers
pipeline on a prompt file, ``text_to_video`` a video pipeline. Add a task: a class following ``Task``, its options
section (a ``settings.Section``, ``cfg.<task>``) and one ``register_task`` line here.
"""

from __future__ import annotations

import importlib
from dataclasses import fields

from flowdppo.errors import ConfigError
from flowdppo.settings import TASKS, register_task
from flowdppo.tasks.digits import DigitsConfig
from flowdppo.tasks.text_to_image import TextToImageConfig
from flowdppo.tasks.text_to_video import TextToVideoConfig


def same_names(section: type) -> dict[str, str]:
    """Each key of ``section`` under its own name: the top-level keys of older releases."""
    return {f.name: f.name for f in fields(section)}


register_task(
    "digits",
    "flowdppo.tasks.digits.task:DigitsTask",
    DigitsConfig,
    {"digits_upsample": "upsample", "digits_classes": "classes"},
)
register_task(
    "text_to_image", "flowdppo.tasks.text_to_image:TextToImageTask", TextToImageConfig, same_names(TextToImageConfig)
)
register_task(
    "text_to_video", "flowdppo.tasks.text_to_video:TextToVideoTask", TextToVideoConfig, same_names(TextToVideoConfig)
)


def task_class(cfg):
    """The class of the task ``cfg.task`` (imported only when used)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task: must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    module, _, name = TASKS[cfg.task].partition(":")
    return getattr(importlib.import_module(module), name)


def load_task(cfg, device):
    """The task ``cfg.task`` on ``device``, its policy and rewards loaded."""
    return task_class(cfg)(cfg, device)
