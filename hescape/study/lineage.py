"""MLflow lineage: one experiment per study, one parent run per study, one child per trial.

Runs are found again by tags, never by in-memory maps, so a restored driver or a restarted
trial reattaches to its run instead of opening a second one (the trap of Ray's
``MLflowLoggerCallback``). Orphans (RUNNING runs of a crashed driver) are closed on resume.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from hescape.tracking import flatten, sanitize_key, scrub_params, with_retry

TAG_STUDY = "hescape.study"
TAG_ROLE = "hescape.role"
TAG_TRIAL = "ray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"


@dataclass(frozen=True)
class LineageRef:
    """What a trial process needs to find its study's MLflow runs (plain data, picklable)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str


def _filter(**tags: str) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = with_retry(lambda: client.get_experiment_by_name(name))
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            with_retry(lambda: client.restore_experiment(exp.experiment_id))
        return exp.experiment_id
    return with_retry(lambda: client.create_experiment(name))


def find_parent(client: MlflowClient, experiment_id: str, study: str) -> str | None:
    runs = with_retry(
        lambda: client.search_runs(
            [experiment_id], _filter(**{TAG_STUDY: study, TAG_ROLE: "parent"}), max_results=5
        )
    )
    return runs[0].info.run_id if runs else None


def open_parent(
    tracking_uri: str, experiment: str, study: str, *, resume: bool, tags: dict[str, str]
) -> LineageRef:
    """Create the study's parent run, or reuse it on resume (set back to RUNNING)."""
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment)
    run_id = find_parent(client, exp_id, study) if resume else None
    if run_id is None:
        all_tags = {TAG_STUDY: study, TAG_ROLE: "parent", TAG_RUN_NAME: study, **tags}
        run = with_retry(lambda: client.create_run(exp_id, tags=all_tags, run_name=study))
        run_id = run.info.run_id
    else:
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
        with_retry(lambda: client.set_tag(run_id, "hescape.resumed_at", time.strftime("%F %T")))
    return LineageRef(tracking_uri, exp_id, run_id, study)


def child_runs(ref: LineageRef, *, status: str | None = None) -> list[Any]:
    """All child runs of the study's parent (optionally only those with ``status``)."""
    client = MlflowClient(ref.tracking_uri)
    query = _filter(**{TAG_PARENT: ref.parent_run_id})
    if status:
        query += f" and attributes.status = '{status}'"
    return with_retry(lambda: client.search_runs([ref.experiment_id], query, max_results=10000))


def find_child(ref: LineageRef, trial_id: str) -> Any | None:
    """The child run tagged with ``trial_id`` (a restored or restarted trial), or None."""
    client = MlflowClient(ref.tracking_uri)
    query = _filter(**{TAG_PARENT: ref.parent_run_id, TAG_TRIAL: trial_id})
    existing = with_retry(lambda: client.search_runs([ref.experiment_id], query, max_results=2))
    return existing[0] if existing else None


def open_child(
    ref: LineageRef, trial_id: str, *, existing: Any | None, name: str, tags: dict[str, str]
) -> str:
    """Reattach to ``existing`` (from ``find_child``), else create the trial's child run."""
    client = MlflowClient(ref.tracking_uri)
    if existing is not None:
        run_id = existing.info.run_id
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
        with_retry(lambda: client.set_tag(run_id, "hescape.reattached", "true"))
        return run_id
    all_tags = {
        TAG_PARENT: ref.parent_run_id,
        TAG_TRIAL: trial_id,
        TAG_STUDY: ref.study,
        TAG_ROLE: "trial",
        TAG_RUN_NAME: name,
        **tags,
    }
    run = with_retry(lambda: client.create_run(ref.experiment_id, tags=all_tags, run_name=name))
    return run.info.run_id


def log_params(ref: LineageRef, run_id: str, config: dict[str, Any]) -> None:
    """Flattened, secret-scrubbed params (MLflow caps values at 6000 chars)."""
    client = MlflowClient(ref.tracking_uri)
    flat = scrub_params(flatten(config))
    existing = with_retry(lambda: client.get_run(run_id)).data.params
    from mlflow.entities import Param

    params = [
        Param(sanitize_key(k), str(v)[:6000])
        for k, v in flat.items()
        if sanitize_key(k) not in existing
    ]
    for i in range(0, len(params), 100):
        chunk = params[i : i + 100]
        with_retry(lambda chunk=chunk: client.log_batch(run_id, params=chunk))


def log_json_artifact(ref: LineageRef, run_id: str, obj: Any, name: str) -> None:
    """Write ``obj`` as JSON and log it as an artifact of the run."""
    client = MlflowClient(ref.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        with_retry(lambda: client.log_artifact(run_id, str(path)))


def log_artifacts(ref: LineageRef, run_id: str, paths: dict[str, Path], subdir: str) -> None:
    client = MlflowClient(ref.tracking_uri)
    for path in paths.values():
        if Path(path).is_file():
            with_retry(lambda p=path: client.log_artifact(run_id, str(p), artifact_path=subdir))


def finish_run(ref: LineageRef, run_id: str, status: str, *, error: str | None = None) -> None:
    """Close a run with FINISHED/FAILED/KILLED; the error text goes in a tag."""
    client = MlflowClient(ref.tracking_uri)
    if error:
        with_retry(lambda: client.set_tag(run_id, "hescape.error", error[:4500]))
    with_retry(lambda: client.set_terminated(run_id, status=status))


def close_orphans(ref: LineageRef, *, status: str = "KILLED", reason: str) -> int:
    """Close every child still RUNNING (the driver or its trial died with it open)."""
    n = 0
    for run in child_runs(ref, status="RUNNING"):
        finish_run(ref, run.info.run_id, status, error=reason)
        n += 1
    return n


__all__ = [
    "LineageRef",
    "child_runs",
    "close_orphans",
    "find_child",
    "finish_run",
    "log_artifacts",
    "log_json_artifact",
    "log_params",
    "open_child",
    "open_parent",
]
