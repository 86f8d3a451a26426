"""Per-trial resources, cluster capacity and storage checks — all before any trial starts."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hescape.config import ConfigError, StudyConfig, get_path

MIN_FREE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves: the trial process itself plus its Train worker group."""

    trial: dict[str, float]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    in_process: bool

    @property
    def total_cpu(self) -> float:
        extra = 0.0 if self.in_process else self.workers * self.cpus_per_worker
        return self.trial.get("CPU", 0.0) + extra

    @property
    def total_gpu(self) -> float:
        extra = 0.0 if self.in_process else self.workers * self.gpus_per_worker
        return self.trial.get("GPU", 0.0) + extra


# what a packed trial must keep fixed: (its value must pass, why)
PACKING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.image.mode": (lambda v: v == "frozen",
                         "a trial that trains the image encoder needs a whole GPU"),
    "train.feature_cache": (lambda v: v is True,
                            "without the feature cache every batch runs the image encoder"),
    "preprocess.image.stain_augment": (lambda v: v == 0,
                                       "stain augmentation re-encodes every batch"),
}


def _values(cfg: StudyConfig, key: str) -> list[Any] | None:
    """Every value ``key`` can take in the study (None: sampled from a continuous range)."""
    values = [get_path(cfg.model_dump(), key)]
    param = cfg.sweep.params.get(key) if cfg.sweep is not None else None
    if param is not None:
        if param.type != "choice":
            return None
        values += list(param.values or [])
    return values


def packing_problem(cfg: StudyConfig) -> str | None:
    """Why trials of ``cfg`` may not share a GPU (``train.gpus_per_trial``), or None.

    Only head-only trials pack: a frozen image encoder whose features come from the
    study's cache, so a trial trains the projection heads and the gene tower alone."""
    frac = cfg.train.gpus_per_trial
    for key, (ok, why) in PACKING_RULES.items():
        values = _values(cfg, key)
        if values is None:
            return (f"train.gpus_per_trial={frac:g} packs head-only trials on one GPU, but the "
                    f"sweep samples {key} from a range: list its values (type: choice)")
        bad = [v for v in values if not ok(v)]
        if bad:
            return (f"train.gpus_per_trial={frac:g} packs head-only trials on one GPU, but "
                    f"{key} can be {bad[0]!r}: {why}. Keep model.image.mode: frozen, "
                    "train.feature_cache: true and preprocess.image.stain_augment: 0 in every "
                    "trial, or drop train.gpus_per_trial (one whole GPU per trial)")
    return None


def stacking_problem(cfg: StudyConfig) -> str | None:
    """Why trials of ``cfg`` may not train in stacks (``train.stack_size`` > 1), or None:
    every trial the sweep can make must be head-only (the packing rules) with one worker,
    and on a GPU say its share (``gpus_per_trial``)."""
    from hescape.train.stack_key import (
        STACKABLE_GENE_ENCODERS,
        STACKABLE_LOSSES,
        STACKABLE_PROJECTIONS,
    )

    t, k = cfg.train, cfg.train.stack_size
    if t.num_workers != 1:
        return (f"train.stack_size={k} stacks one-worker head-only trials; set "
                f"train.num_workers: 1 (have {t.num_workers}) or train.stack_size: 1")
    if t.use_gpu and t.gpus_per_trial is None:
        return (f"train.stack_size={k} on a GPU: set train.gpus_per_trial (the GPU share a "
                "stack of stack_size trials uses, e.g. 1.0) or train.stack_size: 1")
    rules = {**PACKING_RULES,
             "model.gene.name": (lambda v: v in STACKABLE_GENE_ENCODERS,
                                 f"only {sorted(STACKABLE_GENE_ENCODERS)} stack"),
             "model.projection": (lambda v: v in STACKABLE_PROJECTIONS,
                                  f"only {sorted(STACKABLE_PROJECTIONS)} stack"),
             "loss.name": (lambda v: v in STACKABLE_LOSSES, f"only {sorted(STACKABLE_LOSSES)} stack")}
    for key, (ok, why) in rules.items():
        values = _values(cfg, key)
        if values is None:
            return (f"train.stack_size={k}: the sweep samples {key} from a range; list its "
                    "values (type: choice)")
        bad = [v for v in values if not ok(v)]
        if bad:
            return (f"train.stack_size={k} stacks head-only trials, but {key} can be "
                    f"{bad[0]!r}: {why}. Set train.stack_size: 1 for this study")
    return None


