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
  stopped again at its first report after the restore.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class DurableScheduler(TrialScheduler):
    """``inner`` (ASHA or FIFO) with its state kept in ``state_path``."""

    def __init__(self, inner: TrialScheduler | None, state_path: str | Path) -> None:
        super().__init__()
        self.inner = inner if inner is not None else FIFOScheduler()
        self.state_path = str(state_path)
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
        tmp = f"{self.state_path}.tmp"
        Path(tmp).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            pickle.dump({"inner": self.inner, "stopped": sorted(self._stopped)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

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
            _snapshot(tune_controller)
            self._snapshotted.update(new)
        return self.inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return self.inner.debug_string()


def _snapshot(tune_controller: Any) -> None:
    """Write Tune's experiment state (trials + searcher) now and wait until it is stored."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller.checkpoint(force=True, wait=True)
