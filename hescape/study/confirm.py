"""The confirm phase: controlled, replicated comparisons around the searched best.

A TPE/random search compares levels marginally (the trials at two levels also differ in
everything else TPE chose, and each configuration ran once). After the search, this phase
re-runs, for each swept factor, the best configuration with that factor set to each of its
levels and every other factor held at the best, ``sweep.confirm.seeds`` seeds each (and on
every donor fold with ``eval.donor_folds``), on the study's shared preprocessing and feature
caches. The effects table reads these trials first: the levels differ in one factor only,
and seed (and fold) variation is measured.

- Best configuration: the finished search (+ seeds phase) configuration with the best mean
  of the first objective over its seeds (a validation metric; ties by configuration id).
- Levels: a choice factor's values; a continuous factor's range ends and the searched best
  value (``confirm.levels`` > 3 adds evenly spaced values, geometric for loguniform).
- Conditional parameters follow their condition: switched on by a level, they take the
  value of the best search trial at that level (else their range's middle); switched off,
  they are dropped. A conditional factor whose condition the best configuration does not
  meet is not confirmed (the plan says why), nor is a level that pairs a gene encoder with
  a preprocessing output it cannot take.

The plan (best configuration, factors, levels, what was skipped) is written to
``<study>/confirm/plan.json`` before the phase runs; the report rebuilds each factor's
sub-experiment from it (``membership``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hescape import atomic
from hescape.config import ConfigError, StudyConfig, SweepParam, validate_config
from hescape.study.space import FOLD_KEY, SEED_KEY, apply_params, config_id, pair_problem

REPLICATE_KEYS = (SEED_KEY, FOLD_KEY)  # what varies within one configuration
PLAN = "plan.json"


def configuration(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without its replicate keys (seed, donor fold)."""
    return {k: v for k, v in params.items() if k not in REPLICATE_KEYS}


def best_configuration(rows: Sequence[dict[str, Any]], metric: str, mode: str,
                       ) -> tuple[dict[str, Any], float, int] | None:
    """(params, mean objective over its seeds, n trials) of the best finished configuration
    among ``rows`` (trial_table rows), or None when none finished with the metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        value = r["metrics"].get(metric)
        if r["status"] == "FINISHED" and value is not None and math.isfinite(value):
            groups.setdefault(config_id(configuration(r["sweep_params"])), []).append(r)
    if not groups:
        return None
    sign = -1.0 if mode == "max" else 1.0
    scored = sorted((sign * float(np.mean([r["metrics"][metric] for r in g])), cid, g)
                    for cid, g in groups.items())
    _, _, group = scored[0]
    return (configuration(group[0]["sweep_params"]),
            float(np.mean([r["metrics"][metric] for r in group])), len(group))


def levels_of(param: SweepParam, best: Any, n: int) -> list[Any]:
    """The levels a factor is confirmed at (module docstring)."""
    if param.type == "choice":
        return list(param.values or [])
    low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
    if param.type == "loguniform":
        grid = list(np.geomspace(low, high, max(n - 1, 2)))
    else:
        grid = list(np.linspace(low, high, max(n - 1, 2)))
    values = [low, high, *grid[1:-1][: max(n - 3, 0)]]
    if best is not None:
        values.append(best)
    if param.type == "int":
        values = [int(round(v)) for v in values]
    else:
        values = [float(v) for v in values]
    return sorted(dict.fromkeys(values))


def _holds(param: SweepParam, params: dict[str, Any], base: dict[str, Any]) -> bool:
    from hescape.config import get_path

    for key, allowed in (param.when or {}).items():
        value = params[key] if key in params else get_path(base, key)
        if value not in allowed:
            return False
    return True


def _middle(param: SweepParam) -> Any:
    if param.type == "choice":
        return (param.values or [None])[0]
    low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
    mid = math.sqrt(low * high) if param.type == "loguniform" else (low + high) / 2
    return int(round(mid)) if param.type == "int" else mid


def _at_level(cfg: StudyConfig, best: dict[str, Any], factor: str, level: Any,
              rows: Sequence[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    """``best`` with ``factor`` = ``level``; conditional parameters follow their condition."""
    assert cfg.sweep is not None
    params = {**best, factor: level}
    metric = cfg.sweep.objectives[0]
    for key, p in cfg.sweep.params.items():  # declared order: conditions come first
        if key == factor or not p.when:
            continue
        if not _holds(p, params, base):
            params.pop(key, None)
        elif key not in params:
            params[key] = _donor_value(rows, key, {factor: level}, metric) or _middle(p)
    return params


def _donor_value(rows: Sequence[dict[str, Any]], key: str, where: dict[str, Any],
                 objective: Any) -> Any:
    """``key``'s value in the best finished search trial matching ``where``, else None."""
    sign = -1.0 if objective.mode == "max" else 1.0
    found = [(sign * r["metrics"][objective.metric], r["trial_id"], r["sweep_params"][key])
             for r in rows if r["status"] == "FINISHED" and key in r["sweep_params"]
             and objective.metric in r["metrics"]
             and all(r["sweep_params"].get(k) == v for k, v in where.items())]
    return sorted(found)[0][2] if found else None


