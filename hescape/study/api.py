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
    accept_config_change: bool = False,
):
    """Load, validate and run the study in ``path``; returns a ``StudyResult``."""
    from hescape.study.driver import run_study

    cfg = load_config(path, overrides)
    return run_study(cfg, source=str(path), resume=resume, overwrite=overwrite,
                     address=address, progress=progress, verbose=verbose,
                     accept_config_change=accept_config_change)


def describe_plan(cfg: StudyConfig, source: str, *, resume: bool = False,
                  overwrite: bool = False, address: str | None = None,
                  accept_config_change: bool = False) -> str:
    """What a study will do (``--dry-run``), checked without starting Ray and without
    writing anything: the config, the endpoints, the data against the config (all problems
    in one ConfigError), and what a run with these flags would do to an existing study
    (``--resume``: which phases are done)."""
    from hescape.data import load_paired
    from hescape.study.driver import preflight
    from hescape.study.preconditions import data_problems, refuse
    from hescape.study.resources import trial_resources
    from hescape.study.space import count_trials, enumerate_sections

    pre = preflight(cfg, source=source, resume=resume, overwrite=overwrite, address=address,
                    accept_config_change=accept_config_change, dry_run=True)
    res = trial_resources(cfg)
    data_line = f"data: {cfg.data.path or 'simulated (cached under <storage_dir>/cache/data)'}"
    data_path = _existing_dataset(cfg)
    if data_path is not None:
        paired = load_paired(data_path)
        refuse(source, data_problems(cfg, paired), "the data and the config")
        parts = ", ".join(f"{p} {len(paired.split.get(p, []))} donor(s)/"
                          f"{len(paired.indices(p))} spots" for p in ("train", "val", "test"))
        data_line += f" ({parts}; checked against the config)"
    else:
        data_line += " (not simulated yet: checked when the run simulates it)"
    variants = enumerate_sections(cfg.sweep, cfg.model_dump(), "preprocess.expression")
    lines = [
        f"study {cfg.name}: {count_trials(cfg)} trial(s) in the search phase"
        + (f", then top-{cfg.sweep.seed_top_k} x {cfg.sweep.seeds - 1} extra seeds"
           if cfg.sweep and cfg.sweep.seeds > 1 and cfg.sweep.searcher != "grid" else "")
        + (f" ({cfg.eval.donor_folds} donor folds per grid point and seed)"
           if cfg.sweep and cfg.sweep.searcher == "grid" and cfg.eval.donor_folds else "")
        + (f", then the confirm phase: the best configuration with each factor at each "
           f"level x {cfg.sweep.confirm.seeds} seeds"
           + (f" x {cfg.eval.donor_folds} donor folds" if cfg.eval.donor_folds else "")
           if cfg.sweep and cfg.sweep.confirm_enabled else ""),
        data_line,
        f"per trial: {res.total_cpu:g} CPU, {res.total_gpu:g} GPU "
        f"({'in-process loop' if res.in_process else f'{res.workers} Ray Train workers'})",
        "preprocessing variants precomputed once: "
        + (", ".join(v["method"] for v in variants) if variants else "computed on first use"),
    ]
    if cfg.sweep:
        lines.append(f"searcher: {cfg.sweep.searcher}, scheduler: {cfg.sweep.scheduler}, "
                     f"objectives: {[o.metric for o in cfg.sweep.objectives]}")
    if resume and pre.info is not None:
        lines.append(_resume_state(pre.study_dir, pre.info))
        if pre.config_change and accept_config_change:
            lines.append("config changes accepted (--accept-config-change):\n  "
                         + "\n  ".join(pre.config_change))
    lines += [f"note: {n}" for n in pre.notes]
    return "\n".join(lines)


def _existing_dataset(cfg: StudyConfig) -> Path | None:
    """The study's dataset if it exists already (a dry run never simulates one)."""
    if cfg.data.path:
        return paths.absolute(cfg.data.path)
    from hescape.train.inputs import simulated_dataset_path

    path = simulated_dataset_path(cfg)
    return path if (path / "manifest.json").is_file() else None


def _resume_state(study_dir: Path, info: dict) -> str:
    """What ``--resume`` would continue: phases done, trials on disk."""
    tune = study_dir / "tune"
    phases = sorted(p.name for p in tune.iterdir()) if tune.is_dir() else []
    done = [p for p in phases if (tune / p / "hescape_phase_done").exists()]
    trials = study_dir / "trials"
    n = len([t for t in trials.iterdir() if t.is_dir()]) if trials.is_dir() else 0
    if info.get("status") == "FINISHED":
        return f"resume: study {info.get('name')} already FINISHED (report: {info.get('report_dir')}): nothing to run"
    return (f"resume: phases started {phases or 'none'}, complete {done or 'none'}; {n} "
            "trial(s) on disk (finished ones are kept, unfinished ones resume from their last "
            "checkpoint)")


def report_study(storage_dir: str | Path, name: str) -> Path:
    """Rewrite the report of an existing study from its MLflow runs."""
    from hescape.study.lineage import LineageRef
    from hescape.study.report.build import write_report

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
