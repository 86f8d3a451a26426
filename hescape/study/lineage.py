"""MLflow lineage: one experiment per study, one parent run per study, one child per trial.

Runs are found again by tags, never by in-memory maps, so a restored driver or a restarted
trial reattaches to its run instead of opening a second one (the trap of Ray's
``MLflowLoggerCallback``). Orphans (RUNNING runs of a crashed driver) are closed on resume.

What the MLflow UI shows comes from here too: the experiment is tagged as a training
(``custom_model_development``) experiment, the parent run carries MLflow's standard source
tags (entry point, git commit; the Source column) and the dataset as MLflow dataset inputs,
one per split part (the Dataset column, ``dataset.name``/``dataset.context`` filters); child
runs inherit both from the parent when they are created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from hescape.study import run_view
from hescape.tracking import (
    ARTIFACT_LOCATION_ENV,
    flatten,
    resolve_artifact_location,
    sanitize_key,
    scrub_params,
    scrub_text,
    with_retry,
)

TAG_STUDY = "hescape.study"
TAG_ROLE = "hescape.role"
TAG_TRIAL = "ray.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
# MLflow 3's experiment kind; "custom_model_development" is the UI's "Machine learning" kind
# (training runs table), "genai_development" its GenAI view (traces, judges, prompts).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TAG_ENTRY_POINT = "mlflow.project.entryPoint"
# Run tags a child copies from its parent (run in another process, where sys.argv is Ray's).
INHERITED_TAGS = ("mlflow.user", "mlflow.source.", TAG_ENTRY_POINT)
DATA_CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT

log = logging.getLogger("hescape.study")


@dataclass(frozen=True)
class LineageRef:
    """What a trial process needs to find its study's MLflow runs (plain data, picklable)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study: str


def _filter(**tags: str) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def get_or_create_experiment(
    client: MlflowClient, name: str, *, artifact_location: str | None = None
) -> str:
    """The experiment ``name`` (restored if deleted), created with ``artifact_location``.

    Either way it carries the training experiment-kind tag (unless someone chose a kind).
    An existing experiment keeps the artifact location it was created with (MLflow cannot
    move it); a different configured one is reported.
    """
    exp = with_retry(lambda: client.get_experiment_by_name(name))
    if exp is None:
        kind = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_TRAINING}
        return with_retry(lambda: client.create_experiment(
            name, artifact_location=artifact_location, tags=kind))
    if exp.lifecycle_stage == "deleted":
        with_retry(lambda: client.restore_experiment(exp.experiment_id))
    if TAG_EXPERIMENT_KIND not in exp.tags:
        with_retry(lambda: client.set_experiment_tag(
            exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING))
    if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        log.warning("MLflow experiment %r keeps the artifact location it was created with (%s), "
                    "not %s", name, exp.artifact_location, artifact_location)
    return exp.experiment_id


def entry_point(argv: list[str] | None = None) -> str:
    """The command that started the study: program and leading positional arguments.

    ``study/run.py experiments/demo.yaml --set x=1`` -> ``study/run.py experiments/demo.yaml``;
    a console script is named by its basename (``hescape study run ...``).
    """
    argv = list(sys.argv if argv is None else argv) or ["python"]
    prog = argv[0] if argv[0].endswith(".py") else Path(argv[0]).name
    words = [prog]
    for arg in argv[1:]:
        if arg.startswith("-") or len(words) == 4:
            break
        words.append(arg)
    return scrub_text(" ".join(words))[:500]


def _package_git(*args: str) -> str:
    root = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """MLflow's standard run-context tags (user, source name/type, git) plus the entry point.

    The git commit falls back to the checkout ``hescape`` is imported from when the entry
    script is not in a git repository (an installed console script).
    """
    from mlflow.tracking.context.registry import resolve_tags

    try:
        tags = {k: str(v) for k, v in resolve_tags().items()}
    except Exception as exc:  # noqa: BLE001 - a context provider must never stop a study
        log.warning("MLflow run-context tags unavailable: %s", exc)
        tags = {}
    tags.setdefault("mlflow.source.name", sys.argv[0] if sys.argv else "python")
    tags.setdefault("mlflow.source.type", "LOCAL")
    if "mlflow.source.git.commit" not in tags and (commit := _package_git("rev-parse", "HEAD")):
        tags["mlflow.source.git.commit"] = commit
    tags[TAG_ENTRY_POINT] = entry_point(argv)
    return tags


def find_parent(client: MlflowClient, experiment_id: str, study: str) -> str | None:
    runs = with_retry(
        lambda: client.search_runs(
            [experiment_id], _filter(**{TAG_STUDY: study, TAG_ROLE: "parent"}), max_results=5
        )
    )
    return runs[0].info.run_id if runs else None


