"""One-line status messages on stderr for the steps that take long without a progress bar of their own (loading a
pipeline or a reward model, evaluating a policy), so a user at a terminal sees what is running.

Shown only where stderr is a terminal and only by process 0 (``RANK``): logs, pipes and the tests' captured
output keep their one line per error; inside ``quiet()`` there are none (``flowdppo train --no-progress``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

_quiet = False


@contextmanager
def quiet(value: bool = True) -> Iterator[None]:
    """No status messages inside the block (``value`` True; False: as outside it)."""
    global _quiet
    previous, _quiet = _quiet, _quiet or value
    try:
        yield
    finally:
        _quiet = previous


def shown() -> bool:
    return not _quiet and os.environ.get("RANK", "0") == "0" and sys.stderr.isatty()


def status(message: str) -> None:
    """``flowdppo: MESSAGE ...`` on stderr (``tqdm.write``: a progress bar on screen stays intact)."""
    if shown():
        tqdm.write(f"flowdppo: {message} ...", file=sys.stderr)