def make_plan(cfg: StudyConfig, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The confirm plan from the search (+ seeds) phase's ``rows``: best configuration,
    per factor its levels (each a full configuration) or why it is not confirmed."""
    assert cfg.sweep is not None
    objective = cfg.sweep.objectives[0]
    found = best_configuration(rows, objective.metric, objective.mode)
    if found is None:
        return {"best": None, "factors": {}, "note": "no search trial finished with "
                f"{objective.metric}: nothing to confirm"}
    best, score, n = found
    base = cfg.model_dump()
    factors: dict[str, Any] = {}
    for factor, p in cfg.sweep.params.items():
        if factor in REPLICATE_KEYS:
            continue
        if p.when and not _holds(p, best, base):
            factors[factor] = {"skipped": f"its condition {p.when} does not hold in the best "
                                          "configuration"}
            continue
        levels, skipped = [], []
        for level in levels_of(p, best.get(factor), cfg.sweep.confirm.levels):
            params = _at_level(cfg, best, factor, level, rows, base)
            resolved = apply_params(base, params)
            problem = pair_problem(resolved)
            if problem is None:
                try:
                    validate_config(resolved, source=f"confirm {factor}={level!r}")
                except ConfigError as exc:
                    problem = str(exc).splitlines()[-1].strip()
            if problem is not None:
                skipped.append({"level": level, "why": problem})
                continue
            levels.append({"level": level, "params": params})
        entry: dict[str, Any] = {"levels": levels, "reference": best.get(factor)}
        if skipped:
            entry["skipped_levels"] = skipped
        if len(levels) < 2:
            entry = {"skipped": "fewer than 2 levels can run", **entry}
        factors[factor] = entry
    return {"best": best, "best_score": score, "best_trials": n,
            "objective": objective.metric, "mode": objective.mode, "factors": factors,
            "seeds": cfg.sweep.confirm.seeds, "folds": cfg.eval.donor_folds}


def plan_points(cfg: StudyConfig, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Trial points of a plan: distinct configurations x seeds (x donor folds)."""
    configs: list[dict[str, Any]] = []
    for entry in plan["factors"].values():
        if "skipped" in entry:
            continue
        for level in entry["levels"]:
            if level["params"] not in configs:
                configs.append(level["params"])
    seeds = [cfg.train.seed + i for i in range(cfg.sweep.confirm.seeds)]  # type: ignore[union-attr]
    folds = list(range(cfg.eval.donor_folds)) if cfg.eval.donor_folds else [None]
    return [{**c, SEED_KEY: s, **({} if f is None else {FOLD_KEY: f})}
            for c in configs for s in seeds for f in folds]


def plan_path(study_dir: str | Path) -> Path:
    return Path(study_dir) / "confirm" / PLAN


def write_plan(study_dir: str | Path, plan: dict[str, Any]) -> Path:
    return atomic.write_json(plan_path(study_dir), plan, indent=1, default=str)


def read_plan(study_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(plan_path(study_dir).read_text())
    except (OSError, ValueError):
        return None


def membership(cfg: StudyConfig, plan: dict[str, Any],
               rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{factor: its confirm-phase rows}``: the trials whose configuration is one of the
    factor's levels in the plan (the best configuration belongs to every factor)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for factor, entry in plan.get("factors", {}).items():
        if "skipped" in entry:
            continue
        wanted = [json.dumps(level["params"], sort_keys=True, default=str)
                  for level in entry["levels"]]
        out[factor] = [r for r in rows if r.get("phase") == "confirm"
                       and json.dumps(configuration(r["sweep_params"]), sort_keys=True,
                                      default=str) in wanted]
    return out