def artifact_location_for(cfg: Any, tracking_uri: str) -> str | None:
    """Artifact location of the study's experiment (``resolve_artifact_location`` of ``cfg``),
    checked: an unknown scheme or a missing client library fails here, not in every trial."""
    experiment = cfg.mlflow.experiment or cfg.name
    location = resolve_artifact_location(cfg.mlflow.artifact_location, cfg.storage_dir,
                                         tracking_uri, experiment)
    check_artifact_location(location)
    return location


_CLIENT_LIBRARY = {"s3": "boto3", "r2": "boto3", "b2": "boto3"}  # imported only on first upload


def check_artifact_location(location: str | None) -> None:
    """Raise ConfigError when MLflow cannot write artifacts to ``location`` from this machine."""
    if location is None or location.startswith("file:"):
        return
    from importlib.util import find_spec

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from hescape.config import ConfigError

    library = _CLIENT_LIBRARY.get(location.partition("://")[0].lower())
    try:
        get_artifact_repository(location)
        if library and find_spec(library) is None:
            raise ImportError(f"No module named {library!r}")
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unusable
        raise ConfigError(
            f"mlflow.artifact_location (or ${ARTIFACT_LOCATION_ENV}) = {scrub_text(location)}: "
            f"MLflow cannot use this artifact store ({type(exc).__name__}: {exc}). Install its "
            "client library (s3: boto3; gs: google-cloud-storage) or unset it to keep artifacts "
            "under storage_dir."
        ) from None


def open_parent(
    tracking_uri: str,
    experiment: str,
    study: str,
    *,
    resume: bool,
    tags: dict[str, str],
    artifact_location: str | None = None,
) -> LineageRef:
    """Create the study's parent run, or reuse it on resume (set back to RUNNING).

    A new experiment stores its artifacts at ``artifact_location`` (see
    ``hescape.tracking.resolve_artifact_location``); the run gets ``source_tags()``.
    """
    client = MlflowClient(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment, artifact_location=artifact_location)
    run_id = find_parent(client, exp_id, study) if resume else None
    if run_id is None:
        all_tags = {**source_tags(), TAG_STUDY: study, TAG_ROLE: "parent", TAG_RUN_NAME: study,
                    **tags}
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
    parent = with_retry(lambda: client.get_run(ref.parent_run_id))
    all_tags = {
        **{k: v for k, v in parent.data.tags.items() if k.startswith(INHERITED_TAGS)},
        TAG_PARENT: ref.parent_run_id,
        TAG_TRIAL: trial_id,
        TAG_STUDY: ref.study,
        TAG_ROLE: "trial",
        TAG_RUN_NAME: name,
        **tags,
    }
    tried = []

    def create() -> Any:
        # a retried create_run whose first try reached the server (the answer was lost in a
        # restart) would open a second run for the trial: look for the first one before
        if tried and (found := find_child(ref, trial_id)) is not None:
            return found
        tried.append(1)
        return client.create_run(ref.experiment_id, tags=all_tags, run_name=name)

    run = with_retry(create)
    inputs = list(parent.inputs.dataset_inputs) if parent.inputs else []
    if inputs:
        with_retry(lambda: client.log_inputs(run.info.run_id, datasets=inputs))
    return run.info.run_id


def dataset_inputs(
    name: str,
    fingerprint: str,
    split: dict[str, list[str]],
    *,
    uri: str,
    n_spots: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Any]:
    """One MLflow dataset input per split part (context tag = the part: train/val/test).

    Name = the dataset's name; digest = a 12-hex hash of (fingerprint, part, donors), so each
    part is its own dataset in MLflow's store; the profile holds the full fingerprint, the
    part's donors and sizes. Filter runs with ``dataset.name = '<name>'`` and
    ``dataset.context = 'test'``; the fingerprint is also the ``hescape.data_fingerprint`` tag.
    """
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = LocalArtifactDatasetSource(uri).to_json()
    out = []
    for part, donors in split.items():
        donors = sorted(donors)
        digest = hashlib.sha256(f"{fingerprint}|{part}|{','.join(donors)}".encode()).hexdigest()
        profile = {"fingerprint": fingerprint, "part": part, "donors": donors,
                   "n_donors": len(donors), **(extra or {})}
        if n_spots and part in n_spots:
            profile["n_spots"] = int(n_spots[part])
        dataset = Dataset(name=name[:500], digest=digest[:12], source_type="local",
                          source=source, profile=json.dumps(profile))
        out.append(DatasetInput(dataset, tags=[InputTag(DATA_CONTEXT_TAG, part)]))
    return out


