"""Tuner construction: searcher (Optuna TPE / random, or grid), scheduler (ASHA or MO-ASHA),
resources.

Three phases share one construction path: ``search`` explores the space; ``seeds`` re-runs
the top-k configurations of the search over extra seeds (grid studies put seeds, and donor
folds, straight into the grid); ``confirm`` runs the controlled, replicated comparisons
around the best configuration (``hescape.study.confirm``). Run names are stable (no timestamps) so ``Tuner.restore`` finds them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig
from hescape.study.callbacks import ConsoleProgress, Interrupted, MlflowCloser
from hescape.study.durable import BACKUP, DurableScheduler, repair_state
from hescape.study.resources import TrialResources
from hescape.study.space import SEED_KEY, define_by_run, grid_points, with_folds, with_seeds
from hescape.study.trial import SharedContext, run_trial
from hescape.study.tune_reports import TIME_ATTR, objectives, scheduler_metric

__all__ = ["build_tuner", "objectives", "phase_dir", "restore_tuner", "seed_points"]

def phase_dir(shared: SharedContext, phase: str) -> Path:
    """Tune's experiment directory of ``phase``."""
    return Path(shared.study_dir) / "tune" / phase


def resume_dir(shared: SharedContext, phase: str) -> Path:
    """The driver's own resume state of ``phase`` (scheduler, copies of Tune's state): never
    inside Tune's directory, whose files a restored Tune run copies back over newer ones."""
    return Path(shared.study_dir) / "resume" / phase


def set_tune_output(verbose: bool) -> None:
    """Tune's console output in this (driver) process: its status tables and INFO logs with
    ``verbose``, else nothing but warnings (``ConsoleProgress`` prints one line per event).
    Its new output engine prints an experiment table even when silent: the legacy one does
    not (``RAY_AIR_NEW_OUTPUT`` is read when a Tuner runs)."""
    import logging

    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("ray.tune").setLevel(level)
    logging.getLogger("optuna").setLevel(level)  # "A new study created in memory ..."


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


REDUCTION_FACTOR = 2  # ASHA and MO-ASHA: the top 1/2 of a rung continues


