"""What a trial tells Tune: every report carries the objective(s) and the scheduler's metric.

Tune's strict metric check aborts the *whole* run when one result lacks the metric the
searcher or scheduler was built with (issue 15: a trial restored at its last step sent only
its test metrics). So every report a trial sends goes through ``checked``: a report without
the objective fails that trial with a message naming the metric, never the study. The
report kinds (``REPORT_KIND``) let the driver's console callback tell them apart.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig

REPORT_KIND = "report_kind"
TRAIN, RESUMED, FINAL = "train", "resumed", "final"
TIME_ATTR = "step"  # ASHA counts training steps, not Tune iterations (stable across restores)


class MissingMetricError(RuntimeError):
    """A report lacks a metric the searcher or scheduler needs."""


# This module was ``hescape.study.reporting``. A failed trial's Tune error file (error.pkl)
# pickles its exception by module path, and a resumed study's result grid unpickles every
# one: a study run before the rename, with a trial that failed on a missing metric, resumes
# only if the old path still names this module.
sys.modules.setdefault("hescape.study.reporting", sys.modules[__name__])


def objectives(cfg: StudyConfig) -> tuple[list[str], list[str]]:
    """(metrics, modes) the searcher optimises: ``sweep.objectives``, else ``train.best_metric``."""
    objs = cfg.sweep.objectives if cfg.sweep else []
    if not objs:
        return [cfg.train.best_metric], [cfg.train.best_mode]
    return [o.metric for o in objs], [o.mode for o in objs]


def scheduler_metric(cfg: StudyConfig) -> tuple[str, str] | None:
    """(metric, mode) ASHA compares, or None without a scheduler. Only validation (or
    training) metrics exist mid-trial, so a non-``val/`` objective falls back to best_metric."""
    if cfg.sweep is None or cfg.sweep.scheduler == "none":
        return None
    metrics, modes = objectives(cfg)
    if metrics[0].startswith(("val/", "train/")):
        return metrics[0], modes[0]
    return cfg.train.best_metric, cfg.train.best_mode


def required_metrics(cfg: StudyConfig) -> list[str]:
    """Keys every report of a trial of ``cfg`` must carry (finite)."""
    keys = list(objectives(cfg)[0])
    sched = scheduler_metric(cfg)
    if sched is not None:
        keys += [sched[0], TIME_ATTR]
    return list(dict.fromkeys(keys))


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` (MLflow-valid keys)."""
    from hescape.tracking import sanitize_key

    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[sanitize_key(k)] = float(v)
    return out


def checked(metrics: dict[str, Any], required: list[str], *, kind: str) -> dict[str, Any]:
    """``metrics`` tagged with its kind; raises ``MissingMetricError`` naming what is missing."""
    missing = [k for k in required if k not in metrics]
    if missing:
        have = sorted(k for k in metrics if k.startswith(("val/", "train/")))[:12]
        raise MissingMetricError(
            f"a {kind} report lacks {missing} (the searcher/scheduler compare them; a "
            f"non-finite value counts as missing). Reported: {have}... Set sweep.objectives "
            "and train.best_metric to metrics the validation computes, e.g. val/r5_img2gene.")
    return {**metrics, REPORT_KIND: kind}


def final_report(last_train: dict[str, Any], evaluated: dict[str, float]) -> dict[str, Any]:
    """The trial's closing report: its last training report plus the final evaluation."""
    return {**finite_metrics(last_train), **evaluated, "done": 1.0}


def cached_report(run: Any, run_dir: Path | None = None) -> dict[str, Any]:
    """The closing report of a trial that already FINISHED in MLflow (a resumed study):
    the latest value of every metric it logged, i.e. last training report + evaluation,
    with the full evaluation (``<run_dir>/eval/metrics.json``: the run itself shows only
    the dashboard's subset, ``run_view.mlflow_metrics``) where the trial directory has it."""
    full: dict[str, Any] = {}
    path = None if run_dir is None else Path(run_dir) / "eval" / "metrics.json"
    if path is not None and path.is_file():
        try:
            full = json.loads(path.read_text())
        except (OSError, ValueError):
            full = {}
    return {**finite_metrics(full), **finite_metrics(dict(run.data.metrics)), "done": 1.0}
