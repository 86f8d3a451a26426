"""One Tune trial: resolve its config, train (Ray Train or in-process), evaluate, log to MLflow.

The trial owns its MLflow child run: it reattaches to the run tagged with its Tune trial id
(so a restored trial never opens a second run), logs params, per-step metrics, the
resolved config, the best checkpoint's location and the final evaluation, and closes the
run FINISHED or FAILED with the reason. The driver closes runs of trials that were stopped
from outside (ASHA, a killed worker) — see ``callbacks.py``.

A restored trial (a resumed study, a restarted actor) reads where it stands on disk
(``resume.py``) and does only what remains; every report it sends, restored or not, carries
the objective(s) and the scheduler's metric (``tune_reports.py``).
"""

from __future__ import annotations

import json
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hescape import atomic
from hescape.config import StudyConfig
from hescape.study import baselines, lineage, run_view, stacking
from hescape.study.resume import TrialProgress, mark_evaluation_logged, read_progress
from hescape.study.space import SEED_KEY, apply_params, config_id
from hescape.study.tune_reports import (
    FINAL,
    RESUMED,
    TRAIN,
    cached_report,
    checked,
    final_report,
    finite_metrics,
    required_metrics,
)
from hescape.tracking import TrackingUnavailable, log_metrics_retry
from hescape.train.faults import maybe_hold, maybe_kill_driver


@dataclass(frozen=True)
class SharedContext:
    """Everything a trial needs from the driver (plain, picklable data): the base config,
    lineage, the dataset and what the driver precomputed from it (preprocessing variants by
    cache key, frozen-feature caches by ``feature_lookup_key``), and whether the study
    evaluates the baselines once (then trials leave them out)."""

    base: dict[str, Any]
    lineage: lineage.LineageRef
    study_dir: str
    data_fingerprint: str
    split: dict[str, list[str]]
    git_commit: str
    phase: str = "search"
    verbose: bool = False  # trials print per-step lines (else the driver's one line per event)
    data_path: str | None = None  # the dataset (None: cfg.data.path)
    prepared: dict[str, str] = field(default_factory=dict)  # variant cache key -> entry path
    features: dict[str, str] = field(default_factory=dict)  # feature_lookup_key -> cache path
    study_baselines: bool = False  # baselines evaluated once per study (hescape.study.baselines)
    run_token: str = ""  # this driver run (names its stack services: hescape.study.stacking)


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
    objective(s) and the scheduler's metric (``tune_reports.checked``).
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if not shared.verbose:  # Ray Train's per-checkpoint INFO lines reach the driver console
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        from hescape.study.console import quiet_libraries, warn_once

        warn_once(shared.study_dir)  # each distinct warning once per study (all in logs/)
        quiet_libraries(False)
    params = trial_params(config)
    cfg = resolve_trial_config(shared, params)
    run_dir = Path(shared.study_dir) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    space = (shared.base.get("sweep") or {}).get("params") or {}
    name = run_view.run_name(trial_id, params, run_view.swept_keys(space),
                             seed=params.get(SEED_KEY, cfg.train.seed), fold=cfg.data.fold)
    ref = shared.lineage
    required = required_metrics(cfg)
    existing = lineage.find_child(ref, trial_id)
    if existing is not None and existing.info.status == "FINISHED" and run_view.outcome(
            existing.info.status, existing.data.tags) == run_view.COMPLETED:
        # completed before the driver stopped: send its result again, do not re-run
        tune.report(checked(cached_report(existing, run_dir), required, kind=FINAL))
        return
    handle, inputs = None, None
    if stacking.stacking(cfg):  # trained (and evaluated) by its stack's service
        handle, facts = stacking.connect(shared, cfg)
    else:
        inputs = trial_inputs(cfg, shared)  # the dataset, loaded once for the whole trial
        facts = inputs.facts()
    run_id = lineage.open_child(ref, trial_id, existing=existing, name=name[:250],
                                tags=_trial_tags(shared, cfg, params, facts))
    _tag_node(ref, run_id)  # where it runs now (a retried trial: its latest node)
    if existing is not None:  # running again: drop how it ended before
        client = lineage.MlflowClient(ref.tracking_uri)
        for key in ("hescape.error", run_view.TAG_OUTCOME, run_view.TAG_STOPPED_BY):
            if key in existing.data.tags:
                lineage.with_retry(lambda k=key: client.delete_tag(run_id, k))
    logged = int((existing.data.metrics if existing is not None else {}).get("step", 0))
    trial = _Trial(cfg, ref, run_id, run_dir, shared.phase, shared.verbose, required, logged,
                   shared.study_baselines, shared.base)
    try:
        if handle is not None:
            result = _stacked_train_and_evaluate(trial, shared, trial_id)
        else:
            result = _train_and_evaluate(trial, inputs)
    except SystemExit as exc:  # Tune stops a trial (ASHA, end of run) by exiting in tune.report
        if exc.code not in (0, None):
            lineage.finish_run(ref, run_id, "FAILED", error=f"SystemExit: {exc.code}",
                               tags=run_view.outcome_tags(run_view.FAILED))
        else:  # the scheduler stopped it (the driver's MlflowCloser adds which, at what
            # step). A Ctrl-C'd driver stops its trials the same way: --resume re-runs those
            # (a stopped run is reattached, not re-sent as a result)
            lineage.finish_run(ref, run_id, "FINISHED",
                               tags=run_view.outcome_tags(run_view.STOPPED))
        raise
    except BaseException as exc:  # noqa: BLE001 - record every failure, then re-raise to Tune
        _record_failure(ref, run_id, run_dir, exc)
        raise  # a run left RUNNING by a lost tracking server is closed by --resume
    lineage.finish_run(ref, run_id, "FINISHED", tags=run_view.outcome_tags(run_view.COMPLETED))
    tune.report(checked(result, required, kind=FINAL))


