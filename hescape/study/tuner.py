"""Tuner construction: searcher (Optuna TPE / random, or grid), scheduler (ASHA), resources.

Two phases share one construction path: ``search`` explores the space; ``seeds`` re-runs
the top-k configurations of the search over extra seeds (grid studies put seeds straight
into the grid). Run names are stable (no timestamps) so ``Tuner.restore`` finds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hescape.config import StudyConfig
from hescape.study.callbacks import MlflowCloser
from hescape.study.resources import TrialResources
from hescape.study.space import SEED_KEY, define_by_run, grid_points, with_seeds
from hescape.study.trial import SharedContext, run_trial


def phase_dir(shared: SharedContext, phase: str) -> Path:
    return Path(shared.study_dir) / "tune" / phase


def objectives(cfg: StudyConfig) -> tuple[list[str], list[str]]:
    objs = cfg.sweep.objectives if cfg.sweep else []
    if not objs:
        return [cfg.train.best_metric], [cfg.train.best_mode]
    return [o.metric for o in objs], [o.mode for o in objs]


def _searcher(cfg: StudyConfig, base: dict[str, Any]):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    metrics, modes = objectives(cfg)
    seed = cfg.train.seed
    if cfg.sweep.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, cfg.sweep.num_samples))
    single = len(metrics) == 1
    return OptunaSearch(
        space=define_by_run(cfg.sweep, base),
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        sampler=sampler,
        study_name=f"hescape-{cfg.name}",  # explicit: never merge two studies' Optuna state
    )


def _scheduler(cfg: StudyConfig):
    if cfg.sweep is None or cfg.sweep.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metrics, modes = objectives(cfg)
    metric, mode = metrics[0], modes[0]
    if not metric.startswith(("val/", "train/")):
        # ASHA compares intermediate results; only validation metrics exist mid-trial.
        metric, mode = cfg.train.best_metric, cfg.train.best_mode
    n_evals = max(1, cfg.train.max_steps // cfg.train.eval_every) + 1
    return ASHAScheduler(
        time_attr="training_iteration", metric=metric, mode=mode,
        max_t=n_evals + 1, grace_period=min(cfg.sweep.grace_period, n_evals), reduction_factor=2,
    )


def _trainable(cfg: StudyConfig, shared: SharedContext, res: TrialResources):
    from ray import tune

    fn = tune.with_parameters(run_trial, shared=shared)
    return tune.with_resources(fn, res.trial)


def _run_config(cfg: StudyConfig, shared: SharedContext, phase: str):
    from ray import tune

    return tune.RunConfig(
        name=phase,
        storage_path=str(Path(shared.study_dir) / "tune"),
        callbacks=[MlflowCloser(shared.lineage)],
        failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        verbose=1,
    )


def build_tuner(
    cfg: StudyConfig, shared: SharedContext, res: TrialResources, concurrency: int, phase: str,
    *, points: list[dict[str, Any]] | None = None,
):
    """A fresh Tuner for ``phase`` ('search' or 'seeds')."""
    from ray import tune

    base = shared.base
    single = cfg.sweep is None
    if points is None and (single or cfg.sweep.searcher == "grid"):
        grid = [{}] if single else grid_points(cfg.sweep, base)
        points = with_seeds(grid, 1 if single else cfg.sweep.seeds, cfg.train.seed)
    if points is not None:
        search_alg, param_space, num_samples = None, {"point": tune.grid_search(points)}, 1
    else:
        search_alg, param_space, num_samples = _searcher(cfg, base), {}, cfg.sweep.num_samples
    metrics, modes = objectives(cfg)
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=_scheduler(cfg) if phase == "search" else None,
        num_samples=num_samples,
        max_concurrent_trials=concurrency,
        # a trial actor is reused for the next trial: no process start, imports or numba
        # JIT per trial (the demo ran 2.1x faster); trials share no state (the loop seeds
        # everything and resets the peak-memory count)
        reuse_actors=True,
    )
    return tune.Tuner(
        _trainable(cfg, shared, res), param_space=param_space, tune_config=tune_config,
        run_config=_run_config(cfg, shared, phase),
    )


def restore_tuner(
    cfg: StudyConfig, shared: SharedContext, res: TrialResources, concurrency: int, phase: str,
    *, points: list[dict[str, Any]] | None = None,
):
    """Restore an interrupted phase: finished trials stay, unfinished resume, errored restart."""
    from ray import tune

    path = phase_dir(shared, phase)
    if not tune.Tuner.can_restore(str(path)):
        return build_tuner(cfg, shared, res, concurrency, phase, points=points)
    return tune.Tuner.restore(
        str(path), trainable=_trainable(cfg, shared, res),
        resume_unfinished=True, resume_errored=False, restart_errored=True,
    )


def seed_points(cfg: StudyConfig, shared: SharedContext) -> list[dict[str, Any]]:
    """Top-k configurations of the search phase, repeated over seeds 1..n-1."""
    from hescape.study.results import trial_table

    table = trial_table(shared.lineage, phase="search")
    metrics, modes = objectives(cfg)
    metric, mode = metrics[0], modes[0]
    done = [r for r in table if r["status"] == "FINISHED" and metric in r["metrics"]]
    done.sort(key=lambda r: r["metrics"][metric], reverse=(mode == "max"))
    k = cfg.sweep.seed_top_k if cfg.sweep else 1
    base_seed = cfg.train.seed
    points = []
    for row in done[:k]:
        params = {p: v for p, v in row["sweep_params"].items() if p != SEED_KEY}
        points.extend({**params, SEED_KEY: base_seed + i} for i in range(1, cfg.sweep.seeds))
    return points