def trial_resources(cfg: StudyConfig) -> TrialResources:
    """What one trial of ``cfg`` reserves (a ConfigError if GPU packing or stacking is not
    allowed). A stacked trial reserves 1/stack_size of a worker: the stack service that
    trains its member runs on those shares (``hescape.study.stacking``)."""
    from hescape.train import runs_in_process  # the rule fit() itself follows

    t = cfg.train
    if t.stack_size > 1:
        problem = stacking_problem(cfg)
        if problem:
            raise ConfigError(problem)
        share = {"CPU": t.cpus_per_worker / t.stack_size}
        gpu = (t.gpus_per_trial or 0.0) / t.stack_size if t.use_gpu else 0.0
        if gpu:
            share["GPU"] = gpu
        return TrialResources(share, 1, share["CPU"], gpu, True)
    if t.gpus_per_trial is not None:
        problem = packing_problem(cfg)
        if problem:
            raise ConfigError(problem)
        # the loop runs in the trial actor, on the GPU share Ray gives it
        share = {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_trial}
        return TrialResources(share, 1, t.cpus_per_worker, t.gpus_per_trial, True)
    gpus = 1.0 if t.use_gpu else 0.0
    if runs_in_process(cfg):
        return TrialResources({"CPU": t.cpus_per_worker}, 1, t.cpus_per_worker, 0.0, True)
    # The trial process only drives the worker group; it needs (almost) nothing itself.
    # (a tiny memory request: Tune refuses an all-zero resource bundle)
    return TrialResources({"CPU": 0.0, "memory": 1e6}, t.num_workers, t.cpus_per_worker, gpus, False)


def max_concurrent_trials(
    res: TrialResources, cluster: dict[str, float], user_cap: int | None, source: str
) -> int:
    """How many trials run at once: ``user_cap`` (``sweep.max_concurrent``) when set, else
    as many as fit on the cluster now; an error if not even one fits."""
    cpu, gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if res.total_cpu > cpu + 1e-9 or res.total_gpu > gpu + 1e-9:
        raise ConfigError(
            f"{source}: one trial needs {res.total_cpu:g} CPU and {res.total_gpu:g} GPU "
            f"(train.num_workers={res.workers}, train.cpus_per_worker={res.cpus_per_worker:g}, "
            f"train.use_gpu={res.gpus_per_worker > 0}) but the Ray cluster has {cpu:g} CPU and "
            f"{gpu:g} GPU. Lower train.num_workers/cpus_per_worker, or add nodes."
        )
    fits = math.floor((cpu + 1e-9) / res.total_cpu) if res.total_cpu > 0 else 10**6
    if res.total_gpu > 0:
        fits = min(fits, math.floor((gpu + 1e-9) / res.total_gpu))
    fits = max(1, fits)
    # an explicit cap is honoured even above what fits now: the extra trials wait PENDING
    # and start on nodes that join mid-study (``ray start --address``, an autoscaler)
    return user_cap if user_cap else fits


def check_storage(path: Path, *, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail early with a clear message if ``path`` is not writable or nearly full.

    Checks the deepest existing ancestor (a probe file written and removed there), so a
    refused study leaves no directory behind.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(existing))
        probe = existing / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"storage_dir {path}: not writable ({exc.strerror or exc}). "
            "Set storage_dir (or --set storage_dir=...) to a writable directory."
        ) from None
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise ConfigError(
            f"storage_dir {path}: only {free / 1024**2:.0f} MiB free; a study needs at least "
            f"{min_free / 1024**2:.0f} MiB for checkpoints, caches and the MLflow store."
        )


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or 'unknown'."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, env=env,
            timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
            capture_output=True, text=True, env=env, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