def _scheduler(cfg: StudyConfig, state: Path, phase: str,
               study_dir: Path | None = None) -> DurableScheduler:
    """ASHA (or MO-ASHA over every objective: ``sweep.scheduler: moasha``) in the search
    phase when asked (on training steps: a restored trial's Tune iteration count restarts,
    its step does not), else FIFO; all kept durable. MO-ASHA writes its decisions under
    ``study_dir`` (``moasha.decisions_path``) for the report."""
    sched = scheduler_metric(cfg) if phase == "search" else None
    inner = None
    if sched is not None:
        tc = cfg.train
        n_evals = -(-tc.max_steps // tc.eval_every)  # the last step always reports
        rungs = dict(
            time_attr=TIME_ATTR,
            max_t=tc.max_steps + 1,  # never reached: a trial that trains to the end evaluates
            grace_period=min(cfg.sweep.grace_period, n_evals) * tc.eval_every,
            reduction_factor=REDUCTION_FACTOR)
        if cfg.sweep.scheduler == "moasha":
            from hescape.study.moasha import MOASHA, decisions_path

            metrics, modes = objectives(cfg)
            log = None if study_dir is None else decisions_path(study_dir, phase)
            inner = MOASHA(metrics=metrics, modes=modes, log_path=log, **rungs)
        else:
            from ray.tune.schedulers import ASHAScheduler

            inner = ASHAScheduler(metric=sched[0], mode=sched[1], **rungs)
    return DurableScheduler(inner, state)


def _trainable(cfg: StudyConfig, shared: SharedContext, res: TrialResources):
    from ray import tune

    fn = tune.with_parameters(run_trial, shared=shared)
    return tune.with_resources(fn, res.trial)


def _run_config(cfg: StudyConfig, shared: SharedContext, phase: str,
                points: list[dict[str, Any]] | None = None):
    from ray import tune

    grid = explicit_points(cfg, shared, points) is not None  # Tune numbers a grid from 0
    scheduler = cfg.sweep.scheduler if cfg.sweep is not None else "none"
    progress = ConsoleProgress(phase, objectives(cfg)[0],
                               expected_trials(cfg, shared, points), first_tag=0 if grid else 1,
                               scheduler=scheduler)
    return tune.RunConfig(
        name=phase,
        storage_path=str(Path(shared.study_dir) / "tune"),
        callbacks=[MlflowCloser(shared.lineage, scheduler), progress, Interrupted()],
        failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
        verbose=1 if shared.verbose else 0,  # --verbose: Tune's status tables
    )


def explicit_points(cfg: StudyConfig, shared: SharedContext,
                    points: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The points a phase runs as a grid (a grid study with its seeds, a single trial, the
    seeds phase's ``points``), or None when a searcher suggests them."""
    if points is None and (cfg.sweep is None or cfg.sweep.searcher == "grid"):
        single = cfg.sweep is None
        grid = [{}] if single else grid_points(cfg.sweep, shared.base)
        points = with_seeds(grid, 1 if single else cfg.sweep.seeds, cfg.train.seed)
        if not single:  # a grid is the controlled design: on donor folds when asked
            points = with_folds(points, cfg.eval.donor_folds)
    return points


def expected_trials(cfg: StudyConfig, shared: SharedContext,
                    points: list[dict[str, Any]] | None) -> int:
    """How many trials a complete phase holds."""
    explicit = explicit_points(cfg, shared, points)
    return len(explicit) if explicit is not None else cfg.sweep.num_samples


def build_tuner(
    cfg: StudyConfig, shared: SharedContext, res: TrialResources, concurrency: int, phase: str,
    *, points: list[dict[str, Any]] | None = None,
):
    """A fresh Tuner for ``phase`` ('search' or 'seeds')."""
    from ray import tune

    base = shared.base
    points = explicit_points(cfg, shared, points)
    if points is not None:
        search_alg, param_space, num_samples = None, {"point": tune.grid_search(points)}, 1
    else:
        search_alg, param_space, num_samples = _searcher(cfg, base), {}, cfg.sweep.num_samples
    state = resume_dir(shared, phase)
    shutil.rmtree(state, ignore_errors=True)  # a fresh phase starts with a fresh scheduler
    if cfg.sweep is not None and cfg.sweep.scheduler == "moasha":
        from hescape.study.moasha import decisions_path

        decisions_path(shared.study_dir, phase).unlink(missing_ok=True)  # and a fresh log
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=_scheduler(cfg, state, phase, Path(shared.study_dir)),
        num_samples=num_samples,
        max_concurrent_trials=concurrency,
        # a trial actor is reused for the next trial: no process start, imports or numba
        # JIT per trial (the demo ran 2.1x faster); trials share no state (the loop seeds
        # everything and resets the peak-memory count)
        reuse_actors=True,
    )
    return tune.Tuner(
        _trainable(cfg, shared, res), param_space=param_space, tune_config=tune_config,
        run_config=_run_config(cfg, shared, phase, points),
    )


def restore_tuner(
    cfg: StudyConfig, shared: SharedContext, res: TrialResources, concurrency: int, phase: str,
    *, points: list[dict[str, Any]] | None = None,
):
    """Restore an interrupted phase: finished trials stay, unfinished ones resume under their
    own ids; errored ones stay failed (restarting one gives it a new id the searcher never
    suggested: two MLflow runs for one configuration)."""
    from ray import tune

    path = phase_dir(shared, phase)
    if not tune.Tuner.can_restore(str(path)):
        return build_tuner(cfg, shared, res, concurrency, phase, points=points)
    if repair_state(path, resume_dir(shared, phase) / BACKUP):
        print(f"[study] {phase}: Tune's last state files were cut short by the interruption; "
              "restored from the copy of the last complete one", flush=True)
    tuner = tune.Tuner.restore(
        str(path), trainable=_trainable(cfg, shared, res),
        resume_unfinished=True, resume_errored=False, restart_errored=False,
    )
    local = getattr(tuner, "_local_tuner", None)  # the RunConfig comes back pickled:
    if local is not None:  # --verbose applies to this run, not to the interrupted one
        local.get_run_config().verbose = 1 if shared.verbose else 0
    return tuner


def seed_points(cfg: StudyConfig, shared: SharedContext) -> list[dict[str, Any]]:
    """Top-k configurations of the search phase, repeated over seeds 1..n-1."""
    from hescape.study.results import trial_table

    table = trial_table(shared.lineage, phase="search")
    metrics, modes = objectives(cfg)
    metric, mode = metrics[0], modes[0]
    done = [r for r in table if r["status"] == "FINISHED" and metric in r["metrics"]]
    sign = -1.0 if mode == "max" else 1.0  # ties by configuration: trial ids are random
    done.sort(key=lambda r: (sign * r["metrics"][metric], r["config_id"], str(r["seed"])))
    k = cfg.sweep.seed_top_k if cfg.sweep else 1
    base_seed = cfg.train.seed
    points = []
    for row in done[:k]:
        params = {p: v for p, v in row["sweep_params"].items() if p != SEED_KEY}
        points.extend({**params, SEED_KEY: base_seed + i} for i in range(1, cfg.sweep.seeds))
    return points
