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
from hescape.diskfull import DiskFull, full_path, is_disk_full, quiet_store_errors
from hescape.raystart import init_ray
from hescape.study import lineage, stacking
from hescape.study.callbacks import INTERRUPTED
from hescape.study.resources import (
    check_storage,
    git_commit,
    max_concurrent_trials,
    trial_resources,
)
from hescape.study.shared import (
    check_dataset_path,
    ensure_dataset,
    feature_paths,
    fold_config,
    image_configs,
    precompute,
    prepared_paths,
    storage_root,
    study_folds,
)
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
from hescape.tracking import (
    RETRY_BUDGET_ENV,
    TrackingUnavailable,
    bound_http_retries,
    resolve_tracking_uri,
    retry_budget_s,
    scrub_text,
)
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


@dataclass
class Preflight:
    """What ``preflight`` found (nothing written): the study directory, its ``study.json``
    (None: no study there), whether a run replaces it (``--overwrite``, or a study that
    never reached its first trial) and the config change a resume accepted."""

    study_dir: Path
    info: dict[str, Any] | None = None
    replace: bool = False
    config_change: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class StudyFailed(RuntimeError):
    """Every trial of the study failed: the message is a one-paragraph summary."""


def read_study_json(study_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError):
        return None


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every flattened config key that differs."""
    from hescape.tracking import flatten

    a = flatten(json.loads(json.dumps(old, default=str)))
    b = flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def preflight(cfg: StudyConfig, *, source: str, resume: bool, overwrite: bool,
              address: str | None = None, accept_config_change: bool = False,
              dry_run: bool = False, probe: bool = True) -> Preflight:
    """All checks that need neither Ray nor data, endpoints included (each probed with a
    short timeout). Writes nothing. ``dry_run``: the state of an existing study becomes a
    note instead of an error."""
    from hescape.study.preconditions import endpoint_problems, refuse

    if cfg.sweep is not None and cfg.sweep.searcher != "grid" and not cfg.sweep.params:
        raise ConfigError(
            f"{source}: sweep.params is empty: a {cfg.sweep.searcher} search needs at least "
            "one parameter (or remove the sweep block to run one trial)."
        )
    validate_space(cfg, source)
    check_dataset_path(cfg)
    root = storage_root(cfg)
    check_storage(root)
    if probe:
        refuse(source, endpoint_problems(cfg, address), "the study's endpoints")
    study_dir = study_dir_of(cfg)
    info = read_study_json(study_dir)
    out = Preflight(study_dir, info)
    problems: list[str] = []
    if info is not None and not resume and not overwrite:
        if info.get("trials_started") is False and info.get("status") != "FINISHED":
            out.replace = True  # stopped before its first trial: nothing to keep
            out.notes.append(f"study {cfg.name!r} at {study_dir} stopped before its first "
                             "trial: a run replaces it")
        else:
            problems.append(
                f"study {cfg.name!r} already exists at {study_dir}. Use --resume to continue "
                "it, --overwrite to retire it and start again, or --set name=<new name>.")
    if overwrite and info is not None:
        out.replace = True
        out.notes.append(f"--overwrite: the existing study at {study_dir} and its MLflow runs "
                         "are retired (tagged hescape.superseded and deleted) when the new one "
                         "starts")
    if resume and info is None:
        problems.append(f"--resume: no study {cfg.name!r} at {study_dir} to resume (it never "
                        "got past its start): run it without --resume")
    if resume and info is not None and isinstance(info.get("config"), dict):
        out.config_change = config_difference(info["config"], cfg.model_dump())
        if out.config_change and not accept_config_change:
            diff = "\n    ".join(out.config_change)
            problems.append(
                f"--resume: the config differs from the one study {cfg.name!r} started with:"
                f"\n    {diff}\n  Resume with the original config, or pass "
                "--accept-config-change to continue with the new values (finished trials keep "
                "theirs).")
    if problems and not dry_run:
        raise ConfigError("\n".join(problems))
    out.notes += problems
    return out


def retire_study(pre: Preflight) -> None:
    """Retire the study at ``pre.study_dir`` for a new one: its MLflow runs (parent and
    children) are tagged ``hescape.superseded`` and deleted (MLflow's soft delete:
    ``mlflow runs restore`` brings one back until ``mlflow gc``), its directory removed."""
    info = pre.info or {}
    if info.get("parent_run_id") and info.get("tracking_uri"):
        try:
            ref = lineage.LineageRef(info["tracking_uri"], info["experiment_id"],
                                     info["parent_run_id"], info.get("name", ""))
            client = lineage.MlflowClient(ref.tracking_uri)
            when = time.strftime("%F %T")
            for run_id in [r.info.run_id for r in lineage.child_runs(ref)] + [ref.parent_run_id]:
                lineage.with_retry(lambda r=run_id: client.set_tag(r, "hescape.superseded", when))
                lineage.with_retry(lambda r=run_id: client.delete_run(r))
        except Exception as exc:  # noqa: BLE001 - an unreachable old store must not block
            print(f"[study] could not retire the old study's MLflow runs ({exc}); they stay",
                  flush=True)
    if pre.study_dir.exists():
        shutil.rmtree(pre.study_dir)


def _rollback(study_dir: Path, ref) -> None:
    """Undo a study that failed before its first trial: its parent run (deleted) and its
    directory, so the corrected re-run starts clean."""
    try:
        client = lineage.MlflowClient(ref.tracking_uri)
        lineage.with_retry(lambda: client.delete_run(ref.parent_run_id))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not delete the parent run %s: %s", ref.parent_run_id, exc)
    shutil.rmtree(study_dir, ignore_errors=True)


def _mark_trials_started(study_dir: Path) -> None:
    info = read_study_json(study_dir)
    if info is not None and not info.get("trials_started"):
        info["trials_started"] = True
        atomic.write_json(study_dir / "study.json", info, indent=2, default=str)


def run_study(
    cfg: StudyConfig,
    *,
    source: str = "<config>",
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    accept_config_change: bool = False,
) -> StudyResult:
    """Run (or resume) a whole study and write its report. ``verbose``: Tune's status tables
    and the trials' own per-step lines instead of one console line per trial event.

    Every precondition (config, endpoints, the data against the config, resources) is
    checked before anything is written; the study's directory and parent run appear only
    then. A failure before the first trial removes both again (the corrected re-run starts
    clean); a study whose every trial failed raises ``StudyFailed`` (no report)."""
    from hescape.study import console
    from hescape.study.preconditions import data_problems, refuse

    console.quiet_libraries(verbose)
    pre = preflight(cfg, source=source, resume=resume, overwrite=overwrite, address=address,
                    accept_config_change=accept_config_change)
    study_dir = pre.study_dir
    finished = finished_study(study_dir) if resume else None
    if finished is not None:
        print(f"[study] {cfg.name} already finished: nothing to resume")
        return finished
    for note in pre.notes:
        print(f"[study] {note}", flush=True)
    from hescape.data import load_paired

    res = trial_resources(cfg)  # before anything is written: impossible resources leave nothing
    paired = None
    if cfg.data.path:  # an existing dataset: checked against the config before Ray starts
        data_path = ensure_dataset(cfg, progress=progress)
        paired = load_paired(data_path)
        refuse(source, data_problems(cfg, paired), "the data and the config")
    arm_driver()  # tests only: HESCAPE_FAULT_KILL_DRIVER_AT
    bound_http_retries()  # before Ray starts: its workers inherit the environment
    init_ray(address, logging_level=logging.INFO if verbose else logging.WARNING)
    import ray

    concurrency = max_concurrent_trials(
        res, ray.cluster_resources(), cfg.sweep.max_concurrent if cfg.sweep else None, source
    )
    if paired is None:  # simulated (a shared cache) only once the cluster can run the study
        data_path = ensure_dataset(cfg, progress=progress)
        paired = load_paired(data_path)
        refuse(source, data_problems(cfg, paired), "the data and the config")
    # every precondition holds: from here on the study exists
    if pre.replace:
        retire_study(pre)
    if pre.config_change:
        print("[study] resuming with a changed config (--accept-config-change):\n  "
              + "\n  ".join(pre.config_change), flush=True)
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, storage_root(cfg))
    base = cfg.model_dump()
    base["data"]["path"] = str(data_path)
    started = bool((pre.info or {}).get("trials_started", True)) if resume else False
    _write_study_json(study_dir, cfg, source, tracking_uri=uri,
                      started=started)  # before the parent run: resumable
    console.warn_once(study_dir)
    _tune_console(verbose)
    ref = lineage.open_parent(
        uri, cfg.mlflow.experiment or cfg.name, cfg.name, resume=resume,
        tags={"hescape.git_commit": git_commit(), "hescape.data_fingerprint": paired.fingerprint},
        artifact_location=lineage.artifact_location_for(cfg, uri),
    )
    _write_study_json(study_dir, cfg, source, ref=ref, started=started)
    result = StudyResult(cfg.name, study_dir, ref.parent_run_id, uri)
    status = "FAILED"
    rollback = disk_full = tracking_down = False
    previous = _install_signal_handlers()
    try:
        lineage.log_dataset(ref, ref.parent_run_id, paired)  # MLflow's Dataset column, filters
        lineage.log_params(ref, ref.parent_run_id, base)  # the study's config; children: levels
        if resume:
            n = lineage.close_orphans(ref, status="KILLED", reason="driver stopped; closed on resume")
            if n:
                print(f"[study] closed {n} orphaned RUNNING trial run(s) from the interrupted driver")
        with console.step("shared preprocessing (every variant and frozen feature set, once)"):
            shared_work = precompute(cfg, paired, progress=progress)
        _log_shared(ref, shared_work)
        shared = SharedContext(base, ref, str(study_dir), paired.fingerprint,
                               {k: list(v) for k, v in paired.split.items()}, git_commit(),
                               verbose=verbose, data_path=str(data_path),
                               prepared=prepared_paths(cfg, shared_work),
                               features=feature_paths(shared_work),
                               study_baselines=cfg.eval.baselines,
                               run_token=stacking.run_token(cfg.name))
        if cfg.train.stack_size > 1:
            stacking.stop_services(f"{cfg.name}-")  # a killed driver's, on a kept cluster
        cfg_run = StudyConfig.model_validate(base)  # data.path resolved
        _study_baselines(ref, study_dir, [fold_config(c, fold) for fold in study_folds(cfg)
                                          for c in image_configs(cfg_run)],
                         paired, shared, progress)
        _run_phases(cfg, shared, res, concurrency, resume=resume)
        lineage.close_orphans(ref, status="KILLED", reason="trial stopped before it finished")
        _raise_if_all_failed(cfg, ref, study_dir)
        # image settings the driver could not enumerate (continuous) get theirs now
        _study_baselines(ref, study_dir, _trial_configs(shared), paired, shared, progress)
        maybe_kill_driver("study_report")  # tests only
        from hescape.study.report.build import write_report

        with console.step("study report"):
            result.report_dir = write_report(ref, study_dir, cfg, shared_work)
        result.trials = [r.info.run_id for r in lineage.child_runs(ref)]
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:
        if is_disk_full(exc):  # resumable once space is freed: keep everything, KILLED
            status, disk_full = "KILLED", True
            raise DiskFull(full_path(exc, uri), "could not write") from exc
        if isinstance(exc, TrackingUnavailable) or _is_tracking_down(exc):
            tracking_down = True
            raise StudyFailed(tracking_down_message(uri, exc)) from exc
        rollback = not resume and not (read_study_json(study_dir) or {}).get("trials_started")
        raise
    finally:
        _restore_signal_handlers(previous)
        console.restore_warnings()
        if disk_full:
            _finish_on_full_disk(ref, status)
        elif not tracking_down:  # else closing the parent would wait out another retry budget
            lineage.finish_run(ref, ref.parent_run_id, status)
        if rollback:  # failed before its first trial: leave nothing that blocks a re-run
            _rollback(study_dir, ref)
    _write_study_json(study_dir, cfg, source, ref=ref, report=result.report_dir, started=True)
    return result


def _finish_on_full_disk(ref, status: str) -> None:
    """Close the parent run if the MLflow store can still take it (sqlite reuses free
    pages); else it stays RUNNING and the resume takes it over. MLflow's own error log
    (a traceback per failed write) stays off the console: the one-line stop says it all."""
    try:
        with quiet_store_errors():
            lineage.finish_run(ref, ref.parent_run_id, status)
    except Exception as exc:  # noqa: BLE001
        if not is_disk_full(exc):
            raise


def _tune_console(verbose: bool) -> None:
    """Tune's per-trial tracebacks off the console (one ``failed:`` line instead)."""
    from hescape.study import console

    if verbose:
        return
    tune_log = logging.getLogger("ray.tune")
    if not any(isinstance(f, console.DropTrialTracebacks) for f in tune_log.filters):
        drop = console.DropTrialTracebacks()
        for name in ("ray.tune", "ray.tune.execution.tune_controller"):
            logging.getLogger(name).addFilter(drop)


