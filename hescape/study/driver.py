"""Run a study: validate, start/join Ray, shared work once, Tune + Optuna, MLflow, report.

``run_study`` is the library entry point behind ``study/run.py``. Everything that can be
checked before Ray starts is checked first (config, search space, storage, resources), so
a typo fails in a second, not in trial 37.

Resume: ``study.json`` (written before the parent run opens, rewritten FINISHED with the
report's path at the end) says what exists; a finished study resumes to a no-op. Each Tune
phase is restored from its own state (``tuner.restore_tuner``) and marked done only when
every trial in it ended, so a study killed at any instant resumes to the same trials.
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

from hescape import atomic, paths
from hescape.config import ConfigError, StudyConfig
from hescape.raystart import init_ray
from hescape.study import lineage
from hescape.study.callbacks import INTERRUPTED
from hescape.study.resources import (
    check_storage,
    git_commit,
    max_concurrent_trials,
    trial_resources,
)
from hescape.study.shared import check_dataset_path, ensure_dataset, precompute, storage_root
from hescape.study.space import validate_space
from hescape.study.trial import SharedContext
from hescape.study.tuner import (
    build_tuner,
    expected_trials,
    phase_dir,
    restore_tuner,
    seed_points,
    set_tune_output,
)
from hescape.tracking import resolve_tracking_uri
from hescape.train.faults import arm_driver, maybe_kill_driver

log = logging.getLogger("hescape.study")


@dataclass
class StudyResult:
    name: str
    study_dir: Path
    parent_run_id: str
    tracking_uri: str
    trials: list[str] = field(default_factory=list)  # MLflow run ids of the trials
    report_dir: Path | None = None


def study_dir_of(cfg: StudyConfig) -> Path:
    """``<storage_dir>/<name>`` (``hescape.paths``)."""
    return paths.study_dir(cfg.storage_dir, cfg.name)


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
        raise ConfigError(f"--resume: no study {cfg.name!r} at {study_dir} to resume (it never "
                          "got past its start): run it without --resume")
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
    verbose: bool = False,
) -> StudyResult:
    """Run (or resume) a whole study and write its report. ``verbose``: Tune's status tables
    and the trials' own per-step lines instead of one console line per trial event."""
    study_dir = preflight(cfg, source=source, resume=resume, overwrite=overwrite)
    finished = finished_study(study_dir) if resume else None
    if finished is not None:
        print(f"[study] {cfg.name} already finished: nothing to resume")
        return finished
    arm_driver()  # tests only: HESCAPE_FAULT_KILL_DRIVER_AT
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
    _write_study_json(study_dir, cfg, source, tracking_uri=uri)  # before the parent run: resumable
    ref = lineage.open_parent(
        uri, cfg.mlflow.experiment or cfg.name, cfg.name, resume=resume,
        tags={"hescape.git_commit": git_commit(), "hescape.data_fingerprint": paired.fingerprint},
        artifact_location=lineage.artifact_location_for(cfg, uri),
    )
    _write_study_json(study_dir, cfg, source, ref=ref)
    lineage.log_dataset(ref, ref.parent_run_id, paired)  # MLflow's Dataset column and filters
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
                               {k: list(v) for k, v in paired.split.items()}, git_commit(),
                               verbose=verbose)
        _run_phases(cfg, shared, res, concurrency, resume=resume)
        lineage.close_orphans(ref, status="KILLED", reason="trial stopped before it finished")
        maybe_kill_driver("study_report")  # tests only
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
    _write_study_json(study_dir, cfg, source, ref=ref, report=result.report_dir)
    return result


def _run_phases(cfg, shared: SharedContext, res, concurrency: int, *, resume: bool) -> None:
    _run_phase(cfg, shared, res, concurrency, "search", resume=resume)
    if cfg.sweep is None or cfg.sweep.seeds <= 1 or cfg.sweep.searcher == "grid":
        return
    if resume and _phase_done(phase_dir(shared, "seeds")):
        return
    points = seed_points(cfg, shared)
    if points:
        seeded = SharedContext(**{**shared.__dict__, "phase": "seeds"})
        _run_phase(cfg, seeded, res, concurrency, "seeds", resume=resume, points=points)


