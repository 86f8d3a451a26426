"""``fit(cfg)``: run the training loop as a Ray Train ``TorchTrainer`` or in this process.

More than one worker, or a GPU: ``TorchTrainer`` (Train V2) with ``ScalingConfig``,
``RunConfig(storage_path=run_dir.parent, name=run_dir.name)`` (a stable name: re-running
resumes), ``FailureConfig`` and ``CheckpointConfig``. One CPU worker with
``train.in_process``: the same ``train_loop_per_worker`` runs here through ``LocalSession``
(no worker-group start-up). Either way every report reaches ``report_callback(metrics,
checkpoint_path)`` in the calling thread (a Tune trial can forward it to ``ray.tune.report``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig
from hescape.paths import absolute
from hescape.train.checkpoint import checkpoint_step, list_checkpoints
from hescape.train.inputs import TrainInputs, prepare_inputs
from hescape.train.loop import TrainingError, train_loop_per_worker
from hescape.train.session import LocalSession, ReportCallback, local_session

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of ``fit``: last reported metrics, best checkpoint, every report in order."""

    metrics: dict[str, Any]
    best_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metrics: dict[str, Any] = field(default_factory=dict)


def runs_in_process(cfg: StudyConfig) -> bool:
    """True when ``fit`` runs the loop in this process (1 worker, no GPU, in_process; or a
    head-only trial packed on a share of a GPU, ``train.gpus_per_trial``)."""
    tc = cfg.train
    if tc.gpus_per_trial is not None:
        return True
    return tc.in_process and tc.num_workers == 1 and not tc.use_gpu


def fit(
    cfg: StudyConfig, *, run_dir: Path, prepared_path: str | Path | None = None,
    features_path: str | Path | None = None, report_callback: ReportCallback | None = None,
    resume_from: str | Path | None = None, verbose: bool = True,
    inputs: TrainInputs | None = None,
) -> FitResult:
    """Train ``cfg`` with checkpoints under ``run_dir``; return metrics and the best checkpoint.

    ``prepared_path`` / ``features_path`` are the driver's cached inputs (prepared here
    when not given). ``inputs``: the same, already loaded (``inputs.train_inputs``; a study
    trial passes them with ``prepared_path``): a loop in this process uses them as they are,
    Ray Train workers load them from the paths. ``resume_from`` is a checkpoint directory to
    continue from when ``run_dir`` holds none of its own (a previous run in ``run_dir`` is
    always resumed).
    """
    run_dir = absolute(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.image.mode == "frozen" and cfg.train.feature_cache \
            and cfg.preprocess.image.stain_augment > 0:
        log.warning("stain_augment > 0 changes the images every step: re-encoding with the "
                    "frozen encoder instead of using the feature cache")
    if inputs is not None and prepared_path is not None:
        paths = {"data_path": str(inputs.paired.path), "prepared_path": str(prepared_path),
                 "features_path": inputs.features_path}
    else:
        inputs = None  # without the prepared path, Ray workers could not load the same inputs
        paths = prepare_inputs(cfg, prepared_path=prepared_path, features_path=features_path,
                               progress=verbose)
    config = {"cfg": cfg.model_dump(mode="json"), **paths, "verbose": verbose,
              "run_dir": str(run_dir),  # where checkpoints land (Ray: storage_path / name)
              "resume_from": None if resume_from is None else str(Path(resume_from).resolve())}
    if runs_in_process(cfg):
        return _fit_in_process({**config, "inputs": inputs}, cfg, run_dir, report_callback)
    return _fit_ray(config, cfg, run_dir, report_callback)


def _fit_in_process(config: dict[str, Any], cfg: StudyConfig, run_dir: Path,
                    callback: ReportCallback | None) -> FitResult:
    session = LocalSession(run_dir, keep=cfg.train.keep_checkpoints, score=cfg.train.best_metric,
                           mode=cfg.train.best_mode, callback=callback)
    with local_session(session):
        train_loop_per_worker(config)
    return _result(session.history, session.best_checkpoint, run_dir)


def _result(history: list[dict[str, Any]], best: Path | None, ckpt_root: Path) -> FitResult:
    if best is None or not best.exists():
        found = list_checkpoints(ckpt_root)
        best = found[0] if found else None
    step = None if best is None else checkpoint_step(best)
    best_metrics = next((h for h in reversed(history) if h.get("step") == step), {})
    return FitResult(metrics=dict(history[-1]) if history else {}, best_checkpoint=best,
                     history=history, best_metrics=dict(best_metrics))


# ------------------------------------------------------------------------- Ray Train
def _fit_ray(config: dict[str, Any], cfg: StudyConfig, run_dir: Path,
             callback: ReportCallback | None) -> FitResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from hescape.raystart import init_ray

    init_ray(None, log_to_driver=bool(config["verbose"]))  # no-op inside a study / job
    tc = cfg.train
    reports: Queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=run_dir.name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints,
                                               checkpoint_score_attribute=tc.best_metric,
                                               checkpoint_score_order=tc.best_mode),
            callbacks=[_QueueReports(reports)]))
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=_run_trainer, args=(trainer, outcome), daemon=True)
    worker.start()
    history = _drain(reports, worker, callback)
    reports.shutdown()
    if "error" in outcome:
        raise _worker_error(outcome["error"])
    return _result(history, _best_path(outcome["result"], tc), run_dir)


def _worker_error(exc: BaseException) -> BaseException:
    """A worker's own TrainingError (e.g. NaN loss) rather than Ray's wrapper, when there."""
    for err in (getattr(exc, "worker_failures", None) or {}).values():
        if isinstance(err, TrainingError):
            return err
    return exc


def _run_trainer(trainer: Any, outcome: dict[str, Any]) -> None:
    try:
        outcome["result"] = trainer.fit()
    except BaseException as exc:  # re-raised in the calling thread
        outcome["error"] = exc


def _drain(reports: Any, worker: threading.Thread,
           callback: ReportCallback | None) -> list[dict[str, Any]]:
    """Forward queued reports to ``callback`` (in this thread) until training ends."""
    history: list[dict[str, Any]] = []
    while True:
        try:
            metrics, ckpt = reports.get(timeout=0.2)
        except queue.Empty:
            if not worker.is_alive() and reports.empty():
                return history
            continue
        history.append(metrics)
        if callback is not None:
            callback(metrics, None if ckpt is None else Path(ckpt))


def _best_path(result: Any, tc: Any) -> Path | None:
    try:
        ckpt = result.get_best_checkpoint(tc.best_metric, tc.best_mode)
    except (RuntimeError, ValueError, KeyError):
        ckpt = None
    ckpt = ckpt or result.checkpoint
    if ckpt is None:
        return None
    score = (result.metrics or {}).get(tc.best_metric)
    if score is not None and not math.isfinite(float(score)):
        log.warning("best metric %s is not finite in the last report", tc.best_metric)
    return Path(ckpt.path)


def _make_queue_callback():
    from ray.train import UserCallback

    class QueueReports(UserCallback):
        """Runs in the Train controller: pushes (rank-0 metrics, checkpoint path) to a queue."""

        def __init__(self, reports: Any) -> None:
            self.reports = reports

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            self.reports.put((dict(metrics[0]), None if checkpoint is None else checkpoint.path))

    return QueueReports


def _QueueReports(reports: Any) -> Any:  # noqa: N802 - a class built lazily (ray import)
    return _make_queue_callback()(reports)
