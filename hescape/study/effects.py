"""Factor effects with confidence intervals: is a difference between sweep levels real?

For one sweep factor, one metric and one level against the reference level, the effect is
the difference of the metric's value on the held-out donors, with a percentile bootstrap
95% CI. Every trial is evaluated on the same held-out donors, so donors are always
resampled jointly (one draw per replicate, shared by all trials). The trials are resampled
too, in one of two designs:

- paired: when trials at the two levels can be matched on everything but the factor (the
  other sweep parameters and the seed: a grid, or the same config re-run over seeds), the
  per-block differences are resampled together, so effects shared by a block (the seed's
  initialisation, the other factors) cancel;
- unpaired: otherwise (TPE/random: the levels also differ in factors TPE chose), each
  level's configurations are resampled independently, and each configuration's seeds
  within it; the difference is then a marginal comparison, not a controlled one.

The percentile interval is widened for small samples (``expansion``: Hesterberg's expanded
percentile correction, with n the smallest resampled count: donors, blocks or
configurations); its calibration on pure noise is in docs/measurements.md.

A trial's value on a donor sample is the mean of its per-donor values, weighted by the
donor's ``n`` (spots) for retrieval recalls, so that it equals the whole-set figure, and
unweighted for Pearson figures, which the probes report as a plain mean over donors.
Fewer held-out donors than ``min_donors`` give no CI, said so in ``verdict``.
Only numpy and pandas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import pandas as pd

from hescape.study.space import SEED_KEY

BASE = "(base)"  # level of trials where a conditional factor is absent
MAX_LEVELS = 4  # a numeric factor with more distinct values is shown in quantile bins
NOT_DISTINGUISHABLE = "not distinguishable"
PER_DONOR_COLUMNS = ("metric", "donor", "value", "n")


@dataclass(frozen=True)
class BootstrapSettings:
    """Replicates, CI level, the fewest held-out donors a CI needs, RNG seed, pairing."""

    n_boot: int = 2000
    level: float = 0.95
    min_donors: int = 3
    seed: int = 0
    pairing: Literal["auto", "none"] = "auto"

    def __post_init__(self) -> None:
        if self.min_donors < 2:
            raise ValueError(f"min_donors must be >= 2 (an interval needs a spread), got "
                             f"{self.min_donors}")


@dataclass(frozen=True)
class Trial:
    """A finished trial as the statistics see it."""

    key: str  # trial id (row of the value matrix)
    config: str  # configuration without its seed
    block: str  # configuration without the factor under study (and linked params), with seed


@dataclass(frozen=True)
class Effect:
    delta: float
    low: float
    high: float
    n_donors: int
    design: str
    verdict: str


# --------------------------------------------------------------------------- levels
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def level_labeler(values: Sequence[Any]) -> Callable[[Any], str | None]:
    """A function labelling a factor value: itself, or its quantile bin when the factor is
    numeric with more than ``MAX_LEVELS`` distinct values; None for a value outside the bins."""
    numeric = [v for v in values if _is_number(v)]
    if len(set(numeric)) <= MAX_LEVELS or len(numeric) != sum(v is not None for v in values):
        return lambda v: BASE if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    edges = np.quantile(numeric, np.linspace(0, 1, MAX_LEVELS))

    def label(v: Any) -> str | None:
        if v is None:
            return BASE
        if not _is_number(v) or not edges[0] <= v <= edges[-1]:
            return None
        i = min(int(np.searchsorted(edges, v, side="right")) - 1, len(edges) - 2)
        close = "]" if i == len(edges) - 2 else ")"  # half-open bins, the last one closed
        return f"[{edges[i]:.3g}, {edges[i + 1]:.3g}{close}"

    return label


def level_labels(values: Sequence[Any]) -> list[str]:
    """One label per value (see ``level_labeler``)."""
    label = level_labeler(values)
    return [str(label(v)) for v in values]


def level_order(values: Sequence[Any], labels: Sequence[str]) -> Callable[[str], tuple]:
    """Sort key: (base) first, then levels by their smallest value (numbers numerically)."""
    first: dict[str, Any] = {}
    for v, level in zip(values, labels):
        first.setdefault(level, v)  # bins are disjoint: any member orders its bin

    def key(level: str) -> tuple:
        v = first.get(level)
        if v is None:
            return (0, 0.0, "")
        if _is_number(v):
            return (1, float(v), "")
        return (2, 0.0, str(v))

    return key


# --------------------------------------------------------------------------- per-donor values
def check_per_donor(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The per-donor table with typed columns; ValueError naming ``source`` if malformed."""
    missing = [c for c in PER_DONOR_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: per-donor table lacks columns {missing}; expected "
                         f"{list(PER_DONOR_COLUMNS)} (one row per metric and held-out donor)")
    out = frame.loc[:, list(PER_DONOR_COLUMNS)].copy()
    out["metric"] = out["metric"].astype(str).str.replace(r"^(test|val)/", "", regex=True)
    out["donor"] = out["donor"].astype(str)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    out["n"] = pd.to_numeric(out["n"], errors="coerce")
    return out