def _run_phase(cfg, shared: SharedContext, res, concurrency: int, phase: str, *, resume: bool,
               points: list[dict[str, Any]] | None = None) -> None:
    """Run (or restore) one Tune phase; mark it done only when every trial in it ended."""
    path = phase_dir(shared, phase)
    if resume and _phase_done(path):
        print(f"[study] {phase} phase already complete; not re-running it")
        return
    restoring = resume and path.exists()
    print(f"[study] {phase} phase: {'resuming' if restoring else 'starting'}", flush=True)
    set_tune_output(shared.verbose)
    tuner = (restore_tuner(cfg, shared, res, concurrency, phase, points=points) if restoring
             else build_tuner(cfg, shared, res, concurrency, phase, points=points))
    grid = tuner.fit()
    if INTERRUPTED.is_set():  # a signal whose KeyboardInterrupt was swallowed inside Tune
        raise KeyboardInterrupt(f"{phase} phase interrupted by a signal")
    missing = (expected_trials(cfg, shared, points) - len(grid)
               + len(grid) - grid.num_terminated - grid.num_errors)
    if missing > 0:  # Tune stopped early on a signal of its own (SIGUSR1): not done
        raise KeyboardInterrupt(f"{phase} phase interrupted with {missing} trial(s) unfinished")
    _mark_done(path)


def _phase_done(path: Path) -> bool:
    return (path / "hescape_phase_done").exists()


def _mark_done(path: Path) -> None:
    atomic.write_text(path / "hescape_phase_done", time.strftime("%F %T"))


def _write_study_json(study_dir: Path, cfg: StudyConfig, source: str, *, ref=None,
                      tracking_uri: str | None = None, report: Path | None = None) -> None:
    """``study.json``: what the study is and where its runs are (atomic). With ``report``
    the study is FINISHED: ``--resume`` then only says where the report is."""
    study_dir.mkdir(parents=True, exist_ok=True)
    info = {"name": cfg.name, "source": source,
            "tracking_uri": ref.tracking_uri if ref is not None else tracking_uri,
            "experiment_id": ref.experiment_id if ref is not None else None,
            "parent_run_id": ref.parent_run_id if ref is not None else None,
            "status": "FINISHED" if report is not None else "RUNNING",
            "report_dir": str(report) if report is not None else None,
            "config": cfg.model_dump()}
    atomic.write_json(study_dir / "study.json", info, indent=2, default=str)


def finished_study(study_dir: Path) -> StudyResult | None:
    """The result of a study that already finished (its report written), else None."""
    try:
        info = json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError):
        return None
    report = info.get("report_dir")
    if info.get("status") != "FINISHED" or not report or not Path(report).is_dir():
        return None
    ref = lineage.LineageRef(info["tracking_uri"], info["experiment_id"], info["parent_run_id"],
                             info["name"])
    return StudyResult(info["name"], study_dir, ref.parent_run_id, ref.tracking_uri,
                       trials=[r.info.run_id for r in lineage.child_runs(ref)],
                       report_dir=Path(report))


def _log_shared(ref, shared_work: dict[str, Any]) -> None:
    from hescape.tracking import log_metrics_retry, sanitize_key

    client = lineage.MlflowClient(ref.tracking_uri)
    for v in shared_work["variants"]:
        name = v["method"]
        metrics = {sanitize_key(f"pre_{name}/{k.split('/')[-1]}"): float(x)
                   for k, x in v["metrics"].items() if isinstance(x, (int, float))}
        log_metrics_retry(client, ref.parent_run_id, metrics, step=0)
    lineage.log_json_artifact(ref, ref.parent_run_id, shared_work, "shared_work.json")


def _install_signal_handlers() -> dict[int, Any] | None:
    """SIGINT and SIGTERM raise KeyboardInterrupt and set ``INTERRUPTED`` (Tune's loop raises
    it again if the first raise was swallowed). Tune's own SIGINT handler is off: it ends a
    phase early and stops the running trials as if they had finished."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    INTERRUPTED.clear()

    def _raise(signum, frame):  # noqa: ARG001
        INTERRUPTED.set()
        raise KeyboardInterrupt(f"signal {signum}")

    # a SIGINT the process was started ignoring (nohup, `cmd &` in a script) stays ignored
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM)
            if not (s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN)]
    try:
        return {sig: signal.signal(sig, _raise) for sig in sigs}
    except ValueError:  # not in the main thread
        return None


def _restore_signal_handlers(previous: dict[int, Any] | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler)
