"""Tasks: what the trainer trains on (base policy, prompts, rewards, evaluation).

``digits`` is a small self-contained world shipped in the package; ``text_to_image`` runs a diffusers
pipeline on a prompt file.
"""

TASKS = ("digits", "text_to_image")


def get_task(cfg, device):
    """The task ``cfg.task`` on ``device``."""
    if cfg.task == "digits":
        from flowdppo.tasks.digits.task import DigitsTask

        return DigitsTask(device)
    if cfg.task == "text_to_image":
        from flowdppo.tasks.text_to_image import TextToImageTask

        return TextToImageTask(cfg, device)
    raise ValueError(f"task must be one of {', '.join(TASKS)}; got {cfg.task!r}")
