"""One Tune trial: resolve its config, train (Ray Train or in-process), evaluate, log to MLflow.

The trial owns its MLflow child run: it reattaches to the run tagged with its Tune trial id
(so a restored trial never opens a second run), logs params, per-step metrics, the
resolved config, the best checkpoint's location and the final evaluation, and closes the
run FINISHED or FAILED with the reason. The driver closes runs of trials that were stopped
from outside (ASHA, a killed worker) — see ``callbacks.py``.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig
from hescape.study import lineage
from hescape.study.space import SEED_KEY, apply_params, config_id
from hescape.tracking import log_metrics_retry, sanitize_key

PARAM_PREFIX = "p:"  # Tune config keys that are sweep parameters (dotted config paths)


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


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The sweep parameters of a Tune config (grid points arrive under ``point``)."""
    params = dict(config.get("point", {}))
    params.update({k: v for k, v in config.items() if k != "point"})
    return params


def resolve_trial_config(shared: SharedContext, params: dict[str, Any]) -> StudyConfig:
    return StudyConfig.model_validate(apply_params(shared.base, params))


def _finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[sanitize_key(k)] = float(v)
    return out


def run_trial(config: dict[str, Any], shared: SharedContext) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters``)."""
    from ray import tune

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    params = trial_params(config)
    cfg = resolve_trial_config(shared, params)
    run_dir = Path(shared.study_dir) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"{trial_id} {config_id(params)} seed={params.get(SEED_KEY, cfg.train.seed)}"
    ref = shared.lineage
    existing = lineage.find_child(ref, trial_id)
    if existing is not None and existing.info.status == "FINISHED":
        # completed before a driver crash: report its result, do not re-run
        tune.report({**_finite_metrics(existing.data.metrics), "done": 1.0})
        return
    prepared = _prepared(cfg)
    run_id = lineage.open_child(ref, trial_id, existing=existing, name=name[:250],
                                tags=_trial_tags(shared, cfg, params, prepared))
    try:
        result = _train_and_evaluate(cfg, ref, run_id, run_dir, prepared)
    except SystemExit as exc:  # Tune stops a trial (ASHA) by exiting inside tune.report
        if exc.code not in (0, None):
            lineage.finish_run(ref, run_id, "FAILED", error=f"SystemExit: {exc.code}")
            raise
        lineage.finish_run(ref, run_id, "KILLED", error="stopped early by the scheduler (ASHA)")
        raise
    except BaseException as exc:  # noqa: BLE001 - record every failure, then re-raise to Tune
        lineage.finish_run(ref, run_id, "FAILED", error=f"{type(exc).__name__}: {exc}")
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    lineage.finish_run(ref, run_id, "FINISHED")
    tune.report({**result, "done": 1.0})


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
    }


def _train_and_evaluate(
    cfg: StudyConfig, ref: lineage.LineageRef, run_id: str, run_dir: Path, prepared: Any
) -> dict[str, float]:
    from ray import tune
    from ray.tune import Checkpoint

    from hescape.study.evaluation import evaluate_trial
    from hescape.train import fit
    from hescape.train.inputs import prepared_entry_path

    lineage.log_params(ref, run_id, cfg.model_dump())
    lineage.log_json_artifact(ref, run_id, cfg.model_dump(), "resolved_config.json")

    def report(metrics: dict[str, Any], checkpoint: str | os.PathLike | None = None) -> None:
        clean = _finite_metrics(metrics)
        step = int(metrics.get("step", 0))
        log_metrics_retry(lineage.MlflowClient(ref.tracking_uri), run_id, clean, step=step)
        if checkpoint is not None:
            tune.report(clean, checkpoint=Checkpoint.from_directory(str(checkpoint)))
        else:
            tune.report(clean)

    resume = tune.get_checkpoint()
    resume_dir = resume.to_directory() if resume is not None else None
    fitted = fit(cfg, run_dir=run_dir / "train", report_callback=report, resume_from=resume_dir,
                 prepared_path=prepared_entry_path(cfg, prepared))
    client = lineage.MlflowClient(ref.tracking_uri)
    if fitted.best_checkpoint is not None:
        client.set_tag(run_id, "hescape.best_checkpoint", str(fitted.best_checkpoint))
    metrics, artifacts = evaluate_trial(cfg, fitted, out_dir=run_dir / "eval")
    evaluated = _finite_metrics(metrics)  # training metrics were logged per report already
    log_metrics_retry(client, run_id, evaluated, step=int(fitted.metrics.get("step", 0)))
    final = {**_finite_metrics(fitted.metrics), **evaluated}
    lineage.log_artifacts(ref, run_id, artifacts, subdir="eval")
    return final
