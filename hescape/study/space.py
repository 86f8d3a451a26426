"""Search space: YAML ``sweep.params`` -> Optuna define-by-run space, grid points, validation.

A parameter is addressed by the dotted path of the config key it sets
(``loss.init_temperature``). ``when: {other.path: [values]}`` makes it conditional: it is
sampled only when the other key (an earlier sweep parameter, or the base config) has one of
the listed values; otherwise the base value stays. Conditions may only refer to parameters
declared earlier, so define-by-run sampling is a single ordered pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hescape.config import (
    ConfigError,
    StudyConfig,
    SweepConfig,
    SweepParam,
    get_path,
    set_path,
    validate_config,
)

SEED_KEY = "train.seed"


def _condition_holds(param: SweepParam, sampled: dict[str, Any], base: dict[str, Any]) -> bool:
    for key, allowed in (param.when or {}).items():
        value = sampled[key] if key in sampled else get_path(base, key)
        if value not in allowed:
            return False
    return True


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` (a StudyConfig dict) with each dotted param set."""
    out = base
    for key, value in params.items():
        out = set_path(out, key, value)
    return out


class DefineByRun:
    """Optuna define-by-run space for ``OptunaSearch(space=...)``.

    A module-level class (not a closure) so Tune can pickle the searcher's state for resume.
    """

    def __init__(self, sweep: SweepConfig, base: dict[str, Any]) -> None:
        self.params = {k: p.model_dump() for k, p in sweep.params.items()}
        self.base = base

    def __call__(self, trial: Any) -> None:
        sampled: dict[str, Any] = {}
        for key, raw in self.params.items():
            p = SweepParam.model_validate(raw)
            if not _condition_holds(p, sampled, self.base):
                continue
            if p.type == "choice":
                sampled[key] = trial.suggest_categorical(key, p.values)
            elif p.type == "uniform":
                sampled[key] = trial.suggest_float(key, p.low, p.high)
            elif p.type == "loguniform":
                sampled[key] = trial.suggest_float(key, p.low, p.high, log=True)
            else:
                sampled[key] = trial.suggest_int(key, int(p.low), int(p.high))
        return None  # OptunaSearch reads the suggested values from the trial


def define_by_run(sweep: SweepConfig, base: dict[str, Any]) -> Callable[[Any], None]:
    """An Optuna define-by-run function (picklable) for ``OptunaSearch(space=...)``."""
    return DefineByRun(sweep, base)


def grid_points(sweep: SweepConfig, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Full cross product of the named factors, respecting ``when`` conditions."""
    points: list[dict[str, Any]] = [{}]
    for key, p in sweep.params.items():
        nxt: list[dict[str, Any]] = []
        for point in points:
            if _condition_holds(p, point, base):
                nxt.extend({**point, key: v} for v in p.values or [])
            else:
                nxt.append(point)
        points = nxt
    unique: list[dict[str, Any]] = []
    for point in points:
        if point not in unique:
            unique.append(point)
    return unique


def with_seeds(points: list[dict[str, Any]], n_seeds: int, base_seed: int) -> list[dict[str, Any]]:
    """Repeat each point over ``n_seeds`` seeds (``train.seed`` = base_seed + i)."""
    return [{**p, SEED_KEY: base_seed + i} for p in points for i in range(n_seeds)]


def config_id(params: dict[str, Any]) -> str:
    """A stable, human-readable id of a configuration without its seed."""
    items = sorted((k, v) for k, v in params.items() if k != SEED_KEY)
    return ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in items) or "base"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def validate_space(cfg: StudyConfig, source: str = "<config>") -> None:
    """Fail before Ray starts on unknown keys, bad conditions and invalid values."""
    sweep = cfg.sweep
    if sweep is None:
        return
    base = cfg.model_dump()
    problems: list[str] = []
    declared: list[str] = []
    for key, p in sweep.params.items():
        try:
            get_path(base, key)
        except KeyError:
            problems.append(f"sweep.params.{key}: not a config key (see experiments/base.yaml)")
            continue
        for cond in p.when or {}:
            if cond not in declared:
                try:
                    get_path(base, cond)
                except KeyError:
                    problems.append(f"sweep.params.{key}.when: unknown key {cond!r}")
                    continue
                if cond in sweep.params:
                    problems.append(
                        f"sweep.params.{key}.when: {cond!r} must be declared before {key!r}"
                    )
        declared.append(key)
    if problems:
        raise ConfigError(f"{source}: invalid search space\n  - " + "\n  - ".join(problems))
    _validate_values(cfg, base, source)


def _validate_values(cfg: StudyConfig, base: dict[str, Any], source: str) -> None:
    """Every choice value, and both ends of every range, must give a valid config."""
    assert cfg.sweep is not None
    for key, p in cfg.sweep.params.items():
        if p.type == "choice":
            candidates = list(p.values or [])
        elif p.type == "int":
            candidates = [int(p.low), int(p.high)]  # type: ignore[arg-type]
        else:
            candidates = [p.low, p.high]
        for value in candidates:
            trial = set_path(base, key, value)
            try:
                validate_config(trial, source=f"{source} (sweep.params.{key}={value!r})")
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None
    if cfg.sweep.searcher == "grid":
        n = len(grid_points(cfg.sweep, base))
        if n == 0:
            raise ConfigError(f"{source}: the grid is empty")


def count_trials(cfg: StudyConfig) -> int:
    """How many trials the search phase will run (before any seed repeats)."""
    if cfg.sweep is None:
        return 1
    if cfg.sweep.searcher == "grid":
        return len(grid_points(cfg.sweep, cfg.model_dump())) * cfg.sweep.seeds
    return cfg.sweep.num_samples


def enumerate_sections(
    sweep: SweepConfig | None, base: dict[str, Any], section: str
) -> list[dict[str, Any]] | None:
    """All distinct values of config ``section`` the sweep can produce, or None if infinite.

    Used to precompute preprocessing variants and frozen features once per study.
    """
    if sweep is None:
        return [get_path(base, section)]
    relevant = {k: p for k, p in sweep.params.items() if k.startswith(section + ".")}
    if any(p.type != "choice" for p in relevant.values()):
        return None
    conditions = {c for p in relevant.values() for c in (p.when or {})}
    extra = {k: p for k, p in sweep.params.items() if k in conditions and k not in relevant}
    sub = SweepConfig(searcher="grid", scheduler="none", params={**extra, **relevant})
    sections: list[dict[str, Any]] = []
    for point in grid_points(sub, base):
        value = get_path(apply_params(base, point), section)
        if value not in sections:
            sections.append(value)
    return sections


__all__ = [
    "SEED_KEY",
    "apply_params",
    "config_id",
    "count_trials",
    "define_by_run",
    "enumerate_sections",
    "grid_points",
    "validate_space",
    "with_seeds",
]