def _record_failure(ref: lineage.LineageRef, run_id: str, run_dir: Path,
                    exc: BaseException) -> None:
    """Close the run FAILED with the reason and keep the traceback in ``error.txt``. On a
    full disk both writes may fail too: the trial's own error (which names the path it
    could not write) is what goes to Tune, and the driver stops the study on it."""
    from hescape.diskfull import is_disk_full, quiet_if_disk_full

    text = traceback.format_exc()
    try:
        if not isinstance(exc, TrackingUnavailable):  # else closing would wait once more
            with quiet_if_disk_full(exc):
                lineage.finish_run(ref, run_id, "FAILED", error=f"{type(exc).__name__}: {exc}",
                                   tags=run_view.outcome_tags(run_view.FAILED))
        atomic.write_text(run_dir / "error.txt", text)
    except Exception as err:
        if not (is_disk_full(exc) and is_disk_full(err)):
            raise


@dataclass
class TrialInputs:
    """What one trial reads, loaded once: the dataset, its prepared expression (the
    driver's precomputed variant), the frozen-feature cache path (the driver's) and the
    preprocessing entry path (for Ray Train workers, which load from paths)."""

    paired: Any
    prepared: Any
    prepared_path: Path
    features_path: str | None

    def facts(self) -> dict[str, Any]:
        """What the trial's MLflow tags say about its inputs."""
        p = self.prepared
        return {"method": p.method, "cache_key": p.cache_key, "saw_heldout": p.saw_heldout,
                "info": p.info, "split": {k: list(v) for k, v in self.paired.split.items()}}


def trial_inputs(cfg: StudyConfig, shared: SharedContext) -> TrialInputs:
    """Load the dataset once and look up what the driver precomputed for ``cfg``; a variant or
    feature set the driver could not enumerate (continuous options, stain normalisation
    fitted per trial) is computed through the same locked caches, so still only once."""
    from hescape.data import load_paired
    from hescape.data.splits import with_fold
    from hescape.preprocess.cache import load_entry, variant_key
    from hescape.train.features import feature_lookup_key, use_feature_cache
    from hescape.train.inputs import prepare_expression, prepared_entry_path

    paired = with_fold(load_paired(shared.data_path or cfg.data.path), cfg)  # data.fold: CV
    key = variant_key(paired.fingerprint, cfg.preprocess.expression, paired.split,
                      batch_key=cfg.data.batch_key)
    known = shared.prepared.get(key)
    prepared = load_entry(Path(known)) if known else None
    if prepared is None:
        prepared = prepare_expression(cfg, paired, progress=False)
    features = None
    if use_feature_cache(cfg):
        features = shared.features.get(feature_lookup_key(cfg))
        if features is None or not Path(features).is_file():
            from hescape.train.device import resolve_device
            from hescape.train.features import cached_features
            from hescape.train.inputs import fit_stain

            features = str(cached_features(cfg, paired, stain=fit_stain(cfg, paired),
                                           device=resolve_device(cfg.train.use_gpu),
                                           progress=False))
    return TrialInputs(paired=paired, prepared=prepared,
                       prepared_path=prepared_entry_path(cfg, prepared), features_path=features)


