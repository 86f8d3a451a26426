"""Fault injection for reliability tests: kill a training worker once, deterministically.

Set in the environment of the process that runs ``train_loop_per_worker``. Ray Train V2
workers see ``os.environ`` as it was when ``ray.init`` started the local cluster (the raylet
passes it on; later changes do not reach them), or ``ray.init(runtime_env={"env_vars": {...}})``
(the only way on an existing cluster); both were checked on Ray 2.60:

``HESCAPE_FAULT_KILL_AFTER_STEP=<n>``
    right after the first report (and checkpoint) at a step >= n, SIGKILL this process.
``HESCAPE_FAULT_MARKER=<path>`` (required with the above)
    the once-only guard: the kill happens only if this file does not exist yet, and the file
    is created (atomically, ``O_EXCL``) just before the kill, holding ``pid step``. The restarted
    worker sees it and trains on.
``HESCAPE_FAULT_RANK=<r>`` (default 0)
    only this world rank is killed.
``HESCAPE_FAULT_NO_WAIT=1`` (optional)
    kill without waiting for the controller to commit the report: a crash in the ~2 s window
    in which Ray does not know the checkpoint yet (the loop then resumes from the newest
    checkpoint in the run directory, see ``loop.newest_checkpoint``).
``HESCAPE_FAULT_LOG=<path>`` (optional)
    every report appends ``pid step`` here, so a test can count reports per worker process
    (restarts, and which steps each process ran) exactly.

Before the kill the hook waits until the report is *committed*: ``session.wait_reported()``
blocks until the Ray Train controller has registered it (``get_all_reported_checkpoints``
in COMMITTED mode). Without that wait the report may still sit in the worker's result queue
(the controller polls every ~2 s) and die with the process, so whether the driver sees it
would be a race (the restart resumes from the persisted checkpoint either way;
``HESCAPE_FAULT_NO_WAIT`` tests that). Unset, the hook is one environment lookup per report.
"""

from __future__ import annotations

import os
import signal
from typing import Any

KILL_AFTER_STEP = "HESCAPE_FAULT_KILL_AFTER_STEP"
MARKER = "HESCAPE_FAULT_MARKER"
RANK = "HESCAPE_FAULT_RANK"
LOG = "HESCAPE_FAULT_LOG"
NO_WAIT = "HESCAPE_FAULT_NO_WAIT"


def maybe_kill_after_report(step: int, session: Any) -> None:
    """Called by the loop right after ``session.report``; a no-op unless the env asks."""
    after = os.environ.get(KILL_AFTER_STEP)
    if not after:
        return
    _inject(int(after), int(step), session)


