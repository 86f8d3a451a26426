"""One Tune trial: resolve its config, train (Ray Train or in-process), evaluate, log to MLflow.

The trial owns its MLflow child run: it reattaches to the run tagged with its Tune trial id
(so a restored trial never opens a second run), logs params, per-step metrics, the
resolved config, the best checkpoint's location and the final evaluation, and closes the
run FINISHED or FAILED with the reason. The driver closes runs of trials that were stopped
from outside (ASHA, a killed worker) — see ``callbacks.py``.

A restored trial (a resumed study, a restarted actor) reads where it stands on disk
(``resume.py``) and does only what remains; every report it sends, restored or not, carries
the objective(s) and the scheduler's metric (``reporting.py``).
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig
from hescape.study import lineage
from hescape.study.reporting import (
    FINAL,
    RESUMED,
    TRAIN,
    cached_report,
    checked,
    final_report,
    finite_metrics,
    required_metrics,
)
from hescape.study.resume import TrialProgress, mark_evaluation_logged, read_progress
from hescape.study.space import SEED_KEY, apply_params, config_id
from hescape.tracking import log_metrics_retry
from hescape.train.faults import maybe_kill_driver


@dataclass(frozen=True)
class SharedContext:
    """Everything a trial needs from the driver (plain, picklable data)."""

    base: dict[str, Any]
    lineage: lineage.LineageRef
    study_dir: str
    data_fingerprint: str
    split: dict[str, list[str]]
    git_commit: str
    phase: str = "search"
    verbose: bool = False  # trials print per-step lines (else the driver's one line per event)


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The sweep parameters of a Tune config (grid points arrive under ``point``)."""
    params = dict(config.get("point", {}))
    params.update({k: v for k, v in config.items() if k != "point"})
    return params


def resolve_trial_config(shared: SharedContext, params: dict[str, Any]) -> StudyConfig:
    return StudyConfig.model_validate(apply_params(shared.base, params))


def run_trial(config: dict[str, Any], shared: SharedContext) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters``).

    A restored trial does only what remains (``resume.read_progress``): a trial FINISHED in
    MLflow re-sends its result; one with checkpoints first reports where it stands (so the
    scheduler can stop it again), trains on unless its last step or early stop is reached,
    evaluates unless its evaluation is logged, and closes. Every report carries the
    objective(s) and the scheduler's metric (``reporting.checked``).
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if not shared.verbose:  # Ray Train's per-checkpoint INFO lines reach the driver console
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    params = trial_params(config)
    cfg = resolve_trial_config(shared, params)
    run_dir = Path(shared.study_dir) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{trial_id} {config_id(params)} seed={params.get(SEED_KEY, cfg.train.seed)}"
    ref = shared.lineage
    required = required_metrics(cfg)
    existing = lineage.find_child(ref, trial_id)
    if existing is not None and existing.info.status == "FINISHED":
        # completed before the driver stopped: send its result again, do not re-run
        tune.report(checked(cached_report(existing), required, kind=FINAL))
        return
    prepared = _prepared(cfg)
    run_id = lineage.open_child(ref, trial_id, existing=existing, name=name[:250],
                                tags=_trial_tags(shared, cfg, params, prepared))
    if existing is not None and "hescape.error" in existing.data.tags:  # running again
        client = lineage.MlflowClient(ref.tracking_uri)
        lineage.with_retry(lambda: client.delete_tag(run_id, "hescape.error"))
    logged = int((existing.data.metrics if existing is not None else {}).get("step", 0))
    trial = _Trial(cfg, ref, run_id, run_dir, shared.phase, shared.verbose, required, logged)
    try:
        result = _train_and_evaluate(trial, prepared)
    except SystemExit as exc:  # Tune stops a trial (ASHA, end of run) by exiting in tune.report
        if exc.code not in (0, None):
            lineage.finish_run(ref, run_id, "FAILED", error=f"SystemExit: {exc.code}")
            raise
        lineage.finish_run(ref, run_id, "KILLED")  # the driver's MlflowCloser says why
        raise
    except BaseException as exc:  # noqa: BLE001 - record every failure, then re-raise to Tune
        lineage.finish_run(ref, run_id, "FAILED", error=f"{type(exc).__name__}: {exc}")
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    lineage.finish_run(ref, run_id, "FINISHED")
    tune.report(checked(result, required, kind=FINAL))


def _prepared(cfg: StudyConfig) -> Any:
    """The trial's preprocessed expression (precomputed by the driver: a cache hit)."""
    from hescape.data import load_paired
    from hescape.train.inputs import prepare_expression

    return prepare_expression(cfg, load_paired(cfg.data.path), progress=False)


