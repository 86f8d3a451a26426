"""Driver-side Tune callbacks: close the MLflow runs of trials ended from outside, and print
one concise console line per trial event.

A trial closes its own run when it finishes or raises. It cannot say why when it is stopped
from outside: the early-stopping scheduler (ASHA or MO-ASHA) stops it, its worker process
dies, or Ray kills its actor. ``MlflowCloser``
runs in the driver and records that (a scheduler's stop: FINISHED tagged ``hescape.outcome``
"stopped early", so it does not read as a failure; an error: FAILED with the reason), so the
dashboard never shows a trial RUNNING forever. ``ConsoleProgress`` replaces Tune's status tables
(``--verbose`` brings them back) with lines such as::

    [search 3/12 1a2b3c4d] started: loss.name=clip train.lr=0.00201
    [search 3/12 1a2b3c4d] step 50: val/r5_img2gene 0.0812
    [search 3/12 1a2b3c4d] stopped by ASHA at step 50: val/r5_img2gene 0.0812

Both name the scheduler actually in use (``scheduler_name``: ASHA, MO-ASHA).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from hescape.study import lineage, run_view
from hescape.study.tune_reports import FINAL, REPORT_KIND, RESUMED, TIME_ATTR, TRAIN

# Set by the driver's SIGINT/SIGTERM handler before it raises KeyboardInterrupt. The raise
# can land inside a finaliser (e.g. a Ray ObjectRef's __dealloc__ in Tune's loop), where
# Python prints "Exception ignored" and carries on; ``Interrupted`` raises it again.
INTERRUPTED = threading.Event()

SCHEDULER_NAMES = {"asha": "ASHA", "moasha": "MO-ASHA"}


def scheduler_name(scheduler: str | None) -> str:
    """How messages name ``sweep.scheduler`` (``asha`` -> ASHA, ``moasha`` -> MO-ASHA)."""
    if not scheduler or scheduler == "none":
        return "the scheduler"
    return SCHEDULER_NAMES.get(scheduler, scheduler)


class Interrupted(Callback):
    """Re-raises a Ctrl-C / SIGTERM the driver received at the start of each Tune step."""

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt("interrupted (signal received during Tune's loop)")


def stopped_by_scheduler(trial: Any) -> bool:
    """True when Tune ended ``trial`` on a training report (the early-stopping scheduler:
    ASHA or MO-ASHA), not on its final one."""
    last = getattr(trial, "last_result", None) or {}
    return bool(last) and last.get(REPORT_KIND) in (TRAIN, RESUMED)


class MlflowCloser(Callback):
    def __init__(self, ref: lineage.LineageRef, scheduler: str = "asha") -> None:
        """``scheduler``: ``sweep.scheduler`` (named in the KILLED reason)."""
        self.ref = ref
        self.scheduler = scheduler

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not stopped_by_scheduler(trial):
            return  # the trial closed its run itself (FINISHED)
        run = lineage.find_child(self.ref, trial.trial_id)
        if run is not None and run_view.outcome(run.info.status,
                                                run.data.tags) != run_view.COMPLETED:
            # FINISHED, tagged "stopped early": a scheduler's stop is an outcome of the
            # search, not a failure (the dashboard's red cross); run_view says how it reads
            step = int(trial.last_result.get(TIME_ATTR, 0))
            by = f"{self._name()} at step {step}"
            lineage.finish_run(self.ref, run.info.run_id, "FINISHED",
                               tags=run_view.outcome_tags(run_view.STOPPED, stopped_by=by))

    def _name(self) -> str:
        return scheduler_name(getattr(self, "scheduler", "asha"))  # older pickles: ASHA

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = getattr(trial, "error_file", None) or "trial raised; see the Tune error file"
        for run in lineage.child_runs(self.ref, status="RUNNING"):
            if run.data.tags.get(lineage.TAG_TRIAL) == trial.trial_id:
                lineage.finish_run(self.ref, run.info.run_id, "FAILED",
                                   error=f"trial errored: {reason}",
                                   tags=run_view.outcome_tags(run_view.FAILED))


class ConsoleProgress(Callback):
    """One line per trial event: started, evaluation step, finished, stopped, failed."""

    def __init__(self, phase: str, metrics: list[str], total: int | None = None,
                 out: TextIO | None = None, *, first_tag: int = 1,
                 scheduler: str = "asha") -> None:
        """``total``: the trials the phase runs (``tuner.expected_trials``); ``first_tag``:
        the number Tune gives the phase's first trial (0 for a grid, whose variant generator
        counts from 0; 1 for a searcher), so lines read 1/N .. N/N either way (stable across
        a resume: the number comes from the trial's own tag); ``scheduler``:
        ``sweep.scheduler``, named when it stops a trial."""
        self.phase, self.metrics, self.total, self.out = phase, list(metrics), total, out
        self.first_tag = first_tag
        self.scheduler = scheduler

    def _line(self, trial: Any, text: str) -> None:
        tag = str(getattr(trial, "experiment_tag", "") or "").split("_")[0]
        first = getattr(self, "first_tag", 1)  # a callback restored from an older pickle
        number = int(tag) - first + 1 if tag.isdigit() else None
        where = f"{number}/{self.total} " if number is not None and self.total else ""
        print(f"[{self.phase} {where}{trial.trial_id}] {text}", file=self.out or sys.stdout,
              flush=True)

    def _values(self, result: dict[str, Any], extra: tuple[str, ...] = ()) -> str:
        keys = [*self.metrics, *extra]
        return ", ".join(f"{k} {_fmt(result[k])}" for k in dict.fromkeys(keys) if k in result)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from hescape.study.trial import trial_params

        params = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial_params(trial.config).items()))
        self._line(trial, f"started: {params}" if params else "started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        kind = result.get(REPORT_KIND)
        if kind in (TRAIN, RESUMED) and not result.get("done"):
            what = "resumed at step" if kind == RESUMED else "step"
            self._line(trial, f"{what} {int(result.get(TIME_ATTR, 0))}: {self._values(result)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        step = int(last.get(TIME_ATTR, 0))
        if stopped_by_scheduler(trial):
            name = scheduler_name(getattr(self, "scheduler", "asha"))  # older pickles: ASHA
            self._line(trial, f"stopped by {name} at step {step}: {self._values(last)}")
        elif last.get(REPORT_KIND) == FINAL:
            tests = tuple("test/" + m.split("/", 1)[1] for m in self.metrics if "/" in m)
            self._line(trial, f"finished at step {step}: {self._values(last, tests)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, f"failed: {_error_line(getattr(trial, 'error_file', None))}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _error_line(path: str | None) -> str:
    """The last line of a Tune error file (the exception), else a pointer to it."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, TypeError):
        return "see the Tune error file"
    return lines[-1][:300] if lines else f"see {path}"
