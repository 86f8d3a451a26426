"""A Tune scheduler wrapper that makes a resumed phase decide as an uninterrupted one.

Tune restores a phase from its experiment-state snapshot (trials + searcher state), which
it writes every ~10 s, and it never saves the scheduler. Two consequences after a driver
is killed: a trial started after the last snapshot is unknown to the restored run, so the
searcher asks for it again under a new trial id (a configuration trained twice, one MLflow
run too many: issue 15); and ASHA forgets every rung value it recorded, so it stops
different trials. ``DurableScheduler`` wraps the phase's scheduler (ASHA, or FIFO) and

- forces a snapshot (and waits for it) before any newly added trial can start: every
  trial that does work is in the restored run, under its own id, with the searcher state
  that suggested it;
- saves the inner scheduler and its stop decisions after every result, atomically, and
  loads them when the phase is restored: ASHA's rungs survive, and a trial it stopped is
  stopped again at its first report after the restore;
- keeps a copy of each forced snapshot (``backup_state``): Tune copies its state files into
  the phase directory in place, so a kill during that copy leaves a truncated file, and
  ``repair_state`` puts the last complete copy back before the phase is restored.

Its own files live in a directory of their own (``state_dir``), never in Tune's experiment
directory: a restored Tune run copies every ``*.json``/``*.pkl`` found there into its staging
directory and later copies them back, which would put an old scheduler state over a newer one.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from hescape import atomic

SCHEDULER_FILE = "scheduler.pkl"
BACKUP = "tune_state"


class DurableScheduler(TrialScheduler):
    """``inner`` (ASHA or FIFO) with its state kept in ``state_dir``."""

    def __init__(self, inner: TrialScheduler | None, state_dir: str | Path) -> None:
        super().__init__()
        self.inner = inner if inner is not None else FIFOScheduler()
        self.state_dir = str(state_dir)
        self.state_path = str(Path(state_dir) / SCHEDULER_FILE)
        self._supports_buffered_results = self.inner.supports_buffered_results
        self._stopped: set[str] = set()
        self._snapshotted: set[str] = set()
        self._loaded = False

    # ------------------------------------------------------------------ state
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            with open(self.state_path, "rb") as fh:
                state = pickle.load(fh)
        except FileNotFoundError:
            return
        self.inner, self._stopped = state["inner"], set(state["stopped"])

    def _save(self) -> None:
        state = {"inner": self.inner, "stopped": sorted(self._stopped)}
        atomic.write_with(self.state_path, lambda fh: pickle.dump(state, fh))

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the scheduler with the Tuner
        return {**self.__dict__, "_snapshotted": set(), "_loaded": False}

    # ------------------------------------------------------------- scheduler API
    @property
    def metric(self) -> str | None:
        return self.inner.metric

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._load()
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        stop_if_disk_full(trial)
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        if trial.trial_id in self._stopped:
            return TrialScheduler.STOP  # stopped before the interruption: stop it again
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self._stopped.add(trial.trial_id)
        self._save()  # before the trial acts on the decision
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        new = [t.trial_id for t in tune_controller.get_trials()
               if t.trial_id not in self._snapshotted]
        if new:
            phase = _snapshot(tune_controller)
            backup_state(phase, Path(self.state_dir) / BACKUP)
            self._snapshotted.update(new)
        return self.inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return self.inner.debug_string()


def stop_if_disk_full(trial: Any) -> None:
    """Raise ``DiskFull`` when ``trial`` failed because a write found its disk full.

    Tune asks the scheduler first when a trial errors, before it tells the searcher or marks
    the trial ERROR: raised here, the phase stops with the trial still RUNNING in Tune's
    state, so a resume (after space is freed) runs it again instead of keeping a failure
    that was the disk's, not the configuration's."""
    from hescape.diskfull import DiskFull, path_in_text, text_is_disk_full

    try:
        text = Path(trial.error_file).read_text()
    except (OSError, TypeError):
        return
    if text_is_disk_full(text):
        raise DiskFull(path_in_text(text), f"trial {trial.trial_id} could not write")


def _snapshot(tune_controller: Any) -> Path:
    """Write Tune's experiment state (trials + searcher) now and wait until it is stored in
    the phase (experiment) directory, which is returned."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller.checkpoint(force=True, wait=True)
    return Path(controller.experiment_path)


# ------------------------------------------------------------- Tune's state files
# experiment_state / search_gen_state / searcher-state / basic-variant-state /
# callback-states, one set per driver session, named by the session's start time
_STATE = re.compile(r"^(experiment_state|search_gen_state|searcher-state|basic-variant-state|"
                    r"callback-states)-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.(json|pkl)$")


def _newest_session(phase: Path) -> list[Path]:
    """The state files of the newest session in ``phase`` (the ones Tune restores from)."""
    found = [(m.group(2), p) for p in phase.iterdir() if (m := _STATE.match(p.name))]
    if not found:
        return []
    newest = max(session for session, _ in found)
    return [p for session, p in found if session == newest]


def _readable(path: Path) -> bool:
    """Whether ``path`` loads (Tune writes some ``.json`` state files as pickles)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    for load in (json.loads, pickle.loads):
        try:
            load(data)
        except Exception:  # noqa: BLE001, S112 - truncated file, other format: try the next
            continue
        return True
    return False


def backup_state(phase: Path, root: Path) -> None:
    """Copy the newest complete set of Tune's state files in ``phase`` to ``root/<n>`` and
    point ``root/current`` at it (atomically): a half-copied set is never the current one."""
    files = _newest_session(phase)
    if not files or not all(_readable(p) for p in files):
        return
    root.mkdir(parents=True, exist_ok=True)
    current = _current(root)
    target = root / str(int(current.name) + 1 if current is not None else 0)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for path in files:
        shutil.copy2(path, target / path.name)
    atomic.write_text(root / "current", target.name)
    if current is not None:
        shutil.rmtree(current, ignore_errors=True)


def _current(root: Path) -> Path | None:
    try:
        path = root / (root / "current").read_text().strip()
    except OSError:
        return None
    return path if path.is_dir() else None


def repair_state(phase: Path, root: Path) -> bool:
    """Before a restore: if the newest session's state files in ``phase`` are not all
    readable (the driver died while Tune copied them), drop them and put the last backup
    (``backup_state(phase, root)``) in their place. True if a repair was needed."""
    files = _newest_session(phase)
    if all(_readable(p) for p in files):
        return False
    backup = _current(root)
    if backup is None:
        raise RuntimeError(f"{phase}: Tune's state files {[p.name for p in files]} are cut short "
                           "and there is no complete copy to restore from; start the study "
                           "again with --overwrite")
    for path in files:
        path.unlink()
    for path in backup.iterdir():
        with atomic.atomic_path(phase / path.name) as tmp:
            shutil.copy2(path, tmp)
    return True
