"""Tasks: what the trainer trains on (base policy, prompts, rewards, evaluation); see ``tasks.base.Task``.

``digits`` is a small self-contained world shipped in the package; ``text_to_image`` runs a diffusers
pipeline on a prompt file. Add a task: a class following ``Task`` and one line in ``TASKS``.
"""

from __future__ import annotations

import importlib

from flowdppo.errors import ConfigError

TASKS = {
    "digits": "flowdppo.tasks.digits.task:DigitsTask",
    "text_to_image": "flowdppo.tasks.text_to_image:TextToImageTask",
    "text_to_video": "flowdppo.tasks.text_to_video:TextToVideoTask",
}


def task_class(cfg):
    """The class of the task ``cfg.task`` (imported only when used)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task: must be one of {', '.join(TASKS)}; got {cfg.task!r}")
    module, _, name = TASKS[cfg.task].partition(":")
    return getattr(importlib.import_module(module), name)


def load_task(cfg, device):
    """The task ``cfg.task`` on ``device``, its policy and rewards loaded."""
    return task_class(cfg)(cfg, device)
