"""MO-ASHA: asynchronous successive halving that promotes on the Pareto front of several
validation objectives (``sweep.scheduler: moasha``).

Ray Tune's ASHA compares one metric; a batch-correction study has several that pull
against each other (retrieval, batch mixing, expression kept), so ASHA on the first one
stops a variant that mixes donors well and retrieves slightly worse before the report can
show the trade-off. MO-ASHA (Schmucker et al. 2021, arXiv 2106.12639; Salinas et al. 2021)
keeps ASHA's rungs and replaces its comparison:

- Rungs, grace period and reduction factor ``eta`` are ASHA's (one bracket): a trial
  reaching rung ``r`` (``time_attr`` >= the rung's milestone, first report there) is
  compared with the trials recorded at ``r`` before it, then recorded there itself.
- ASHA continues a trial when its value is at least the (1 - 1/eta) quantile (linear
  interpolation) of the values recorded at the rung. MO-ASHA ranks the recorded trials
  together with the new one (``pareto_rank.ranking``: non-dominated sorting over the
  objectives, each with its mode; inside a front NSGA-II's crowding distance, then the
  first objective, ..., then arrival order), scores each by its place (n = best of n + 1
  ... 0 = worst) and applies ASHA's rule to those scores: the trial continues when its score
  is at least the (1 - 1/eta) quantile of the recorded trials' scores. That promotes the top
  ``ceil((n + 1) / eta)`` of the n + 1 trials at the rung (the newest one always when the
  rung was empty).
- One objective: a 1-D Pareto ranking is the order of the values, and the rule is applied
  to the values themselves, so ``moasha`` with one objective makes exactly ASHA's decisions
  (tests/study/test_moasha.py replays recorded curves through both).
- A report without every objective (or ``time_attr``) gets no decision (CONTINUE), as in
  ASHA; a NaN objective counts as the worst value (hescape's trials never send one:
  ``tune_reports.checked``).

Every decision is kept (``decisions``: rung, trial, values, front, place, who dominated it)
and, with ``log_path``, written there as JSON after each one (atomically): the study report
shows them (``hescape.study.report.moasha``). The scheduler's state is plain data: ``DurableScheduler``
pickles it after every result, so a resumed study continues with the same rungs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from hescape import atomic
from hescape.study.pareto_rank import dominance_matrix, orient, ranking

DECISIONS_FILE = "moasha_decisions.json"
TIE_BREAK = ("non-dominated sorting, then NSGA-II crowding distance inside a front (larger "
             "first), then the objectives in order, then arrival")


def decisions_path(study_dir: str | Path, phase: str = "search") -> Path:
    """Where a study's MO-ASHA decisions of ``phase`` are written."""
    return Path(study_dir) / "scheduler" / f"{phase}_{DECISIONS_FILE}"


