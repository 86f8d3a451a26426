"""Search space: YAML ``sweep.params`` -> Optuna define-by-run space, grid points, validation.

A parameter is addressed by the dotted path of the config key it sets
(``loss.init_temperature``). ``when: {other.path: [values]}`` makes it conditional: it is
sampled only when the other key (an earlier sweep parameter, or the base config) has one of
the listed values; otherwise the base value stays. Conditions may only refer to parameters
declared earlier, so define-by-run sampling is a single ordered pass.

Validation also checks what the registries declare: a gene encoder must accept the output
kind of the preprocessing method it is paired with (a grid skips incompatible points with
a note; a TPE/random space that can sample one is refused: add a ``when`` condition), and a
search that mixes inductive and transductive preprocessing gets a warning (its trials do
not share one held-out protocol).
"""

from __future__ import annotations

import warnings
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
FOLD_KEY = "data.fold"  # a donor fold: like the seed, a replicate of one configuration
PAIR_PREFIXES = ("preprocess.expression.", "model.gene.")


class SpaceWarning(UserWarning):
    """A search space that runs, but whose comparison needs a caveat."""


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


def grid_points(sweep: SweepConfig, base: dict[str, Any], *,
                skip_incompatible: bool = True) -> list[dict[str, Any]]:
    """Full cross product of the named factors, respecting ``when`` conditions.

    Points whose gene encoder cannot take their preprocessing output are left out
    (``validate_space`` notes them) unless ``skip_incompatible`` is False.
    """
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
    if skip_incompatible:
        unique = [p for p in unique if pair_problem(apply_params(base, p)) is None]
    return unique


def pair_problem(config: dict[str, Any]) -> str | None:
    """Why a config's gene encoder cannot take its preprocessing output (None if it can)."""
    from hescape.config import GeneEncoderConfig
    from hescape.models import gene_input_problem

    gene = GeneEncoderConfig.model_validate(get_path(config, "model.gene"))
    return gene_input_problem(gene, get_path(config, "preprocess.expression"))


def _choice_points(sweep: SweepConfig, base: dict[str, Any],
                   prefixes: tuple[str, ...]) -> list[dict[str, Any]]:
    """All combinations of the choice params under ``prefixes`` (and the choice params
    their conditions name); other params keep their base value."""
    relevant = {k for k, p in sweep.params.items() if k.startswith(prefixes)}
    conds = {c for k in relevant for c in (sweep.params[k].when or {})}
    params = {k: p for k, p in sweep.params.items()
              if (k in relevant or k in conds) and p.type == "choice"}
    sub = SweepConfig(searcher="grid", scheduler="none", params=params)
    return grid_points(sub, base, skip_incompatible=False)


def with_seeds(points: list[dict[str, Any]], n_seeds: int, base_seed: int) -> list[dict[str, Any]]:
    """Repeat each point over ``n_seeds`` seeds (``train.seed`` = base_seed + i)."""
    return [{**p, SEED_KEY: base_seed + i} for p in points for i in range(n_seeds)]


def with_folds(points: list[dict[str, Any]], k: int | None) -> list[dict[str, Any]]:
    """Repeat each point on donor folds 0..k-1 (``data.fold``); unchanged when k is None."""
    if not k:
        return points
    return [{**p, FOLD_KEY: f} for p in points for f in range(k)]


def config_id(params: dict[str, Any]) -> str:
    """A stable, human-readable id of a configuration without its seed and donor fold."""
    items = sorted((k, v) for k, v in params.items() if k not in (SEED_KEY, FOLD_KEY))
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
            problems.append(f"sweep.params.{key}: not a config key (see experiments/base.yaml)"
                            + _moved_hint(key))
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
    _check_pairs(cfg.sweep, base, source)
    _check_protocols(cfg.sweep, base, source)


def _moved_hint(key: str) -> str:
    from hescape.preprocess.spec import moved_key_message

    prefix = "preprocess.expression."
    msg = moved_key_message(key[len(prefix):]) if key.startswith(prefix) else None
    return f"; {msg}" if msg else ""