def donor_weighted(metric: str) -> bool:
    """Weight donors by their ``n``? Yes for recalls (whole-set figure), no for Pearson."""
    return "pearson" not in metric


def donor_matrix(
    tables: Mapping[str, pd.DataFrame], metric: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values, weights): trials x donors for ``metric``; NaN values / 0 weights where absent."""
    parts = []
    for key, table in tables.items():
        sub = table[table["metric"] == metric]
        if len(sub):
            parts.append(sub.assign(trial=key))
    if not parts:
        return pd.DataFrame(), pd.DataFrame()
    long = pd.concat(parts, ignore_index=True)
    values = long.pivot_table(index="trial", columns="donor", values="value", aggfunc="mean")
    if donor_weighted(metric):
        weights = long.pivot_table(index="trial", columns="donor", values="n", aggfunc="sum")
    else:
        weights = values.notna().astype(float)
    weights = weights.reindex_like(values).fillna(0.0).where(values.notna(), 0.0)
    return values, weights


# --------------------------------------------------------------------------- bootstrap
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile: exact for 1 and 2 degrees of freedom, Cornish-Fisher expansion
    above (error < 0.01 at p = 0.975 for df >= 3)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def expansion(n: int, level: float) -> float:
    """Widening of a percentile bootstrap interval resting on ``n`` resampled units:
    ``sqrt(n / (n - 1)) * t_{n-1} / z`` (the small-sample correction of Hesterberg's
    expanded percentile interval; calibration in docs/measurements.md)."""
    if n < 2:
        raise ValueError(f"a bootstrap interval needs >= 2 resampled units, got {n}")
    p = 1 - (1 - level) / 2
    return math.sqrt(n / (n - 1)) * t_quantile(p, n - 1) / NormalDist().inv_cdf(p)


def _resampled_sizes(level: Sequence[Trial], ref: Sequence[Trial], paired: bool) -> list[int]:
    """How many units each resampled dimension other than donors draws from (> 1 only)."""
    if paired:
        sizes = [len(_matched_blocks(level, ref))]
    else:
        sizes = [len(_groups(side, "config")) for side in (level, ref)]
        sizes += [len(ix) for ix in _groups([*level, *ref], "config").values()]
    return [n for n in sizes if n > 1]


def _trial_stats(values: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Replicates x trials: weighted donor means under donor-resampling ``counts`` (B x D)."""
    return (counts @ (weights * values).T) / (counts @ weights.T)


def _resample_mean(stats: np.ndarray, rng: np.random.Generator, draw: bool) -> np.ndarray:
    """Mean over columns of ``stats`` (B x k), the columns resampled per replicate if ``draw``."""
    if not draw or stats.shape[1] == 1:
        return stats.mean(axis=1)
    idx = rng.integers(0, stats.shape[1], size=stats.shape)
    return np.take_along_axis(stats, idx, axis=1).mean(axis=1)


