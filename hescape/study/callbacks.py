"""Driver-side Tune callback: close the MLflow run of a trial that ended from outside.

A trial closes its own run when it finishes or raises. It cannot when it is stopped from
outside: ASHA stops it, its worker process dies, or Ray kills its actor. This callback runs
in the driver and closes such runs (KILLED or FAILED, with the reason), so the dashboard
never shows a trial RUNNING forever.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from hescape.study import lineage


class MlflowCloser(Callback):
    def __init__(self, ref: lineage.LineageRef) -> None:
        self.ref = ref

    def _close(self, trial: Any, status: str, reason: str) -> None:
        for run in lineage.child_runs(self.ref, status="RUNNING"):
            if run.data.tags.get(lineage.TAG_TRIAL) == trial.trial_id:
                lineage.finish_run(self.ref, run.info.run_id, status, error=reason)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "KILLED", "stopped by the scheduler before finishing (e.g. ASHA)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = getattr(trial, "error_file", None) or "trial raised; see the Tune error file"
        self._close(trial, "FAILED", f"trial errored: {reason}")