def _inject(after: int, step: int, session: Any) -> None:
    marker = os.environ.get(MARKER)
    if not marker:
        raise RuntimeError(f"{KILL_AFTER_STEP} is set but {MARKER} is not: set both "
                           "(the marker file makes the kill happen once)")
    log = os.environ.get(LOG)
    if log:
        with open(log, "a") as fh:  # O_APPEND: one short line per write, atomic enough
            fh.write(f"{os.getpid()} {step}\n")
    if step < after or getattr(session, "world_rank", 0) != int(os.environ.get(RANK, "0")):
        return
    if os.path.exists(marker):
        return
    wait = None if os.environ.get(NO_WAIT) else getattr(session, "wait_reported", None)
    if wait is not None:
        wait()
    if not _claim(marker, f"{os.getpid()} {step}"):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _claim(marker: str, line: str) -> bool:
    """Create ``marker`` exclusively with ``line`` (fsynced): True for the one process that
    made it, False when it already existed (the fault happened already)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


# ------------------------------------------------------------------ driver kills (resume tests)
KILL_DRIVER_AT = "HESCAPE_FAULT_KILL_DRIVER_AT"
DRIVER_PGID = "HESCAPE_FAULT_DRIVER_PGID"
DRIVER_SIGNAL = "HESCAPE_FAULT_DRIVER_SIGNAL"  # KILL (default) or INT (a Ctrl-C)


def arm_driver() -> None:
    """Called by the study driver before Ray starts: with ``HESCAPE_FAULT_KILL_DRIVER_AT``
    set, record the driver's process group for the trial processes (they inherit the
    environment at ``ray.init``). The driver must lead its own process group (a test starts
    it with ``start_new_session=True``), so the kill takes the driver and its local Ray down
    and nothing else."""
    if not os.environ.get(KILL_DRIVER_AT):
        return
    if os.getpgid(0) != os.getpid():
        raise RuntimeError(f"{KILL_DRIVER_AT} is set but the driver does not lead its own "
                           "process group: start it with setsid / start_new_session=True")
    if not os.environ.get(MARKER):
        raise RuntimeError(f"{KILL_DRIVER_AT} is set but {MARKER} is not: set both "
                           "(the marker file makes the kill happen once)")
    os.environ[DRIVER_PGID] = str(os.getpid())


def maybe_kill_driver(point: str, *, step: int | None = None, phase: str | None = None) -> None:
    """SIGKILL the study driver's process group once, at a named instant; a no-op unless
    ``HESCAPE_FAULT_KILL_DRIVER_AT`` names it.

    The value is ``<point>[:<step>][@<phase>]``: ``point`` one of ``precompute`` (driver,
    after ``step`` preprocessing variants), ``report`` (a trial, at its training report of a
    step >= ``step``: checkpoint written and logged to MLflow, Tune not told yet),
    ``evaluating`` (a trial, evaluation computed, nothing logged), ``evaluated`` (a trial,
    evaluation logged, run not closed) or ``study_report`` (driver, every trial done, report
    not written); ``phase`` (``search`` / ``seeds``) restricts trial points to one phase.
    ``HESCAPE_FAULT_MARKER`` makes it happen once. ``HESCAPE_FAULT_DRIVER_SIGNAL=INT`` sends
    the driver a SIGINT instead (Ctrl-C: it stops and exits 130; Ray goes down with it).
    """
    maybe_fill_disk(point, step=step, phase=phase)  # every instant can also fill the disk
    spec = os.environ.get(KILL_DRIVER_AT)
    if not spec or not _driver_point_matches(spec, point, step, phase):
        return
    marker = os.environ.get(MARKER)
    pgid = os.environ.get(DRIVER_PGID)
    if not marker or not pgid:
        raise RuntimeError(f"{KILL_DRIVER_AT} needs {MARKER} and the driver's arm_driver()")
    if not _claim(marker, f"{os.getpid()} {point} {step if step is not None else ''}"):
        return
    if os.environ.get(DRIVER_SIGNAL, "KILL") == "INT":
        os.kill(int(pgid), signal.SIGINT)  # the driver leads its group: pid == pgid
        return
    os.killpg(int(pgid), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)  # a trial process outside the driver's group dies too


def _driver_point_matches(spec: str, point: str, step: int | None, phase: str | None) -> bool:
    where, _, want_phase = spec.partition("@")
    name, _, at = where.partition(":")
    if name != point or (want_phase and want_phase != phase):
        return False
    return not at or (step is not None and step >= int(at))


# ------------------------------------------------------------------ a full disk (ENOSPC tests)
FILL_DISK_AT = "HESCAPE_FAULT_FILL_DISK_AT"
BALLAST = "HESCAPE_FAULT_BALLAST"


def maybe_fill_disk(point: str, *, step: int | None = None, phase: str | None = None) -> None:
    """Fill the filesystem that holds ``HESCAPE_FAULT_BALLAST`` once, at a named instant; a
    no-op unless ``HESCAPE_FAULT_FILL_DISK_AT`` names it (same ``<point>[:<step>][@<phase>]``
    syntax and points as ``HESCAPE_FAULT_KILL_DRIVER_AT``; ``HESCAPE_FAULT_MARKER``, on
    another filesystem, makes it happen once).

    The ballast file grows until the kernel answers ENOSPC, so every later write on that
    filesystem fails for real (``OSError(errno.ENOSPC)``, sqlite's "database or disk is
    full"); deleting the ballast frees the space. Meant for a small filesystem made for the
    test (a tmpfs): on a shared disk it would fill that disk.
    """
    spec = os.environ.get(FILL_DISK_AT)
    if not spec or not _driver_point_matches(spec, point, step, phase):
        return
    marker, ballast = os.environ.get(MARKER), os.environ.get(BALLAST)
    if not marker or not ballast:
        raise RuntimeError(f"{FILL_DISK_AT} needs {MARKER} and {BALLAST}")
    if not _claim(marker, f"{os.getpid()} {point} {step if step is not None else ''}"):
        return
    fill_filesystem(ballast)


def fill_filesystem(ballast: str) -> int:
    """Append to ``ballast`` until its filesystem is full; the bytes written."""
    import errno

    written = 0
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


# ------------------------------------------------------------------ one stack member fails
STACK_MEMBER_FAIL = "HESCAPE_FAULT_STACK_MEMBER_FAIL"
STACK_FAIL_KINDS = ("oom", "step", "validation")


def maybe_fail_stack_member(where: str, cfg: Any, step: int) -> None:
    """Raise for one member of a stacked trainer (``hescape.train.stacked``); a no-op unless
    ``HESCAPE_FAULT_STACK_MEMBER_FAIL`` is ``<kind>@<step>:<key>=<value>``: the member whose
    config has ``<key>`` (dotted, e.g. ``train.lr``) equal to ``<value>`` fails at ``<step>``.

    ``kind``: ``oom`` raises ``torch.OutOfMemoryError`` in its training step (as the CUDA
    allocator would for that member's share of the stack), ``step`` a ``RuntimeError`` in
    its training step, ``validation`` a ``RuntimeError`` in its validation. ``where`` is the
    trainer's call site: ``step`` (``oom`` and ``step`` kinds) or ``validation``. Several
    faults: separate them with ``;``.
    """
    for spec in filter(None, os.environ.get(STACK_MEMBER_FAIL, "").split(";")):
        _member_fault(spec.strip(), where, cfg, step)


def _member_fault(spec: str, where: str, cfg: Any, step: int) -> None:
    head, _, match = spec.partition(":")
    kind, _, at = head.partition("@")
    key, _, want = match.partition("=")
    if kind not in STACK_FAIL_KINDS or not at or not key:
        raise RuntimeError(f"{STACK_MEMBER_FAIL}={spec!r}: use <kind>@<step>:<key>=<value>, "
                           f"kind one of {', '.join(STACK_FAIL_KINDS)}")
    if (where == "validation") != (kind == "validation") or int(at) != int(step):
        return
    value: Any = cfg.model_dump()
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None or not _same(value, want):
        return
    message = f"injected fault ({STACK_MEMBER_FAIL}) for {key}={want} at step {step}"
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory: {message}")
    raise RuntimeError(message)


def _same(value: Any, want: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value) == float(want)
        except ValueError:
            return False
    return str(value) == want


# ------------------------------------------------------------------ holds (node-loss tests)
HOLD_AT = "HESCAPE_FAULT_HOLD_AT"
HOLD_S = "HESCAPE_FAULT_HOLD_S"  # how long a hold lasts at most (default 600 s)
RELEASE = "HESCAPE_FAULT_RELEASE"  # a path: the hold ends as soon as this file exists


def maybe_hold(point: str, *, step: int | None = None, phase: str | None = None) -> None:
    """Stop a trial at a named instant, once, until something outside removes it (a test
    takes its node away); a no-op unless ``HESCAPE_FAULT_HOLD_AT`` names the instant.

    The value is ``<point>[:<step>][@<phase>]`` as for ``HESCAPE_FAULT_KILL_DRIVER_AT``:
    ``report`` (a trial, right after its training report of a step >= ``step`` reached
    MLflow and Tune) or ``evaluating`` (a trial, evaluation computed, nothing logged).
    ``HESCAPE_FAULT_MARKER`` makes it happen once: the holding process creates it with
    ``pid node_id point step`` (its Ray node id, so the test knows which node to remove),
    then sleeps until ``HESCAPE_FAULT_RELEASE`` (a path, optional) exists or for at most
    ``HESCAPE_FAULT_HOLD_S`` seconds (default 600), and carries on if it is still alive then
    (the test's assertions fail instead of hanging).
    """
    spec = os.environ.get(HOLD_AT)
    if not spec or not _driver_point_matches(spec, point, step, phase):
        return
    marker = os.environ.get(MARKER)
    if not marker:
        raise RuntimeError(f"{HOLD_AT} is set but {MARKER} is not: set both "
                           "(the marker file makes the hold happen once)")
    import time

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    if not _claim(marker, f"{os.getpid()} {node} {point} {step if step is not None else '-'}"):
        return
    deadline = time.monotonic() + float(os.environ.get(HOLD_S, "600"))
    release = os.environ.get(RELEASE)
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.5)