def _groups(trials: Sequence[Trial], attr: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, t in enumerate(trials):
        out.setdefault(getattr(t, attr), []).append(i)
    return out


def _level_value(stats: np.ndarray, cols: list[int], trials: Sequence[Trial], rng, draw: bool):
    """Unpaired: configurations resampled within the level, seeds within each configuration."""
    per_config = [_resample_mean(stats[:, [cols[i] for i in idx]], rng, draw)
                  for idx in _groups(trials, "config").values()]
    return _resample_mean(np.stack(per_config, axis=1), rng, draw)


def _matched_blocks(level: Sequence[Trial], ref: Sequence[Trial]) -> list[str]:
    return sorted({t.block for t in level} & {t.block for t in ref})


def _use_pairing(level: Sequence[Trial], ref: Sequence[Trial], pairing: str) -> bool:
    """Pair when matched blocks hold at least half of each level's trials."""
    blocks = set(_matched_blocks(level, ref))
    if pairing == "none" or not blocks:
        return False
    return all(2 * sum(t.block in blocks for t in side) >= len(side) for side in (level, ref))


def _difference(level, ref, stats, col, rng, paired: bool, draw: bool) -> np.ndarray:
    if paired:
        diffs = []
        for block in _matched_blocks(level, ref):
            a = [col[t.key] for t in level if t.block == block]
            b = [col[t.key] for t in ref if t.block == block]
            diffs.append(stats[:, a].mean(axis=1) - stats[:, b].mean(axis=1))
        return _resample_mean(np.stack(diffs, axis=1), rng, draw)
    a = _level_value(stats, [col[t.key] for t in level], level, rng, draw)
    b = _level_value(stats, [col[t.key] for t in ref], ref, rng, draw)
    return a - b


def _design(level: Sequence[Trial], ref: Sequence[Trial], paired: bool) -> str:
    """How the comparison was resampled, in a few words (the report explains the terms)."""
    if paired:
        blocks = _matched_blocks(level, ref)
        left = sum(t.block not in blocks for t in (*level, *ref))
        return (f"paired, {len(blocks)} block(s) matched on seed + other factors"
                + (f"; {left} unmatched trial(s) left out" if left else ""))
    n_l, n_r = len(_groups(level, "config")), len(_groups(ref, "config"))
    text = f"unpaired, {n_l} vs {n_r} config(s)"
    if any(len(ix) > 1 for ix in _groups([*level, *ref], "config").values()):
        text += "; seeds resampled"
    single = [name for name, side in (("level", level), ("reference", ref)) if len(side) == 1]
    if single:
        who = "both sides are" if len(single) == 2 else f"{single[0]} is"
        text += f"; {who} 1 trial: seed variation not in the CI"
    return text


def compare(
    level: Sequence[Trial],
    ref: Sequence[Trial],
    values: pd.DataFrame,
    weights: pd.DataFrame,
    settings: BootstrapSettings = BootstrapSettings(),
) -> Effect:
    """Difference ``level - ref`` of the metric in ``values`` (trials x donors) with its CI.

    Only donors with a value for every trial of the comparison are used."""
    keys = [t.key for t in (*level, *ref)]
    v = values.loc[keys].to_numpy(dtype=float)
    w = weights.loc[keys].to_numpy(dtype=float)
    keep = np.isfinite(v).all(axis=0) & (w > 0).all(axis=0)
    v, w = v[:, keep], w[:, keep]
    col = {k: i for i, k in enumerate(keys)}
    paired = _use_pairing(level, ref, settings.pairing)
    design = _design(level, ref, paired)
    n_donors = int(keep.sum())
    if n_donors == 0:
        return Effect(np.nan, np.nan, np.nan, 0, design, "no donor with a value in every trial")
    rng = np.random.default_rng(settings.seed)
    point = _difference(level, ref, _trial_stats(v, w, np.ones((1, n_donors))), col, rng,
                        paired, draw=False)[0]
    if n_donors < settings.min_donors:
        return Effect(point, np.nan, np.nan, n_donors, design,
                      f"no CI: {n_donors} held-out donor(s) (< {settings.min_donors})")
    counts = rng.multinomial(n_donors, np.full(n_donors, 1.0 / n_donors), size=settings.n_boot)
    boot = _difference(level, ref, _trial_stats(v, w, counts), col, rng, paired, draw=True)
    tail = 100 * (1 - settings.level) / 2
    q = np.percentile(boot, [tail, 100 - tail])
    widen = expansion(min([n_donors, *_resampled_sizes(level, ref, paired)]), settings.level)
    low, high = point + widen * (q - point)
    verdict = (NOT_DISTINGUISHABLE if low <= 0 <= high
               else "higher than reference" if low > 0 else "lower than reference")
    return Effect(float(point), float(low), float(high), n_donors, design, verdict)


# --------------------------------------------------------------------------- factors
def _identity(params: Mapping[str, Any], drop: set[str]) -> str:
    return repr(sorted((k, repr(v)) for k, v in params.items() if k not in drop))


def factor_trials(rows: Sequence[dict[str, Any]], factor: str, linked: set[str]) -> list[Trial]:
    """Trials of ``rows`` (trial_table rows) with their configuration and block identities."""
    return [Trial(key=r["trial_id"], config=_identity(r["sweep_params"], {SEED_KEY}),
                  block=_identity(r["sweep_params"], {factor, SEED_KEY, *linked})
                  + f"|seed={r.get('seed', '')}") for r in rows]


def reference_level(values: Sequence[Any], base_value: Any, *, has_base: bool = True) -> str:
    """The level of the base config's value when trials hold it, else the first level."""
    label = level_labeler(values)
    labels = [str(label(v)) for v in values]
    ref = label(base_value) if has_base else None
    if ref in labels:
        return str(ref)
    return sorted(set(labels), key=level_order(values, labels))[0]


def factor_effects(
    rows: Sequence[dict[str, Any]],
    per_donor: Mapping[str, pd.DataFrame],
    *,
    metrics: Sequence[str],
    base: Mapping[str, Any] | None = None,
    linked: Mapping[str, set[str]] | None = None,
    settings: BootstrapSettings = BootstrapSettings(),
) -> pd.DataFrame:
    """Every sweep factor's levels against its reference level, per metric, with CIs.

    ``rows``: finished trial_table rows of ONE protocol (never mix saw_heldout strata);
    ``per_donor``: trial id -> checked per-donor table; ``base``: factor -> the base config's
    value (None: the factor is absent from the base config, i.e. the ``(base)`` level);
    ``linked``: factor -> sweep params conditional on it or it on them (left out of the
    matching). Columns: factor, level, reference, metric, delta, ci_low, ci_high,
    n_donors, trials, design, verdict.
    """
    base, linked = dict(base or {}), dict(linked or {})
    rows = [r for r in rows if r["trial_id"] in per_donor]
    factors = sorted({k for r in rows for k in r["sweep_params"] if k != SEED_KEY})
    matrices = {m: donor_matrix({r["trial_id"]: per_donor[r["trial_id"]] for r in rows}, m)
                for m in metrics}
    recs = []
    for factor in factors:
        values = [r["sweep_params"].get(factor) for r in rows]
        labels = level_labels(values)
        if len(set(labels)) < 2:
            continue
        ref = reference_level(values, base.get(factor), has_base=factor in base)
        trials = factor_trials(rows, factor, linked.get(factor, set()))
        order = sorted(set(labels) - {ref}, key=level_order(values, labels))
        for metric in metrics:
            vals, wts = matrices[metric]
            with_data = [t for t in trials if t.key in vals.index]
            by_level = {lv: [t for t, lab in zip(trials, labels) if lab == lv and t in with_data]
                        for lv in [ref, *order]}
            for lv in order:
                if not by_level[lv] or not by_level[ref]:
                    continue
                eff = compare(by_level[lv], by_level[ref], vals, wts, settings)
                recs.append({"factor": factor, "level": lv, "reference": ref, "metric": metric,
                             "delta": eff.delta, "ci_low": eff.low, "ci_high": eff.high,
                             "n_donors": eff.n_donors,
                             "trials": f"{len(by_level[lv])} vs {len(by_level[ref])}",
                             "design": eff.design, "verdict": eff.verdict})
    return pd.DataFrame(recs, columns=EFFECT_COLUMNS)


EFFECT_COLUMNS = ["factor", "level", "reference", "metric", "delta", "ci_low", "ci_high",
                  "n_donors", "trials", "design", "verdict"]