def _check_pairs(sweep: SweepConfig, base: dict[str, Any], source: str) -> None:
    """Grid: note the skipped encoder/preprocessing pairs. TPE/random: refuse a space that
    can sample one (Optuna cannot exclude a combination; a ``when`` condition can)."""
    if sweep.searcher == "grid":
        points = grid_points(sweep, base, skip_incompatible=False)
    else:
        points = _choice_points(sweep, base, PAIR_PREFIXES)
    bad = [(p, msg) for p in points if (msg := pair_problem(apply_params(base, p)))]
    if not bad:
        return
    pairs = sorted({f"{_pair_name(apply_params(base, p))}" for p, _ in bad})
    if sweep.searcher == "grid" and len(bad) == len(points):
        raise ConfigError(f"{source}: invalid search space\n  - every grid point pairs a gene "
                          f"encoder with a preprocessing output it cannot take ({', '.join(pairs)})"
                          f": {bad[0][1]}")
    if sweep.searcher != "grid":
        raise ConfigError(
            f"{source}: invalid search space\n  - the {sweep.searcher} search can sample gene "
            f"encoder x preprocessing pairs that cannot run ({', '.join(pairs)}): "
            f"{bad[0][1]}. Add a condition, e.g. model.gene.name: {{..., when: "
            "{preprocess.expression.method: [<methods it takes>]}}, or use searcher: grid "
            "(which skips them)")
    warnings.warn(f"{source}: the grid skips {len(bad)} point(s) whose gene encoder cannot "
                  f"take the preprocessing output ({', '.join(pairs)}); they are not trained. "
                  f"{bad[0][1]}", SpaceWarning, stacklevel=3)


def _pair_name(config: dict[str, Any]) -> str:
    return (f"{get_path(config, 'model.gene.name')} x "
            f"{get_path(config, 'preprocess.expression.method')}")


def protocols_of(sweep: SweepConfig | None, base: dict[str, Any]) -> dict[str, list[str]]:
    """Held-out protocol -> the preprocessing methods the search reaches with it."""
    from hescape.preprocess.spec import section_facts

    points = [{}] if sweep is None else _choice_points(sweep, base, ("preprocess.expression.",))
    out: dict[str, list[str]] = {}
    for point in points:
        section = get_path(apply_params(base, point), "preprocess.expression")
        methods = out.setdefault(section_facts(section)[1], [])
        if section["method"] not in methods:
            methods.append(section["method"])
    return out


def _check_protocols(sweep: SweepConfig, base: dict[str, Any], source: str) -> None:
    """Warn when one search compares inductive with transductive preprocessing."""
    found = protocols_of(sweep, base)
    if len(found) > 1:
        warnings.warn(
            f"{source}: this search mixes held-out protocols: inductive for "
            f"{', '.join(found['inductive'])} (the correction never saw val/test donors) and "
            f"transductive for {', '.join(found['transductive'])} (fitted on them too). "
            "Their val/test metrics are not like for like; set every method's mode to "
            "inductive, or read the report's tables split by saw_heldout.",
            SpaceWarning, stacklevel=3)


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
        n = len(grid_points(cfg.sweep, base, skip_incompatible=False))
        if n == 0:
            raise ConfigError(f"{source}: the grid is empty")


def count_trials(cfg: StudyConfig) -> int:
    """How many trials the search phase will run (before any seed repeats)."""
    if cfg.sweep is None:
        return 1
    if cfg.sweep.searcher == "grid":  # a grid runs every point on each donor fold
        return (len(grid_points(cfg.sweep, cfg.model_dump())) * cfg.sweep.seeds
                * (cfg.eval.donor_folds or 1))
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
    sections: list[dict[str, Any]] = []
    for point in _choice_points(sweep, base, (section + ".",)):
        value = get_path(apply_params(base, point), section)
        if value not in sections:
            sections.append(value)
    return sections


__all__ = [
    "FOLD_KEY",
    "SEED_KEY",
    "SpaceWarning",
    "apply_params",
    "config_id",
    "count_trials",
    "define_by_run",
    "enumerate_sections",
    "grid_points",
    "pair_problem",
    "protocols_of",
    "validate_space",
    "with_folds",
    "with_seeds",
]
