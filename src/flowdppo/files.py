"""Writing files so that nothing is ever half-written or lost: every output is written to a temporary name in
its own folder and renamed into place (``os.replace``), with the mode a plain ``open()`` gives (the umask's).

- ``write_atomic(path, write)``: ``write(tmp)`` writes ``.tmp-NAME`` next to ``path``, which then replaces ``path``;
- ``staged(folder)``: a folder to write into with any library's writer (``save_pretrained``, ``save_lora_weights``),
  each of its entries then replacing the one of the same name in ``folder`` (the folder's other files stay);
- a failure (a full disk, a kill) leaves the previous file as it was and removes the temporary one. safetensors
  reports a full disk as ``SafetensorError``; ``disk_errors`` turns it into the ``OSError`` (``ENOSPC``) it wraps,
  which the CLI prints as one line.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

TMP_PREFIX = ".tmp-"
STAGING = ".tmp-staging"
OS_ERROR = re.compile(r"os error (\d+)")


@functools.cache
def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (read once per process)."""
    try:  # Linux: read without changing it (os.umask both reads and sets it, for every thread)
        status = Path("/proc/self/status").read_text()
        mask = int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk while writing ``path`` (or its temporary file) raised as ``OSError(ENOSPC)`` naming ``path``;
    also when safetensors wraps it (``SafetensorError: ... No space left on device (os error 28)``)."""
    try:
        yield
    except SafetensorError as err:
        found = OS_ERROR.search(str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to ``.tmp-NAME`` in ``path``'s folder, then rename it onto ``path`` (umask's mode)."""
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    try:
        with disk_errors(path):
            write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """An empty folder (``folder/.tmp-staging``) to write into; on success each of its entries replaces the one of
    the same name in ``folder`` (a file by ``os.replace``, a folder renamed away first), with the umask's mode;
    on failure it is removed and ``folder`` is as it was (not there, if it was not)."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / STAGING
    remove(staging)
    staging.mkdir()
    try:
        with disk_errors(folder):
            yield staging
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                os.chmod(path, file_mode())
        for entry in sorted(staging.iterdir()):
            target = folder / entry.name
            if target.is_dir() and not target.is_symlink():
                old = folder / f"{TMP_PREFIX}old-{entry.name}"
                remove(old)
                os.replace(target, old)
                os.replace(entry, target)
                remove(old)
            else:
                os.replace(entry, target)
    except BaseException:
        remove(staging)
        if made and not any(folder.iterdir()):
            folder.rmdir()
        raise
    remove(staging)


def remove(path: Path) -> None:
    """Delete a file, link or folder tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
