"""A full disk: recognise it in any error, and say it in one line.

A write that finds no space raises ``OSError(errno.ENOSPC)`` (``hescape.atomic`` names the
final path when the library did not), sqlite says "database or disk is full" (the MLflow
store), and a trial's error reaches the driver as text (Tune's error file). ``is_disk_full``
recognises all of these through an exception's causes; ``disk_full_message`` is the study's
one-line stop: the path that could not be written, the space free there, what a study
needs, and what to do.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from hescape.tracking import exception_chain

__all__ = ["DiskFull", "disk_full_message", "full_path", "is_disk_full", "path_in_text",
           "quiet_if_disk_full", "quiet_store_errors", "text_is_disk_full"]

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")
_PATH_IN_TEXT = re.compile(r"(?:No space left on device|Disk quota exceeded): '([^']+)'")
SQLITE_FULL = "database or disk is full"


class DiskFull(RuntimeError):
    """A write found its filesystem full: ``path`` (None: unknown) and where it came from."""

    def __init__(self, path: str | None, where: str = "could not write") -> None:
        self.path, self.where = path, where
        super().__init__(f"{where} {path or 'a file'}: No space left on device")


def text_is_disk_full(text: str | None) -> bool:
    """True when an error's text (a traceback, a tag) says a write found no space."""
    return bool(text) and any(s in text for s in DISK_FULL_TEXT)


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` or one of its causes is a write that found no space."""
    for e in exception_chain(exc):
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS):
            return True
        if text_is_disk_full(str(e)):
            return True
    return False


def path_in_text(text: str) -> str | None:
    """The last path an error text names as not written (the innermost frame's), else None."""
    found = _PATH_IN_TEXT.findall(text or "")
    return found[-1] if found else None


def full_path(exc: BaseException | None, tracking_uri: str | None = None) -> str | None:
    """The path the failed write named: an ``OSError``'s file name, a ``DiskFull``'s path,
    one named in the text, or the sqlite file of ``tracking_uri`` for sqlite's message."""
    sqlite = False
    for e in exception_chain(exc):
        if isinstance(e, DiskFull) and e.path:
            return e.path
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS and e.filename:
            return str(e.filename)
        if path_in_text(str(e)):
            return path_in_text(str(e))
        sqlite = sqlite or SQLITE_FULL in str(e)
    if sqlite and tracking_uri and tracking_uri.startswith("sqlite:///"):
        return tracking_uri[len("sqlite:///"):] + " (the MLflow store)"
    return None


def disk_full_message(storage_dir: str | Path, path: str | None, need_bytes: int) -> str:
    """One line: the path that could not be written, the space free on ``storage_dir``'s
    filesystem, what a study needs (``need_bytes``), and the fix."""
    storage = Path(storage_dir)
    where = storage
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
        free = f"{usage.free / 1024**2:.1f} MiB free of {usage.total / 1024**2:.0f} MiB"
    except OSError:
        free = "free space unknown"
    return (f"disk full: could not write {path or 'a file under storage_dir'} (no space left "
            f"on device; {free} on the filesystem of storage_dir {storage}; a study needs at "
            f"least {need_bytes / 1024**2:.0f} MiB free). Free space (or move "
            "storage_dir), then run the same command with --resume.")


@contextmanager
def quiet_store_errors() -> Iterator[None]:
    """MLflow's sqlite store logs every failed write with its traceback (logger
    ``mlflow.store.db.utils``) before raising; on a full disk the caller handles the raise,
    and the one-line stop says what happened, so that log stays off the console."""
    db_log = logging.getLogger("mlflow.store.db.utils")
    level = db_log.level
    db_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        db_log.setLevel(level)


def quiet_if_disk_full(exc: BaseException | None):
    """``quiet_store_errors()`` when ``exc`` is a full disk, else a no-op context."""
    return quiet_store_errors() if is_disk_full(exc) else nullcontext()
