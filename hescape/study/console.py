"""The study's console: each distinct warning once per study, a line for long silent steps,
library INFO chatter off.

- ``warn_once(study_dir)``: installs a ``warnings.showwarning`` in this process (the driver
  and every trial process) that appends every warning to ``<study>/logs/warnings.log`` and
  prints a warning to the console only the first time its site (category, file, line) is
  seen in the study, by any process: the first process to create the site's marker file
  under ``<study>/logs/seen/`` (``O_EXCL``, so processes on a shared disk agree) prints it.
- ``step(label)``: ``[study] label ...`` when a step starts and ``[study] label: done in N s``
  when it ends, so minutes of shared preprocessing are never silent.
- ``quiet_libraries(verbose)``: MLflow's and Optuna's INFO lines off unless ``--verbose``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

LOG_DIR = "logs"
WARNINGS_LOG = "warnings.log"
_installed: dict[str, Any] = {}


def warnings_log(study_dir: str | Path) -> Path:
    """``<study>/logs/warnings.log``: every warning of the study, one line each."""
    return Path(study_dir) / LOG_DIR / WARNINGS_LOG


def _first_time(study_dir: Path, key: str) -> bool:
    seen = study_dir / LOG_DIR / "seen"
    seen.mkdir(parents=True, exist_ok=True)
    marker = seen / hashlib.sha1(key.encode()).hexdigest()[:16]  # noqa: S324 - a name
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    return True


def warn_once(study_dir: str | Path, *, out: TextIO | None = None) -> None:
    """Route this process's warnings through the study's once-per-study filter (idempotent;
    a later call with another study directory switches to it)."""
    study_dir = Path(study_dir)
    if _installed.get("dir") == study_dir:
        return
    original = _installed.get("original", warnings.showwarning)

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        text = f"{category.__name__}: {message}".replace("\n", " ")
        try:
            log = warnings_log(study_dir)
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as fh:
                fh.write(f"{time.strftime('%F %T')} pid={os.getpid()} {filename}:{lineno} "
                         f"{text}\n")
            first = _first_time(study_dir, f"{category.__name__}|{filename}|{lineno}")
        except OSError:  # the study directory is gone: print rather than lose it
            first = True
        if first:
            stream = out or sys.stderr
            print(f"[warning] {text} (shown once per study; all in "
                  f"{warnings_log(study_dir)})", file=stream, flush=True)

    _installed.update(dir=study_dir, original=original)
    warnings.showwarning = show


def restore_warnings() -> None:
    """Undo ``warn_once`` in this process."""
    if "original" in _installed:
        warnings.showwarning = _installed.pop("original")
    _installed.pop("dir", None)


@contextmanager
def step(label: str, *, out: TextIO | None = None) -> Iterator[None]:
    """One line when ``label`` starts, one with its duration when it ends."""
    stream = out or sys.stdout
    print(f"[study] {label} ...", file=stream, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"[study] {label}: done in {time.perf_counter() - t0:.1f} s", file=stream, flush=True)


def quiet_libraries(verbose: bool) -> None:
    """MLflow's ("Creating initial MLflow database tables...") and Optuna's INFO lines only
    with ``verbose``; warnings always."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "optuna", "alembic"):
        logging.getLogger(name).setLevel(level)


class DropTrialTracebacks(logging.Filter):
    """Drops Tune's "Trial task failed for trial ..." records (a full traceback each): the
    console prints one ``failed:`` line per trial, the traceback is in the trial's
    ``error.txt`` and the MLflow tag ``hescape.error``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trial task failed for trial")
