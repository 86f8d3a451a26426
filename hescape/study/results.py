"""Read a study's trials back from MLflow (the source of truth for reports)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

from hescape.study import lineage, run_view

PER_DONOR = "eval/per_donor.csv"  # under the trial directory and the child run's artifacts
EVAL_METRICS = "eval/metrics.json"  # the whole evaluation (the run shows a subset)
PER_DONOR_COLUMNS = ("metric", "donor", "value", "n")


def check_per_donor(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The per-donor table with typed columns; ValueError naming ``source`` if malformed."""
    missing = [c for c in PER_DONOR_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: per-donor table lacks columns {missing}; expected "
                         f"{list(PER_DONOR_COLUMNS)} (one row per metric and held-out donor)")
    out = frame.loc[:, list(PER_DONOR_COLUMNS)].copy()
    out["metric"] = out["metric"].astype(str).str.replace(r"^(test|val)/", "", regex=True)
    out["donor"] = out["donor"].astype(str)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    out["n"] = pd.to_numeric(out["n"], errors="coerce")
    return out


def trial_table(ref: lineage.LineageRef, *, phase: str | None = None,
                study_dir: Path | None = None) -> list[dict[str, Any]]:
    """One row per child run: ids, status, sweep params, final metrics, tags.

    ``status`` is the run's, except that a run the scheduler stopped early reads ``KILLED``
    (MLflow shows it FINISHED, tagged ``hescape.outcome``: ``run_view``); ``outcome`` says
    which. With ``study_dir``, a completed trial's metrics are its full evaluation
    (``trials/<id>/eval/metrics.json``, else the run's artifact of that name) over what the
    run shows in MLflow (the dashboard's subset)."""
    rows = []
    for run in lineage.child_runs(ref):
        tags = run.data.tags
        if phase and tags.get("hescape.phase") != phase:
            continue
        sweep = _json(tags.get("hescape.sweep_params"))
        status = run_view.row_status(run.info.status, tags)
        metrics = dict(run.data.metrics)
        if study_dir is not None and status == "FINISHED":
            metrics = {**full_evaluation(ref, Path(study_dir), tags.get(lineage.TAG_TRIAL, ""),
                                         run.info.run_id), **metrics}
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial_id": tags.get(lineage.TAG_TRIAL, ""),
                "name": tags.get(lineage.TAG_RUN_NAME, ""),
                "status": status,
                "outcome": run_view.outcome(run.info.status, tags),
                "phase": tags.get("hescape.phase", ""),
                "config_id": tags.get("hescape.config_id", ""),
                "seed": tags.get("hescape.seed", ""),
                "preprocess": tags.get("hescape.preprocess", ""),
                "saw_heldout": tags.get("hescape.preprocess_saw_heldout", ""),
                "preprocess_converged": tags.get("hescape.preprocess_converged", ""),
                "preprocess_info": _json(tags.get("hescape.preprocess_info")),
                "split": parse_split(tags.get("hescape.split", "")),
                "baseline_key": tags.get("hescape.baseline_key", ""),
                "baseline_pca_key": tags.get("hescape.baseline_pca_key", ""),
                "fold": tags.get("hescape.fold", "none"),
                "error": tags.get("hescape.error", ""),
                "sweep_params": sweep,
                "params": dict(run.data.params),
                "metrics": metrics,
            }
        )
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def full_evaluation(ref: lineage.LineageRef, study_dir: Path, trial_id: str,
                    run_id: str) -> dict[str, float]:
    """A completed trial's whole evaluation: ``<study_dir>/trials/<id>/eval/metrics.json``,
    else the run's ``eval/metrics.json`` artifact; {} when neither is readable."""
    path = Path(study_dir) / "trials" / trial_id / EVAL_METRICS
    try:
        if path.is_file():
            return _numbers(json.loads(path.read_text()))
        client = lineage.MlflowClient(ref.tracking_uri)
        folder = EVAL_METRICS.rsplit("/", 1)[0]
        listed = {a.path for a in lineage.with_retry(lambda: client.list_artifacts(run_id,
                                                                                   folder))}
        if EVAL_METRICS not in listed:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            local = lineage.with_retry(lambda: client.download_artifacts(run_id, EVAL_METRICS,
                                                                         tmp))
            return _numbers(json.loads(Path(local).read_text()))
    except (OSError, ValueError, MlflowException):
        return {}


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items()  # finite, as MLflow keeps them
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def metric_history(ref: lineage.LineageRef, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of one run."""
    client = lineage.MlflowClient(ref.tracking_uri)
    hist = lineage.with_retry(lambda: client.get_metric_history(run_id, key))
    return sorted((m.step, m.value) for m in hist)


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def parse_split(tag: str) -> dict[str, list[str]]:
    """``train=a,b;val=c;test=d`` (the ``hescape.split`` tag) -> {part: donors}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, tag.split(";")):
        name, _, donors = part.partition("=")
        out[name] = [d for d in donors.split(",") if d]
    return out


def per_donor_tables(
    ref: lineage.LineageRef | None, study_dir: Path, rows: Sequence[dict[str, Any]]
) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Each trial's per-donor evaluation table (``<study_dir>/trials/<id>/eval/per_donor.csv``,
    else the child run's artifact), keyed by trial id; plus notes on unreadable tables.
    Trials without one are absent (evaluations before the table existed)."""
    tables, notes = {}, []
    for row in rows:
        path = Path(study_dir) / "trials" / row["trial_id"] / PER_DONOR
        try:
            if path.is_file():
                table = _read(path, str(path))
            elif ref is not None and row.get("run_id"):
                table = _read_artifact(ref, row["run_id"])
            else:
                table = None
        except (ValueError, OSError, MlflowException) as exc:
            notes.append(f"trial `{row['trial_id']}`: per-donor table not used: {exc}")
            continue
        if table is not None:
            tables[row["trial_id"]] = table
    return tables, notes


def parent_shared_work(ref: lineage.LineageRef) -> dict[str, Any] | None:
    """The study's precomputed work (variants, features) logged on the parent run as
    ``shared_work.json``, or None when absent or unreadable."""
    client = lineage.MlflowClient(ref.tracking_uri)
    try:
        listed = {a.path for a in lineage.with_retry(
            lambda: client.list_artifacts(ref.parent_run_id))}
        if "shared_work.json" not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = lineage.with_retry(
                lambda: client.download_artifacts(ref.parent_run_id, "shared_work.json", tmp))
            value = json.loads(Path(local).read_text())
    except (OSError, ValueError, MlflowException):
        return None
    return value if isinstance(value, dict) else None


def _read(path: Path, source: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"donor": str})
    except pd.errors.ParserError as exc:
        raise ValueError(f"{source}: not a CSV table ({exc})") from exc
    return check_per_donor(frame, source)


def _read_artifact(ref: lineage.LineageRef, run_id: str) -> pd.DataFrame | None:
    """The child run's ``eval/per_donor.csv`` artifact, or None when it has none."""
    client = lineage.MlflowClient(ref.tracking_uri)
    folder = PER_DONOR.rsplit("/", 1)[0]
    listed = {a.path for a in lineage.with_retry(lambda: client.list_artifacts(run_id, folder))}
    if PER_DONOR not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = lineage.with_retry(lambda: client.download_artifacts(run_id, PER_DONOR, tmp))
        return _read(Path(local), f"run {run_id} artifact {PER_DONOR}")
