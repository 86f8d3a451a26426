"""Run a study: validate, start/join Ray, shared work once, Tune + Optuna, MLflow, report.

``run_study`` is the library entry point behind ``study/run.py``. Everything that can be
checked before Ray starts is checked first (config, search space, storage, resources), so
a typo fails in a second, not in trial 37.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hescape.config import ConfigError, StudyConfig
from hescape.raystart import init_ray
from hescape.study import lineage
from hescape.study.resources import (
    check_storage,
    git_commit,
    max_concurrent_trials,
    trial_resources,
)
from hescape.study.shared import check_dataset_path, ensure_dataset, precompute, storage_root
from hescape.study.space import validate_space
from hescape.study.trial import SharedContext
from hescape.study.tuner import build_tuner, phase_dir, restore_tuner, seed_points
from hescape.tracking import resolve_tracking_uri

log = logging.getLogger("hescape.study")


@dataclass
class StudyResult:
    name: str
    study_dir: Path
    parent_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    report_dir: Path | None = None


def study_dir_of(cfg: StudyConfig) -> Path:
    return storage_root(cfg) / cfg.name


def preflight(cfg: StudyConfig, *, source: str, resume: bool, overwrite: bool) -> Path:
    """All checks that need neither Ray nor data. Returns the study directory."""
    if cfg.sweep is not None and cfg.sweep.searcher != "grid" and not cfg.sweep.params:
        raise ConfigError(
            f"{source}: sweep.params is empty: a {cfg.sweep.searcher} search needs at least "
            "one parameter (or remove the sweep block to run one trial)."
        )
    validate_space(cfg, source)
    check_dataset_path(cfg)
    root = storage_root(cfg)
    check_storage(root)
    study_dir = study_dir_of(cfg)
    started = (study_dir / "study.json").exists()
    if started and not resume and not overwrite:
        raise ConfigError(
            f"study {cfg.name!r} already exists at {study_dir}. Use --resume to continue it, "
            "--overwrite to discard it and start again, or --set name=<new name>."
        )
    if resume and not started:
        raise ConfigError(f"--resume: no study {cfg.name!r} at {study_dir} to resume")
    if overwrite and study_dir.exists():
        shutil.rmtree(study_dir)
    return study_dir


def run_study(
    cfg: StudyConfig,
    *,
    source: str = "<config>",
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) a whole study and write its report."""
    study_dir = preflight(cfg, source=source, resume=resume, overwrite=overwrite)
    init_ray(address)
    import ray

    res = trial_resources(cfg)  # before anything is written: impossible resources leave nothing
    concurrency = max_concurrent_trials(
        res, ray.cluster_resources(), cfg.sweep.max_concurrent if cfg.sweep else None, source
    )
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, storage_root(cfg))
    data_path = ensure_dataset(cfg, progress=progress)
    from hescape.data import load_paired

    paired = load_paired(data_path)
    base = cfg.model_dump()
    base["data"]["path"] = str(data_path)
    ref = lineage.open_parent(
        uri, cfg.mlflow.experiment or cfg.name, cfg.name, resume=resume,
        tags={"hescape.git_commit": git_commit(), "hescape.data_fingerprint": paired.fingerprint},
        artifact_location=lineage.artifact_location_for(cfg, uri),
    )
    lineage.log_dataset(ref, ref.parent_run_id, paired)  # MLflow's Dataset column and filters
    _write_study_json(study_dir, cfg, ref, source)
    result = StudyResult(cfg.name, study_dir, ref.parent_run_id, uri)
    status = "FAILED"
    previous = _install_signal_handlers()
    try:
        if resume:
            n = lineage.close_orphans(ref, status="KILLED", reason="driver stopped; closed on resume")
            if n:
                print(f"[study] closed {n} orphaned RUNNING trial run(s) from the interrupted driver")
        shared_work = precompute(cfg, paired, progress=progress)
        _log_shared(ref, shared_work)
        shared = SharedContext(base, ref, str(study_dir), paired.fingerprint,
                               {k: list(v) for k, v in paired.split.items()}, git_commit())
        _run_phases(cfg, shared, res, concurrency, resume=resume)
        lineage.close_orphans(ref, status="KILLED", reason="trial stopped before it finished")
        from hescape.study.report import write_report

        result.report_dir = write_report(ref, study_dir, cfg, shared_work)
        result.trials = [r.info.run_id for r in lineage.child_runs(ref)]
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _restore_signal_handlers(previous)
        lineage.finish_run(ref, ref.parent_run_id, status)
    return result


def _run_phases(cfg, shared: SharedContext, res, concurrency: int, *, resume: bool) -> None:
    search_dir = phase_dir(shared, "search")
    if resume and _phase_done(search_dir):
        print("[study] search phase already complete; not re-running it")
    else:
        tuner = (restore_tuner(cfg, shared, res, concurrency, "search")
                 if resume and search_dir.exists() else
                 build_tuner(cfg, shared, res, concurrency, "search"))
        tuner.fit()
        _mark_done(search_dir)
    if cfg.sweep is None or cfg.sweep.seeds <= 1 or cfg.sweep.searcher == "grid":
        return
    seeds_dir = phase_dir(shared, "seeds")
    if resume and _phase_done(seeds_dir):
        return
    points = seed_points(cfg, shared)
    if not points:
        return
    seeded = SharedContext(**{**shared.__dict__, "phase": "seeds"})
    tuner = (restore_tuner(cfg, seeded, res, concurrency, "seeds", points=points)
             if resume and seeds_dir.exists() else
             build_tuner(cfg, seeded, res, concurrency, "seeds", points=points))
    tuner.fit()
    _mark_done(seeds_dir)


def _phase_done(path: Path) -> bool:
    return (path / "hescape_phase_done").exists()


def _mark_done(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "hescape_phase_done").write_text(time.strftime("%F %T"))


def _write_study_json(study_dir: Path, cfg: StudyConfig, ref, source: str) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    info = {"name": cfg.name, "source": source, "tracking_uri": ref.tracking_uri,
            "experiment_id": ref.experiment_id, "parent_run_id": ref.parent_run_id,
            "config": cfg.model_dump()}
    tmp = study_dir / "study.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, study_dir / "study.json")


def _log_shared(ref, shared_work: dict[str, Any]) -> None:
    from hescape.tracking import log_metrics_retry, sanitize_key

    client = lineage.MlflowClient(ref.tracking_uri)
    for v in shared_work["variants"]:
        name = v["method"]
        metrics = {sanitize_key(f"pre_{name}/{k.split('/')[-1]}"): float(x)
                   for k, x in v["metrics"].items() if isinstance(x, (int, float))}
        log_metrics_retry(client, ref.parent_run_id, metrics, step=0)
    lineage.log_json_artifact(ref, ref.parent_run_id, shared_work, "shared_work.json")


def _install_signal_handlers():
    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not in the main thread
        return None


def _restore_signal_handlers(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