def read_decisions(path: str | Path) -> dict[str, Any] | None:
    """The decision log at ``path`` (``MOASHA.log``), or None when absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("decisions"), list) else None


class MOASHA(FIFOScheduler):
    """Multi-objective ASHA for Ray Tune (see the module docstring)."""

    def __init__(
        self, *, metrics: Sequence[str], modes: Sequence[str], time_attr: str = "training_iteration",
        max_t: float = 100, grace_period: float = 1, reduction_factor: float = 2,
        log_path: str | Path | None = None,
    ) -> None:
        metrics, modes = list(metrics), list(modes)
        if not metrics or len(metrics) != len(modes):
            raise ValueError(f"MOASHA needs one mode per metric; got metrics={metrics}, "
                             f"modes={modes}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"MOASHA: metrics repeat: {metrics}")
        bad = [m for m in modes if m not in ("max", "min")]
        if bad:
            raise ValueError(f"MOASHA: modes must be 'max' or 'min', got {bad}")
        if not (max_t > 0 and grace_period > 0 and max_t >= grace_period):
            raise ValueError(f"MOASHA: need 0 < grace_period ({grace_period}) <= max_t ({max_t})")
        if reduction_factor <= 1:
            raise ValueError(f"MOASHA: reduction_factor must be > 1, got {reduction_factor}")
        super().__init__()
        self._metrics, self._modes = metrics, modes
        self._metric, self._mode = metrics[0], modes[0]  # what Tune's result check reads
        self._time_attr, self._max_t, self._rf = time_attr, max_t, reduction_factor
        n_rungs = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)  # ASHA's count
        # milestone -> {trial_id: raw objective values}, largest milestone first (as ASHA)
        self._rungs: list[tuple[float, dict[str, list[float]]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(n_rungs))]
        self._arrival: dict[float, list[str]] = {m: [] for m, _ in self._rungs}
        self.decisions: list[dict[str, Any]] = []
        self.log_path = None if log_path is None else str(log_path)

    # ---------------------------------------------------------------- properties
    @property
    def metrics(self) -> list[str]:
        return list(self._metrics)

    @property
    def modes(self) -> list[str]:
        return list(self._modes)

    @property
    def milestones(self) -> list[float]:
        """Rung milestones, smallest first."""
        return sorted(m for m, _ in self._rungs)

    # -------------------------------------------------------------- scheduler API
    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return not (metric or mode)  # built with its own metrics: Tune's would conflict

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        pass

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        values = self._values(result)
        if values is None:
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t:
            return TrialScheduler.STOP  # ASHA's stop_last_trials
        return self._on_result(trial.trial_id, result[self._time_attr], values, decide=True)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        values = self._values(result)
        if values is not None:  # recorded at a rung it had not reported at, as ASHA does
            self._on_result(trial.trial_id, result[self._time_attr], values, decide=False)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        pass

    def debug_string(self) -> str:
        stopped = sum(d["decision"] == "stopped" for d in self.decisions)
        rungs = " | ".join(f"{m:g}: {len(r)}" for m, r in sorted(self._rungs))
        return f"Using MO-ASHA over {self._metrics}: stopped={stopped}; trials per rung {rungs}"

    # ------------------------------------------------------------------- the rule
    def _values(self, result: dict) -> list[float] | None:
        if self._time_attr not in result or any(m not in result for m in self._metrics):
            return None
        return [float(result[m]) for m in self._metrics]

    def _on_result(self, trial_id: str, t: float, values: list[float], *, decide: bool) -> str:
        action = TrialScheduler.CONTINUE
        for milestone, recorded in self._rungs:  # largest first: the highest rung reached
            if t < milestone or trial_id in recorded:
                continue
            if decide:
                action = self._decide(milestone, recorded, trial_id, t, values)
            recorded[trial_id] = values
            self._arrival[milestone].append(trial_id)
            break
        return action

    def _decide(self, milestone: float, recorded: dict[str, list[float]], trial_id: str,
                t: float, values: list[float]) -> str:
        ids = [i for i in self._arrival[milestone] if i in recorded] + [trial_id]
        points = orient([*(recorded[i] for i in ids[:-1]), values], self._modes)
        order, front, crowd = ranking(points)
        place = np.empty(len(ids), dtype=int)
        place[order] = np.arange(len(ids))
        n = len(ids) - 1  # recorded before this trial
        q = (1 - 1 / self._rf) * 100
        if len(self._metrics) == 1:  # ASHA's rule on the values themselves
            score, others = points[-1, 0], points[:-1, 0]
            others = np.where(np.isinf(others), np.nan, others)  # ASHA skips NaN values
            score = np.nan if np.isinf(score) else score
            cutoff = float(np.nanpercentile(others, q)) if n and np.isfinite(others).any() else None
        else:
            scores = (len(ids) - 1 - place).astype(float)  # best = n, worst = 0
            score, cutoff = scores[-1], (float(np.percentile(scores[:-1], q)) if n else None)
        stop = cutoff is not None and bool(score < cutoff)
        dominated_by = [ids[i] for i in np.flatnonzero(dominance_matrix(points)[:, -1])]
        self.decisions.append({
            "rung": float(milestone), "trial_id": trial_id, "time": float(t),
            "values": dict(zip(self._metrics, values)),
            "decision": "stopped" if stop else "promoted",
            "front": int(front[-1]), "crowding": float(crowd[-1]),
            "place": int(place[-1]) + 1, "of": len(ids),
            "score": None if score is None or np.isnan(score) else float(score),
            "cutoff": cutoff, "dominated_by": dominated_by,
            "rung_trials": ids[:-1],
        })
        self._write_log()
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    # ------------------------------------------------------------------- the log
    def log(self) -> dict[str, Any]:
        """Settings and every decision so far (what ``log_path`` holds)."""
        return {"scheduler": "moasha", "metrics": self._metrics, "modes": self._modes,
                "time_attr": self._time_attr, "reduction_factor": self._rf,
                "milestones": self.milestones, "tie_break": TIE_BREAK,
                "rule": "ASHA's (1 - 1/eta) quantile cutoff on the rung's Pareto ranking "
                        "(one objective: on the values)",
                "decisions": self.decisions}

    def _write_log(self) -> None:
        if self.log_path is None:
            return
        atomic.write_json(self.log_path, self.log())