def _is_tracking_down(exc: BaseException) -> bool:
    """True when ``exc`` is, or was caused by, a ``TrackingUnavailable`` (a Tune callback or
    a trial's error can wrap it)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, TrackingUnavailable) or type(cur).__name__ == "TrackingUnavailable":
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def tracking_down_message(uri: str, exc: BaseException) -> str:
    """One line: which tracking server is unreachable, for how long it was waited for, and
    what to do."""
    return (f"MLflow tracking server {scrub_text(uri)} unreachable: the study waited "
            f"{retry_budget_s():g} s for it (${RETRY_BUDGET_ENV}) and stopped. Start the server "
            "again (or fix MLFLOW_TRACKING_URI / mlflow.tracking_uri), then run the same "
            f"command with --resume. Last error: {scrub_text(str(exc)).splitlines()[0][:300]}")


def _raise_if_all_failed(cfg: StudyConfig, ref, study_dir: Path) -> None:
    """``StudyFailed`` with a one-paragraph summary when no trial finished."""
    runs = lineage.child_runs(ref)
    if any(r.info.status == "FINISHED" for r in runs):
        return
    if not runs:  # every trial failed before it opened its MLflow run (e.g. its config)
        raise StudyFailed(
            f"study {cfg.name!r}: no trial started (none has an MLflow run), so there is no "
            f"report. First trial error: {_tune_error(Path(study_dir))!r}. Tune's error "
            f"files: {study_dir}/tune/<phase>/<trial>/error.txt. Fix the cause, then run "
            "again with --overwrite.")
    errors: dict[str, list[str]] = {}
    for r in runs:
        text = (r.data.tags.get("hescape.error") or r.info.status).strip()
        first = text.splitlines()[0][:200] if text else r.info.status
        errors.setdefault(first, []).append(r.data.tags.get(lineage.TAG_TRIAL, r.info.run_id))
    causes = "; ".join(f"{len(ids)}x {msg!r} (e.g. trial {ids[0]})"
                       for msg, ids in sorted(errors.items(), key=lambda kv: -len(kv[1])))
    raise StudyFailed(
        f"study {cfg.name!r}: all {len(runs)} trial(s) failed, none finished, so there is no "
        f"report. Cause(s): {causes}. Each trial's traceback is in "
        f"{study_dir}/trials/<trial id>/error.txt (and its MLflow run's hescape.error tag). "
        "Fix the cause, then run again with --overwrite.")


def _tune_error(study_dir: Path) -> str:
    """The exception line (and what follows it) of the first Tune trial error file."""
    found = sorted((study_dir / "tune").glob("*/*/error.txt"))
    if not found:
        return "no error file found"
    lines = found[0].read_text(errors="replace").splitlines()
    at = max((i for i, ln in enumerate(lines)
              if ln[:1].strip() and ("Error" in ln or "Exception" in ln)), default=len(lines) - 1)
    return " ".join(ln.strip() for ln in lines[at:at + 3])[:400]


def _run_phases(cfg, shared: SharedContext, res, concurrency: int, *, resume: bool) -> None:
    """search -> seeds (tpe/random with sweep.seeds > 1) -> confirm (sweep.confirm)."""
    _run_phase(cfg, shared, res, concurrency, "search", resume=resume)
    if cfg.sweep is None:
        return
    if cfg.sweep.seeds > 1 and cfg.sweep.searcher != "grid" \
            and not (resume and _phase_done(phase_dir(shared, "seeds"))):
        points = seed_points(cfg, shared)
        if points:
            seeded = SharedContext(**{**shared.__dict__, "phase": "seeds"})
            _run_phase(cfg, seeded, res, concurrency, "seeds", resume=resume, points=points)
    if cfg.sweep.confirm_enabled:
        _run_confirm(cfg, shared, res, concurrency, resume=resume)


def _run_confirm(cfg, shared: SharedContext, res, concurrency: int, *, resume: bool) -> None:
    """The controlled, replicated comparisons around the best configuration; its plan is
    written before the phase runs and reused when it resumes."""
    from hescape.study import confirm
    from hescape.study.results import trial_table

    path = phase_dir(shared, "confirm")
    if resume and _phase_done(path):
        print("[study] confirm phase already complete; not re-running it")
        return
    plan = confirm.read_plan(shared.study_dir) if resume else None
    if plan is None:
        rows = [r for r in trial_table(shared.lineage) if r["phase"] in ("search", "seeds")]
        plan = confirm.make_plan(cfg, rows)
        confirm.write_plan(shared.study_dir, plan)
        lineage.log_json_artifact(shared.lineage, shared.lineage.parent_run_id, plan,
                                  "confirm_plan.json")
    points = confirm.plan_points(cfg, plan)
    factors = [f for f, e in plan["factors"].items() if "skipped" not in e]
    print(f"[study] confirm plan: best {plan.get('best')}; {len(factors)} factor(s), "
          f"{len(points)} trial(s) ({cfg.sweep.confirm.seeds} seeds"
          + (f" x {cfg.eval.donor_folds} donor folds" if cfg.eval.donor_folds else "") + ")",
          flush=True)
    if not points:
        _mark_done(path)
        return
    confirming = SharedContext(**{**shared.__dict__, "phase": "confirm"})
    _run_phase(cfg, confirming, res, concurrency, "confirm", resume=resume, points=points)


def _run_phase(cfg, shared: SharedContext, res, concurrency: int, phase: str, *, resume: bool,
               points: list[dict[str, Any]] | None = None) -> None:
    """Run (or restore) one Tune phase; mark it done only when every trial in it ended."""
    path = phase_dir(shared, phase)
    if resume and _phase_done(path):
        print(f"[study] {phase} phase already complete; not re-running it")
        return
    restoring = resume and path.exists()
    print(f"[study] {phase} phase: {'resuming' if restoring else 'starting'}", flush=True)
    _mark_trials_started(Path(shared.study_dir))
    set_tune_output(shared.verbose)
    tuner = (restore_tuner(cfg, shared, res, concurrency, phase, points=points) if restoring
             else build_tuner(cfg, shared, res, concurrency, phase, points=points))
    try:
        grid = tuner.fit()
    finally:
        if cfg.train.stack_size > 1:
            stacking.stop_services(shared.run_token)
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
                      tracking_uri: str | None = None, report: Path | None = None,
                      started: bool = False) -> None:
    """``study.json``: what the study is and where its runs are (atomic). With ``report``
    the study is FINISHED: ``--resume`` then only says where the report is."""
    study_dir.mkdir(parents=True, exist_ok=True)
    info = {"name": cfg.name, "source": source,
            "tracking_uri": ref.tracking_uri if ref is not None else tracking_uri,
            "experiment_id": ref.experiment_id if ref is not None else None,
            "parent_run_id": ref.parent_run_id if ref is not None else None,
            "status": "FINISHED" if report is not None else "RUNNING",
            "report_dir": str(report) if report is not None else None,
            "trials_started": started or report is not None,
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


def _study_baselines(ref, study_dir: Path, configs: list[StudyConfig], paired,
                     shared: SharedContext, progress: bool) -> None:
    """Evaluate the baseline feature sets once for the whole study (skipping those already
    done: a resumed study) and log them on the parent run."""
    from hescape.data.splits import with_fold
    from hescape.study import baselines

    if not shared.study_baselines or not configs:
        return
    by_fold: dict[int | None, list[StudyConfig]] = {}
    for c in configs:
        by_fold.setdefault(c.data.fold, []).append(c)
    for group in by_fold.values():  # each donor fold has its own held-out donors
        baselines.evaluate_study_baselines(group, with_fold(paired, group[0]), study_dir,
                                           features=shared.features, progress=progress)
    first = configs[0]
    primary = baselines.frozen_key(first, with_fold(paired, first).split)
    baselines.log_to_parent(ref, study_dir, baselines.read(study_dir), primary=primary)


def _trial_configs(shared: SharedContext) -> list[StudyConfig]:
    """The resolved configs of the study's finished trials (distinct sweep points)."""
    from hescape.study.results import trial_table
    from hescape.study.space import apply_params

    seen, out = set(), []
    for row in trial_table(shared.lineage):
        if row["status"] != "FINISHED":
            continue
        key = json.dumps(row["sweep_params"], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            out.append(StudyConfig.model_validate(apply_params(shared.base, row["sweep_params"])))
        except ValueError:
            continue  # a row from an older config schema: its baselines were its own
    return out


def _log_shared(ref, shared_work: dict[str, Any]) -> None:
    from hescape.tracking import log_metrics_retry, sanitize_key

    client = lineage.MlflowClient(ref.tracking_uri)
    first = shared_work["variants"][0].get("fold") if shared_work["variants"] else None
    for v in shared_work["variants"]:
        if v.get("fold") != first:  # one split's figures on the parent (the report has all)
            continue
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