def _trial_tags(
    shared: SharedContext, cfg: StudyConfig, params: dict[str, Any], facts: dict[str, Any]
) -> dict[str, str]:
    split = facts["split"]  # a donor fold's split, if any
    return {
        "hescape.config_id": config_id(params)[:4000],
        "hescape.sweep_params": json.dumps(params, sort_keys=True, default=str)[:4900],
        "hescape.seed": str(cfg.train.seed),
        "hescape.phase": shared.phase,
        "hescape.git_commit": shared.git_commit,
        "hescape.data_fingerprint": shared.data_fingerprint,
        "hescape.split": ";".join(f"{k}={','.join(v)}" for k, v in split.items())[:4000],
        "hescape.fold": "none" if cfg.data.fold is None else str(cfg.data.fold),
        "hescape.preprocess": facts["method"],
        "hescape.preprocess_key": facts["cache_key"],
        "hescape.preprocess_saw_heldout": str(facts["saw_heldout"]).lower(),
        "hescape.preprocess_converged": _converged_tag(facts["info"]),
        "hescape.preprocess_info": _info_tag(facts["info"]),
        "hescape.stacked": str(stacking.stacking(cfg)).lower(),
        baselines.TAG: baselines.frozen_key(cfg, split),
        baselines.PCA_TAG: baselines.pca_key(cfg, split),
    }


NODE_ID_TAG, NODE_IP_TAG, NODES_TAG = "hescape.node_id", "hescape.node_ip", "hescape.nodes"


def _tag_node(ref: lineage.LineageRef, run_id: str) -> None:
    """Tag the run with the Ray node this (possibly retried) trial process runs on: its id
    and IP now, and every node id it has run on, in order (``hescape.nodes``)."""
    import ray

    if not ray.is_initialized():  # run_trial called outside Ray (unit tests)
        return
    node_id, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    client = lineage.MlflowClient(ref.tracking_uri)
    before = lineage.with_retry(lambda: client.get_run(run_id)).data.tags.get(NODES_TAG, "")
    nodes = ",".join([n for n in before.split(",") if n] + [node_id])
    for key, value in ((NODE_ID_TAG, node_id), (NODE_IP_TAG, node_ip),
                       (NODES_TAG, nodes[-4900:])):
        lineage.with_retry(lambda k=key, v=value: client.set_tag(run_id, k, v))


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
    study_baselines: bool = False  # the study evaluates the baselines (not this trial)
    base: dict[str, Any] | None = None  # the study's config (its params are on the parent)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log what the dashboard shows (``run_view.mlflow_metrics``) at ``step``; the full
        evaluation is the run's ``eval/metrics.json`` artifact."""
        log_metrics_retry(lineage.MlflowClient(self.ref.tracking_uri), self.run_id,
                          run_view.mlflow_metrics(metrics, self.required), step=step)

    def log_curve(self, points: list[tuple[int, dict[str, float]]]) -> None:
        """The training means between evaluations (``train.log_every``), each at its step."""
        client = lineage.MlflowClient(self.ref.tracking_uri)
        for step, values in points:
            log_metrics_retry(client, self.run_id, run_view.mlflow_metrics(
                finite_metrics(values), self.required), step=int(step))


def _start(trial: _Trial) -> TrialProgress:
    """What every trial does first (unbatched or stacked): log its params and resolved
    config, read how far it got, and report that to the scheduler if it was under way."""
    cfg = trial.cfg
    lineage.log_params(trial.ref, trial.run_id, cfg.model_dump(), base=trial.base)
    lineage.log_json_artifact(trial.ref, trial.run_id, cfg.model_dump(), "resolved_config.json")
    progress = read_progress(trial.run_dir, cfg)
    if progress.step > 0:
        _report_resumed(trial, progress)
    return progress


def _train_and_evaluate(trial: _Trial, inputs: TrialInputs) -> dict[str, Any]:
    """Train what remains, evaluate the best checkpoint unless already logged; the final
    report (last training report + evaluation)."""
    from hescape.train import fit
    from hescape.train.inputs import train_inputs

    cfg = trial.cfg
    progress = _start(trial)
    if progress.training_done:
        fitted = progress.fit_result()
    else:  # fit resumes from the newest checkpoint in its run directory
        loaded = train_inputs(cfg, inputs.paired, inputs.prepared, inputs.features_path)
        fitted = fit(cfg, run_dir=trial.run_dir / "train", verbose=trial.verbose,
                     report_callback=lambda m, c: _report_training(trial, m),
                     prepared_path=inputs.prepared_path, inputs=loaded)
    last = fitted.metrics or progress.metrics
    evaluated = progress.evaluation
    if evaluated is None:
        evaluated = _evaluate(trial, fitted, inputs, step=int(last.get("step", 0)))
    return final_report(last, evaluated)


