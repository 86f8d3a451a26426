"""Entry points used by the CLIs: run a study from a file, describe its plan, re-report."""

from __future__ import annotations

import json
from pathlib import Path

from hescape import paths
from hescape.config import ConfigError, StudyConfig, load_config


def run_study_file(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
):
    """Load, validate and run the study in ``path``; returns a ``StudyResult``."""
    from hescape.study.driver import run_study

    cfg = load_config(path, overrides)
    return run_study(cfg, source=str(path), resume=resume, overwrite=overwrite,
                     address=address, progress=progress, verbose=verbose)


def describe_plan(cfg: StudyConfig, source: str) -> str:
    """What a study will do, checked without starting Ray (for ``--dry-run``)."""
    from hescape.study.driver import preflight
    from hescape.study.resources import trial_resources
    from hescape.study.space import count_trials, enumerate_sections

    preflight(cfg, source=source, resume=False, overwrite=False)
    res = trial_resources(cfg)
    variants = enumerate_sections(cfg.sweep, cfg.model_dump(), "preprocess.expression")
    lines = [
        f"study {cfg.name}: {count_trials(cfg)} trial(s) in the search phase"
        + (f", then top-{cfg.sweep.seed_top_k} x {cfg.sweep.seeds - 1} extra seeds"
           if cfg.sweep and cfg.sweep.seeds > 1 and cfg.sweep.searcher != "grid" else ""),
        f"data: {cfg.data.path or 'simulated (cached under <storage_dir>/cache/data)'}",
        f"per trial: {res.total_cpu:g} CPU, {res.total_gpu:g} GPU "
        f"({'in-process loop' if res.in_process else f'{res.workers} Ray Train workers'})",
        "preprocessing variants precomputed once: "
        + (", ".join(v["method"] for v in variants) if variants else "computed on first use"),
    ]
    if cfg.sweep:
        lines.append(f"searcher: {cfg.sweep.searcher}, scheduler: {cfg.sweep.scheduler}, "
                     f"objectives: {[o.metric for o in cfg.sweep.objectives]}")
    return "\n".join(lines)


def report_study(storage_dir: str | Path, name: str) -> Path:
    """Rewrite the report of an existing study from its MLflow runs."""
    from hescape.study.lineage import LineageRef
    from hescape.study.report import write_report

    study_dir = paths.study_dir(storage_dir, name)
    info_path = study_dir / "study.json"
    if not info_path.exists():
        raise ConfigError(f"no study {name!r} under {study_dir.parent} (missing {info_path})")
    info = json.loads(info_path.read_text())
    if not info.get("parent_run_id"):
        raise ConfigError(f"study {name!r} stopped before its MLflow run opened: finish it "
                          "with --resume first")
    ref = LineageRef(info["tracking_uri"], info["experiment_id"], info["parent_run_id"], name)
    cfg = StudyConfig.model_validate(info["config"])
    shared = study_dir / "shared_work.json"
    work = json.loads(shared.read_text()) if shared.exists() else None
    return write_report(ref, study_dir, cfg, work)
