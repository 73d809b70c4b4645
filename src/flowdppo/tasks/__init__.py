"""Built-in tasks: small self-contained worlds (data, base model, reward model) shipped in the package."""

TASKS = ("digits",)


def get_task(name: str, device):
    """The built-in task called ``name`` on ``device``."""
    if name == "digits":
        from flowdppo.tasks.digits.task import DigitsTask

        return DigitsTask(device)
    raise ValueError(f"task must be one of {', '.join(TASKS)}; got {name!r}")