def _report_training(trial: _Trial, metrics: dict[str, Any]) -> None:
    """A training report: to MLflow at its step, then to Tune. Checkpoints stay in the
    trial's directory (``trials/<id>/train``), where a restored trial finds them; Tune gets
    none (a second copy of each, and its restore point can lag the newest one)."""
    from ray import tune

    from hescape.train.validate import CURVE_KEY

    clean = finite_metrics(metrics)
    step = int(metrics.get("step", 0))
    points = [(int(s), dict(v)) for s, v in metrics.get(CURVE_KEY) or []]
    logged = dict(clean)
    if points and points[-1][0] == step:  # the curve's point at this step replaces the
        for key in points[-1][1]:         # report's means over the whole evaluation window
            logged.pop(key, None)
    trial.log_curve(points)
    trial.log(logged, step)
    maybe_kill_driver("report", step=step, phase=trial.phase)  # tests only (HESCAPE_FAULT_*)
    tune.report(checked(clean, trial.required, kind=TRAIN))
    maybe_hold("report", step=step, phase=trial.phase)  # tests only (node loss)


def _report_resumed(trial: _Trial, progress: TrialProgress) -> None:
    """A restored trial first reports the checkpoint it stands on: the scheduler decides on
    it as it did (or would have) before the interruption. Logged if MLflow lacks the step
    (the driver stopped between the checkpoint and its log)."""
    from ray import tune

    clean = finite_metrics(progress.metrics)
    if trial.logged_step < progress.step:
        trial.log(clean, progress.step)
    tune.report(checked(clean, trial.required, kind=RESUMED))


def _evaluate(trial: _Trial, fitted: Any, inputs: TrialInputs, *, step: int) -> dict[str, float]:
    """Evaluate the best checkpoint on the held-out donors, log metrics and artifacts, and
    mark the evaluation logged (a restored trial then skips it)."""
    from hescape.study.evaluation import evaluate_trial

    _tag_best(trial, fitted.best_checkpoint)
    metrics, artifacts = evaluate_trial(trial.cfg, fitted, out_dir=trial.run_dir / "eval",
                                        paired=inputs.paired, prepared=inputs.prepared,
                                        features=inputs.features_path,
                                        baselines=not trial.study_baselines)
    return _log_evaluation(trial, metrics, artifacts, step=step)


def _tag_best(trial: _Trial, best: Any) -> None:
    if best is not None:
        client = lineage.MlflowClient(trial.ref.tracking_uri)
        lineage.with_retry(lambda: client.set_tag(trial.run_id, "hescape.best_checkpoint",
                                                  str(best)))


def _log_evaluation(trial: _Trial, metrics: dict[str, float], artifacts: dict[str, Any], *,
                    step: int) -> dict[str, float]:
    evaluated = finite_metrics(metrics)  # training metrics were logged per report already
    maybe_kill_driver("evaluating", phase=trial.phase)
    maybe_hold("evaluating", phase=trial.phase)  # tests only (node loss)
    trial.log(evaluated, step)
    lineage.log_artifacts(trial.ref, trial.run_id, {k: Path(v) for k, v in artifacts.items()},
                          subdir="eval")
    mark_evaluation_logged(trial.run_dir, evaluated)
    maybe_kill_driver("evaluated", phase=trial.phase)
    return evaluated


def _stacked_train_and_evaluate(trial: _Trial, shared: Any, name: str) -> dict[str, Any]:
    """A stacked trial's proxy (``hescape.study.stacking``): join the stack service, relay
    each of its member's reports (MLflow + Tune, then an acknowledgement: lock-step, so
    ASHA decides at the same report as for an unbatched trial), log the evaluation the
    service computed. Leaving for any reason (ASHA's stop included) drops the member."""
    import ray

    cfg = trial.cfg
    progress = _start(trial)
    if progress.training_done and progress.evaluation is not None:
        return final_report(progress.metrics, progress.evaluation)
    handle = stacking.join(shared, cfg, name, str(trial.run_dir),
                           train=not progress.training_done)
    last = dict(progress.metrics)
    try:
        while True:
            event = ray.get(handle.next.remote(name, 10.0))
            if event is None:
                continue
            if event[0] == "report":
                last = event[1]
                _report_training(trial, last)  # SystemExit here: ASHA stopped the trial
                ray.get(handle.ack.remote(name))
            elif event[0] == "evaluated":
                metrics, artifacts, best = event[1], event[2], event[3]
                _tag_best(trial, best)
                evaluated = _log_evaluation(trial, metrics, artifacts,
                                            step=int(last.get("step", progress.step)))
                return final_report(last, evaluated)
            else:
                from hescape.train.loop import TrainingError

                raise TrainingError(event[1])
    except BaseException:
        handle.drop.remote(name)  # fire and forget: the stack goes on without it
        raise