def log_dataset(ref: LineageRef, run_id: str, paired: Any) -> None:
    """Log a ``PairedData`` (name, fingerprint, split donors, sizes) as the run's dataset inputs."""
    parts = {k: list(v) for k, v in paired.split.items()}
    inputs = dataset_inputs(
        Path(paired.path).name, paired.fingerprint, parts, uri=str(Path(paired.path).resolve()),
        n_spots={part: len(paired.indices(part)) for part in parts},
        extra={"n_genes": int(paired.manifest.get("n_vars", 0)),
               "patch_size": paired.manifest.get("patch_size"),
               "source": paired.manifest.get("source")},
    )
    client = MlflowClient(ref.tracking_uri)
    with_retry(lambda: client.log_inputs(run_id, datasets=inputs))


def log_params(ref: LineageRef, run_id: str, config: dict[str, Any],
               base: dict[str, Any] | None = None) -> None:
    """Flattened, secret-scrubbed params (MLflow caps values at 6000 chars). With ``base``
    (the study's config, logged whole on the parent run), only what a child run shows:
    ``run_view.child_params``."""
    client = MlflowClient(ref.tracking_uri)
    flat = scrub_params(flatten(config))
    if base is not None:
        flat = run_view.child_params(flat, scrub_params(flatten(base)))
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


def dashboard_page(experiment_id: str, order_by: str | None = None) -> str:
    """The UI page of an experiment's runs in the training view. With ``order_by`` (a
    metric): the study's trials only, flat (not folded under the parent run), best first.
    MLflow 3.17 reads ``orderByKey``/``searchFilter`` from the URL of the ``/runs`` page
    (not of the bare experiment page)."""
    if not order_by:
        return f"#/experiments/{experiment_id}?workflowType=machine_learning"
    query = urllib.parse.urlencode({
        "workflowType": "machine_learning", "orderByKey": f"metrics.`{order_by}`",
        "orderByAsc": "false", "searchFilter": f"tags.`{TAG_ROLE}` = 'trial'"},
        quote_via=urllib.parse.quote, safe="")
    return f"#/experiments/{experiment_id}/runs?{query}"


def dashboard_hint(tracking_uri: str, run_id: str, *, port: int = 5000,
                   order_by: str | None = None) -> str:
    """How to open ``run_id``'s experiment in the MLflow UI (training view, sorted by the
    metric ``order_by``), as one line."""
    client = MlflowClient(tracking_uri)
    exp_id = with_retry(lambda: client.get_run(run_id)).info.experiment_id
    page = dashboard_page(exp_id, order_by)
    if tracking_uri.partition("://")[0].lower() in ("http", "https"):
        return f"{tracking_uri.rstrip('/')}/{page}"
    prefix, suffix = "sqlite:///", "/mlflow.db"
    if tracking_uri.startswith(prefix) and tracking_uri.endswith(suffix):
        storage = tracking_uri[len(prefix):-len(suffix)]  # sqlite:////abs -> /abs
        return (f"make mlflow-ui MLFLOW_STORAGE={storage} (in the hescape checkout), then "
                f"http://127.0.0.1:{port}/{page}")
    return (f"an MLflow server over {scrub_text(tracking_uri)} (README: Reviewing a study in "
            f"MLflow), page /{page}")


def finish_run(ref: LineageRef, run_id: str, status: str, *, error: str | None = None,
               tags: dict[str, str] | None = None) -> None:
    """Close a run with FINISHED/FAILED/KILLED; the error text goes in a tag, ``tags`` (the
    outcome: ``hescape.study.run_view``) are set first."""
    client = MlflowClient(ref.tracking_uri)
    if error:
        with_retry(lambda: client.set_tag(run_id, "hescape.error", error[:4500]))
    for key, value in (tags or {}).items():
        with_retry(lambda k=key, v=value: client.set_tag(run_id, k, v))
    with_retry(lambda: client.set_terminated(run_id, status=status))


def close_orphans(ref: LineageRef, *, status: str = "KILLED", reason: str) -> int:
    """Close every child still RUNNING (the driver or its trial died with it open)."""
    n = 0
    for run in child_runs(ref, status="RUNNING"):
        finish_run(ref, run.info.run_id, status, error=reason,
                   tags=run_view.outcome_tags(run_view.INTERRUPTED))
        n += 1
    return n


__all__ = [
    "LineageRef",
    "artifact_location_for",
    "check_artifact_location",
    "child_runs",
    "close_orphans",
    "dashboard_hint",
    "dashboard_page",
    "dataset_inputs",
    "entry_point",
    "find_child",
    "finish_run",
    "get_or_create_experiment",
    "log_dataset",
    "log_artifacts",
    "log_json_artifact",
    "log_params",
    "open_child",
    "open_parent",
    "source_tags",
]