def _trial_tags(
    shared: SharedContext, cfg: StudyConfig, params: dict[str, Any], prepared: Any
) -> dict[str, str]:
    return {
        "hescape.config_id": config_id(params)[:4000],
        "hescape.sweep_params": json.dumps(params, sort_keys=True, default=str)[:4900],
        "hescape.seed": str(cfg.train.seed),
        "hescape.phase": shared.phase,
        "hescape.git_commit": shared.git_commit,
        "hescape.data_fingerprint": shared.data_fingerprint,
        "hescape.split": ";".join(f"{k}={','.join(v)}" for k, v in shared.split.items())[:4000],
        "hescape.preprocess": prepared.method,
        "hescape.preprocess_key": prepared.cache_key,
        "hescape.preprocess_saw_heldout": str(prepared.saw_heldout).lower(),
        "hescape.preprocess_converged": _converged_tag(prepared.info),
        "hescape.preprocess_info": _info_tag(prepared.info),
    }


def _converged_tag(info: dict[str, Any]) -> str:
    """"true"/"false" when the preprocessing reports convergence (Harmony, scVI), else "n/a"."""
    return str(bool(info["converged"])).lower() if "converged" in info else "n/a"


def _info_tag(info: dict[str, Any]) -> str:
    """The preprocessing info as compact JSON (scalars only), within MLflow's tag limit."""
    flat = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
    return json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)[:4900]


@dataclass(frozen=True)
class _Trial:
    """One running trial: its config, MLflow run, directory and what its reports need."""

    cfg: StudyConfig
    ref: lineage.LineageRef
    run_id: str
    run_dir: Path
    phase: str
    verbose: bool
    required: list[str]
    logged_step: int  # the last step already in MLflow (a reattached run)

    def log(self, metrics: dict[str, float], step: int) -> None:
        log_metrics_retry(lineage.MlflowClient(self.ref.tracking_uri), self.run_id, metrics,
                          step=step)


def _train_and_evaluate(trial: _Trial, prepared: Any) -> dict[str, Any]:
    """Train what remains, evaluate the best checkpoint unless already logged; the final
    report (last training report + evaluation)."""
    from hescape.train import fit
    from hescape.train.inputs import prepared_entry_path

    cfg, ref = trial.cfg, trial.ref
    lineage.log_params(ref, trial.run_id, cfg.model_dump())
    lineage.log_json_artifact(ref, trial.run_id, cfg.model_dump(), "resolved_config.json")
    progress = read_progress(trial.run_dir, cfg)
    if progress.step > 0:
        _report_resumed(trial, progress)
    if progress.training_done:
        fitted = progress.fit_result()
    else:  # fit resumes from the newest checkpoint in its run directory
        fitted = fit(cfg, run_dir=trial.run_dir / "train", verbose=trial.verbose,
                     report_callback=lambda m, c: _report_training(trial, m),
                     prepared_path=prepared_entry_path(cfg, prepared))
    last = fitted.metrics or progress.metrics
    evaluated = progress.evaluation
    if evaluated is None:
        evaluated = _evaluate(trial, fitted, step=int(last.get("step", 0)))
    return final_report(last, evaluated)


def _report_training(trial: _Trial, metrics: dict[str, Any]) -> None:
    """A training report: to MLflow at its step, then to Tune. Checkpoints stay in the
    trial's directory (``trials/<id>/train``), where a restored trial finds them; Tune gets
    none (a second copy of each, and its restore point can lag the newest one)."""
    from ray import tune

    clean = finite_metrics(metrics)
    step = int(metrics.get("step", 0))
    trial.log(clean, step)
    maybe_kill_driver("report", step=step, phase=trial.phase)  # tests only (HESCAPE_FAULT_*)
    tune.report(checked(clean, trial.required, kind=TRAIN))


def _report_resumed(trial: _Trial, progress: TrialProgress) -> None:
    """A restored trial first reports the checkpoint it stands on: the scheduler decides on
    it as it did (or would have) before the interruption. Logged if MLflow lacks the step
    (the driver stopped between the checkpoint and its log)."""
    from ray import tune

    clean = finite_metrics(progress.metrics)
    if trial.logged_step < progress.step:
        trial.log(clean, progress.step)
    tune.report(checked(clean, trial.required, kind=RESUMED))


def _evaluate(trial: _Trial, fitted: Any, *, step: int) -> dict[str, float]:
    """Evaluate the best checkpoint on the held-out donors, log metrics and artifacts, and
    mark the evaluation logged (a restored trial then skips it)."""
    from hescape.study.evaluation import evaluate_trial

    client = lineage.MlflowClient(trial.ref.tracking_uri)
    if fitted.best_checkpoint is not None:
        lineage.with_retry(lambda: client.set_tag(trial.run_id, "hescape.best_checkpoint",
                                                  str(fitted.best_checkpoint)))
    metrics, artifacts = evaluate_trial(trial.cfg, fitted, out_dir=trial.run_dir / "eval")
    evaluated = finite_metrics(metrics)  # training metrics were logged per report already
    maybe_kill_driver("evaluating", phase=trial.phase)
    trial.log(evaluated, step)
    lineage.log_artifacts(trial.ref, trial.run_id, artifacts, subdir="eval")
    mark_evaluation_logged(trial.run_dir, evaluated)
    maybe_kill_driver("evaluated", phase=trial.phase)
    return evaluated
