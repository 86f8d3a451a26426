"""Factor effects with confidence intervals: is a difference between sweep levels real?

For one sweep factor, one metric and one level against the reference level, the effect is
the difference of the metric on the held-out donors. Its 95% interval carries both sources
of variation a claim about the factor spans: the held-out **donors** (another set of donors
would give another figure) and the **training runs** (another seed, and for a marginal
comparison another configuration, would too). Where the runs' variation is not measured (a
level with one trial, or fewer than ``min_replicate_df`` degrees of freedom for it) there
is no verdict: ``needs replicates``, with what to run in ``needs``.

Model (a two-way random-effects ANOVA, the subjects x items design of psychometrics with
donors as subjects and training runs as items): a replicate ``t`` of level ``l`` has on donor
``d`` the value ``mu_l + a_d + b_ld + s_t + e_td`` (``a_d``: the donor's difficulty, the same at
every level, so it cancels; ``b_ld``: donor x level interaction, the effect differing between
donors; ``s_t``: the run's shift, seed and configuration; ``e_td``: residual). With donor
weights ``w`` (sum 1), ``W2 = sum w^2``, ``c = sum_g 1/n_g`` over the replicate groups, the
difference has variance ``W2 var(b) + c var(s) + W2 c var(e)``, estimated from three spreads:
the per-donor differences over donors (``VD``: ``var(b) + c var(e)``), the replicates'
donor-means within each group, pooled over groups (``S2``: ``var(s) + W2 var(e)``) and the
replicate x donor residual (``E``: ``var(e)``):  ``V = W2 VD + c S2 - W2 c E``.

The interval is ``delta +- q sqrt(V)``. With a handful of seeds the Welch-Satterthwaite
t quantile for ``q`` is off (a negative term and tiny degrees of freedom: 0.1-1% false
claims at 3 donors, and ~9% at 20 donors with 2 matched blocks, where the seed spread
dominates and, underestimated by chance, drags the degrees of freedom up), so ``q`` is the
95% quantile of ``|delta* - mu| / sqrt(V*)`` under the same model with the estimated
variance components: a parametric bootstrap-t, ``draws`` Monte-Carlo draws of the
(independent, chi-square) spreads. The least-known component, the one with fewer degrees
of freedom (the replicate spread; with few donors the donor spread), enters at its
one-sided upper confidence bound (``replicate_bound`` 82.5%, ``donor_bound`` 70%): plugging
in a component that happens to be underestimated is what makes such intervals too narrow
exactly when they matter. The two bounds were chosen by simulation
(``python -m benchmarks.effects_calibration``; table in docs/measurements.md): false-claim
rate 3.3-6.9% in every cell with seed noise (3-20 donors, 2-5 seeds, paired and controlled,
weighted and not), 2.0-5.8% without seed noise.

Designs, per comparison (``design`` says which and what the interval spans):

- paired: a grid's trials matched on everything but the factor (the other factors and the
  seed): the per-donor differences of each matched block are the replicates (one group), so
  the other factors' effects cancel; the spread over blocks carries seed variation (each
  block's two trials are separate runs) and the factor's interaction with the others;
- controlled: every trial shares the other factors (a one-factor sweep over seeds, the
  confirm phase): the level's seeds and the reference's seeds are two groups of replicates;
- marginal: the levels also differ in factors TPE/random chose: the replicates are the
  level's configurations (their seeds averaged): the interval spans donors, seeds and the
  configurations searched; a comparison of what was run, not a controlled one.

A trial's value is the weighted mean of its per-donor values, weighted by each donor's
``n`` (spots) for retrieval recalls, so that it equals the whole-set figure, and unweighted
for Pearson figures, which the probes report as a plain mean over donors. Fewer held-out
donors than ``min_donors`` give no CI. Rows may carry ``design`` ("controlled" or
"marginal": the phase that ran them); rows of different designs are never pooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from hescape.study.space import FOLD_KEY, SEED_KEY

BASE = "(base)"  # level of trials where a conditional factor is absent
MAX_LEVELS = 4  # a numeric factor with more distinct values is shown in quantile bins
NOT_DISTINGUISHABLE = "not distinguishable"
NEEDS_REPLICATES = "needs replicates"
REPLICATE_KEYS = (SEED_KEY, FOLD_KEY)


@dataclass(frozen=True)
class EffectSettings:
    """Interval level, what a verdict needs, the calibration of the quantile, planning."""

    level: float = 0.95
    min_donors: int = 3  # held-out donors an interval needs
    min_replicate_df: int = 2  # degrees of freedom of the replicate spread a verdict needs
    replicate_bound: float = 0.825  # one-sided upper confidence bound of the replicate spread
    donor_bound: float = 0.7  # ... of the donor spread (where it has fewer df)
    draws: int = 4000  # Monte-Carlo draws of the calibrating distribution
    seed: int = 0
    pairing: Literal["auto", "none"] = "auto"
    power: float = 0.8  # ``needs``: seeds/donors giving this power at the target effect
    max_seeds: int = 20  # ``needs``: the most seeds per level it proposes
    max_donors: int = 200  # ``needs``: the most held-out donors it proposes

    def __post_init__(self) -> None:
        if self.min_donors < 2:
            raise ValueError(f"min_donors must be >= 2 (an interval needs a spread), got "
                             f"{self.min_donors}")
        if self.min_replicate_df < 1:
            raise ValueError(f"min_replicate_df must be >= 1 (seed variation must be "
                             f"measured), got {self.min_replicate_df}")
        for name in ("replicate_bound", "donor_bound"):
            if not 0.5 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0.5, 1), got {getattr(self, name)}")


BootstrapSettings = EffectSettings  # the former name (the interval is no longer a bootstrap)


@dataclass(frozen=True)
class Trial:
    """A finished trial as the statistics see it."""

    key: str  # trial id (row of the value matrix)
    config: str  # configuration without its seed
    block: str  # configuration without the factor under study (and linked params), with seed
    others: str = ""  # the block without its seed (default: derived from ``block``)
    seed: str = ""  # (default: derived from ``block``)

    def __post_init__(self) -> None:
        others, _, seed = self.block.partition("|seed=")
        if not self.others:
            object.__setattr__(self, "others", others)
        if not self.seed:
            object.__setattr__(self, "seed", seed)


@dataclass(frozen=True)
class Components:
    """Estimated variance components of one comparison (what ``needs`` plans from)."""

    donor: float  # var(b): the effect's spread over donors (donor x level)
    replicate: float  # var(s): a run's shift (seed, configuration), residual removed
    residual: float  # var(e): replicate x donor
    w2: float  # sum of squared donor weights (1 / donors when unweighted)
    c: float  # sum over replicate groups of 1 / replicates
    n_donors: int
    seeds: int  # what is scaled when planning: seeds (paired: per configuration) or runs
    units: int  # replicates in all groups
    groups: int  # 1 (paired) or 2
    kind: str = "controlled"  # paired | controlled | marginal


@dataclass(frozen=True)
class Effect:
    delta: float
    low: float
    high: float
    n_donors: int
    design: str
    verdict: str
    comparison: str = ""  # controlled | marginal
    n_seeds: int = 0
    df: float = math.nan  # Welch-Satterthwaite degrees of freedom of the variance estimate
    needs: str = ""
    components: Components | None = None


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


# --------------------------------------------------------------------------- the interval
@dataclass(frozen=True)
class Intervals:
    """Per comparison (leading axis): the difference, the half-width of its interval and
    the estimates it rests on."""

    delta: np.ndarray
    half: np.ndarray
    se: np.ndarray  # sqrt(V)
    df: np.ndarray  # Welch-Satterthwaite degrees of freedom of V (reported, not used)
    donor: np.ndarray  # var(b) estimate (>= 0)
    replicate: np.ndarray  # var(s) estimate (>= 0)
    residual: np.ndarray  # var(e) estimate
    w2: np.ndarray
    c: float
    df_replicate: int


def difference_intervals(
    groups: Sequence[tuple[float, np.ndarray]],
    weights: np.ndarray,
    settings: EffectSettings = EffectSettings(),
    rng: np.random.Generator | None = None,
) -> Intervals:
    """Intervals of ``sum_g sign_g * (weighted donor mean of group g's replicates)``.

    ``groups``: (sign, values) with values shaped (comparisons, replicates, donors), >= 2
    replicates each; ``weights``: (comparisons, donors), positive. Vectorised over the
    leading axis (the calibration simulation runs thousands at once)."""
    n = [int(x.shape[-2]) for _, x in groups]
    if min(n) < 2:
        raise ValueError(f"every group needs >= 2 replicates, got {n}")
    w = np.asarray(weights, dtype=float)
    w = w / w.sum(axis=-1, keepdims=True)
    w2, w3 = (w**2).sum(-1), (w**3).sum(-1)
    if np.any(w2 >= 1):
        raise ValueError("an interval needs >= 2 donors with positive weight")
    means = [x.mean(axis=-2) for _, x in groups]
    per_donor = sum(s * m for (s, _), m in zip(groups, means))
    delta = (w * per_donor).sum(-1)
    vd = (w * (per_donor - delta[:, None]) ** 2).sum(-1) / (1 - w2)
    df_d = (1 - w2) ** 2 / (w2 - 2 * w3 + w2**2)
    ss_t = np.zeros_like(delta)
    ss_e = np.zeros_like(delta)
    for (_, x), m in zip(groups, means):
        u = (x * w[:, None, :]).sum(-1)  # each replicate's donor-mean
        ss_t += ((u - u.mean(-1, keepdims=True)) ** 2).sum(-1)
        resid = x - u[..., None] - m[:, None, :] + (w * m).sum(-1)[:, None, None]
        ss_e += (w[:, None, :] * resid**2).sum((-1, -2))
    df_t = sum(k - 1 for k in n)
    s2, e = ss_t / df_t, ss_e / ((1 - w2) * df_t)
    df_e = df_t * df_d
    c = float(sum(1.0 / k for k in n))
    terms = [(w2 * vd, df_d), (c * s2, np.full_like(delta, df_t)), (-w2 * c * e, df_e)]
    v = np.maximum(sum(a for a, _ in terms), w2 * c * e)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = v**2 / sum(a**2 / d for a, d in terms)
    donor = np.maximum(vd - c * e, 0.0)
    replicate = np.maximum(s2 - w2 * e, 0.0)
    q = _calibrated_quantile(vd, s2, e, w2, c, df_d, df_t, df_e, settings,
                             rng or np.random.default_rng(settings.seed))
    half = np.where(v > 0, q * np.sqrt(v), 0.0)
    return Intervals(delta=delta, half=half, se=np.sqrt(v), df=df, donor=donor,
                     replicate=replicate, residual=e, w2=w2, c=c, df_replicate=df_t)


def _calibrated_quantile(vd, s2, e, w2, c, df_d, df_t, df_e, settings, rng):
    """The ``level`` quantile of |t| under the model, its least-known variance component
    (fewer degrees of freedom: the replicate spread, or the donor spread) at its upper
    confidence bound (module docstring). Chunked: (comparisons x draws) stays small."""
    replicate_first = df_t <= df_d
    s2_hi = s2 * df_t / stats.chi2.ppf(1 - settings.replicate_bound, df_t)
    vd_hi = vd * df_d / stats.chi2.ppf(1 - settings.donor_bound, df_d)
    s2_cal = np.where(replicate_first, s2_hi, s2)
    vd_cal = np.where(replicate_first, vd, vd_hi)
    donor, rep = np.maximum(vd_cal - c * e, 0.0), np.maximum(s2_cal - w2 * e, 0.0)
    th_d, th_t = donor + c * e, rep + w2 * e
    v_true = w2 * donor + c * rep + w2 * c * e
    out = np.empty_like(v_true)
    step = max(1, 2_000_000 // settings.draws)
    for lo in range(0, len(out), step):
        sl = slice(lo, lo + step)
        k, m = len(out[sl]), settings.draws
        u_d = rng.chisquare(np.broadcast_to(df_d[sl, None], (k, m))) / df_d[sl, None]
        u_t = rng.chisquare(df_t, (k, m)) / df_t
        u_e = rng.chisquare(np.broadcast_to(df_e[sl, None], (k, m))) / df_e[sl, None]
        z = rng.standard_normal((k, m))
        ww, ee = w2[sl, None], (c * w2 * e)[sl, None]
        v_star = np.maximum(ww * th_d[sl, None] * u_d + c * th_t[sl, None] * u_t - ee * u_e,
                            ee * u_e)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.abs(z) * np.sqrt(v_true[sl, None] / v_star)
        out[sl] = np.quantile(np.nan_to_num(t, nan=0.0), settings.level, axis=1)
    return out


# --------------------------------------------------------------------------- planning
def plan_variance(comp: Components, seeds: int, donors: int) -> tuple[float, float]:
    """(variance, Welch-Satterthwaite df) of the difference at ``seeds`` per level (the
    replicates scaled with them) and ``donors`` held-out donors (weights as concentrated)."""
    w2 = comp.w2 * comp.n_donors / donors
    scale = seeds / max(comp.seeds, 1)
    c = comp.c / scale
    df_t = max(comp.units * scale - comp.groups, 1.0)
    df_d = max(donors / (comp.w2 * comp.n_donors) - 1, 1.0)
    terms = [(w2 * (comp.donor + c * comp.residual), df_d),
             (c * (comp.replicate + w2 * comp.residual), df_t),
             (-w2 * c * comp.residual, df_t * df_d)]
    v = max(sum(a for a, _ in terms), w2 * c * comp.residual)
    df = v**2 / sum(a**2 / d for a, d in terms) if v > 0 else math.inf
    return v, df


def resolving_design(comp: Components, target: float,
                     settings: EffectSettings = EffectSettings()) -> tuple[int, int] | None:
    """The fewest (seeds per level, held-out donors) at which a difference of ``target``
    would be told from 0 with probability ``power`` (t approximation with the estimated
    components), more seeds tried first; None when beyond ``max_seeds`` x ``max_donors``."""
    if not target or not math.isfinite(target):
        return None
    alpha = 1 - settings.level

    def enough(seeds: int, donors: int) -> bool:
        v, df = plan_variance(comp, seeds, donors)
        df = max(df, 1.0)
        q = stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(settings.power, df)
        return q * math.sqrt(v) <= abs(target)

    start = max(comp.seeds, 2)
    for seeds in range(start, settings.max_seeds + 1):
        if enough(seeds, comp.n_donors):
            return seeds, comp.n_donors
    donors = comp.n_donors
    while donors < settings.max_donors:
        donors = min(settings.max_donors, max(donors + 1, int(donors * 1.25)))
        for seeds in (start, max(start, 3), 5, 10, settings.max_seeds):
            if seeds <= settings.max_seeds and enough(seeds, donors):
                return seeds, donors
    return None


def needs_text(comp: Components, delta: float, settings: EffectSettings = EffectSettings(),
               min_effect: float | None = None) -> str:
    """What would resolve an effect of the observed size (or ``min_effect``), in words."""
    target = abs(min_effect) if min_effect else abs(delta)
    if target < 1e-12:  # equal means (e.g. recalls are counts / N: ties happen)
        return "no difference observed (equal means): nothing to resolve"
    what = f"a difference of {target:.2g}"
    unit = {"paired": "seeds per configuration (sweep.seeds)",
            "marginal": "runs per level"}.get(comp.kind, "seeds per level")
    found = resolving_design(comp, target, settings)
    if found is None:
        return (f"{what} is below what {settings.max_seeds} {unit} and "
                f"{settings.max_donors} held-out donors resolve")
    seeds, donors = found
    text = f"~{seeds} {unit}"
    if donors > comp.n_donors:
        text += (f" and ~{donors} held-out donors (eval.donor_folds tests every donor once; "
                 f"{comp.n_donors} now)")
    text += f" to resolve {what} ({settings.power:.0%} power)"
    if comp.kind == "marginal":
        text += "; a controlled comparison: the confirm phase (sweep.confirm)"
    return text


def replicates_suffice(units: Sequence[int], settings: EffectSettings = EffectSettings()) -> bool:
    """Is run-to-run variation measured well enough for a verdict? Every replicate group
    has >= 2 replicates and their spread >= ``min_replicate_df`` degrees of freedom."""
    return min(units) >= 2 and sum(u - 1 for u in units) >= settings.min_replicate_df


def replicates_text(units: list[int], paired: bool, settings: EffectSettings) -> str:
    """What to run where the replicate spread is missing or too thin for a verdict."""
    if paired:
        return (f"{units[0]} matched blocks give {units[0] - 1} degree(s) of freedom for seed "
                f"variation (a verdict needs {settings.min_replicate_df}): run every "
                "configuration with more seeds (sweep.seeds)")
    return "run each level with >= 3 seeds (sweep.seeds, or the confirm phase: sweep.confirm)"


# --------------------------------------------------------------------------- one comparison
def _groups(trials: Sequence[Trial], attr: str) -> dict[str, list[Trial]]:
    out: dict[str, list[Trial]] = {}
    for t in trials:
        out.setdefault(getattr(t, attr), []).append(t)
    return out


def _matched_blocks(level: Sequence[Trial], ref: Sequence[Trial]) -> list[str]:
    return sorted({t.block for t in level} & {t.block for t in ref})


def _kind(level: Sequence[Trial], ref: Sequence[Trial], pairing: str) -> str:
    """paired (a grid: matched blocks differ in other factors and hold at least half of
    each level's trials), controlled (one setting of the other factors) or marginal."""
    if len({t.others for t in (*level, *ref)}) == 1:
        return "controlled"
    blocks = set(_matched_blocks(level, ref))
    if pairing != "none" and blocks and all(
            2 * sum(t.block in blocks for t in side) >= len(side) for side in (level, ref)):
        return "paired"
    return "marginal"


def _units(level, ref, kind: str) -> list[tuple[float, list[list[str]], list[list[str]]]]:
    """Replicate groups: (sign, per replicate the level keys, per replicate the ref keys)."""
    if kind == "paired":
        blocks = _matched_blocks(level, ref)
        return [(1.0, [[t.key for t in level if t.block == b] for b in blocks],
                 [[t.key for t in ref if t.block == b] for b in blocks])]
    attr = "key" if kind == "controlled" else "config"
    return [(1.0, [[t.key for t in g] for g in _groups(level, attr).values()], []),
            (-1.0, [[t.key for t in g] for g in _groups(ref, attr).values()], [])]


def _design(level, ref, kind: str, units: list[int]) -> str:
    """What was compared and what the interval spans, in a few words."""
    if kind == "paired":
        blocks = _matched_blocks(level, ref)
        left = sum(t.block not in blocks for t in (*level, *ref))
        return (f"paired: {len(blocks)} blocks matched on seed + other factors; spans donors, "
                "seeds, other factors" + (f"; {left} unmatched trial(s) left out" if left else ""))
    if kind == "controlled":
        return f"controlled: {units[0]} vs {units[1]} seeds; spans donors, seeds"
    return f"marginal: {units[0]} vs {units[1]} configs; spans donors, seeds, configs"


def _n_seeds(level: Sequence[Trial], ref: Sequence[Trial]) -> int:
    return min(len({t.seed for t in side}) for side in (level, ref))


def compare(
    level: Sequence[Trial],
    ref: Sequence[Trial],
    values: pd.DataFrame,
    weights: pd.DataFrame,
    settings: EffectSettings = EffectSettings(),
) -> Effect:
    """Difference ``level - ref`` of the metric in ``values`` (trials x donors) with its CI.

    Only donors with a value for every trial of the comparison are used; a donor's weight is
    the mean of its weights over those trials (its spots: the same in every trial)."""
    keys = [t.key for t in (*level, *ref)]
    v = values.loc[keys]
    w = weights.loc[keys]
    keep = (np.isfinite(v.to_numpy(dtype=float)).all(axis=0)
            & (w.to_numpy(dtype=float) > 0).all(axis=0))
    v, w = v.loc[:, keep], w.loc[:, keep]
    kind = _kind(level, ref, settings.pairing)
    groups = _units(level, ref, kind)
    units = [len(g[1]) for g in groups]
    design = _design(level, ref, kind, units)
    n_donors, n_seeds = int(keep.sum()), _n_seeds(level, ref)
    comparison = "marginal" if kind == "marginal" else "controlled"
    base = dict(design=design, comparison=comparison, n_seeds=n_seeds)
    if n_donors == 0:
        return Effect(math.nan, math.nan, math.nan, 0, verdict="no donor with a value in "
                      "every trial", **base)
    arrays = [(sign, np.stack([v.loc[a].mean(axis=0).to_numpy()
                               - (v.loc[b].mean(axis=0).to_numpy() if b else 0.0)
                               for a, b in zip(lv, rf or [[]] * len(lv))])[None])
              for sign, lv, rf in groups]
    wts = w.mean(axis=0).to_numpy()[None]
    wn = wts / wts.sum()
    point = float(sum(s * (x[0].mean(axis=0) * wn[0]).sum() for s, x in arrays))
    if n_donors < settings.min_donors:
        return Effect(point, math.nan, math.nan, n_donors, needs=(
            f"held-out donors: >= {settings.min_donors} (eval.donor_folds tests every donor "
            f"once)"), verdict=f"no CI: {n_donors} held-out donor(s) (< {settings.min_donors})",
            **base)
    if not replicates_suffice(units, settings):
        return Effect(point, math.nan, math.nan, n_donors, verdict=NEEDS_REPLICATES,
                      needs=replicates_text(units, kind == "paired", settings), **base)
    iv = difference_intervals(arrays, wts, settings)
    delta, half = float(iv.delta[0]), float(iv.half[0])
    low, high = delta - half, delta + half
    verdict = (NOT_DISTINGUISHABLE if low <= 0 <= high
               else "higher than reference" if low > 0 else "lower than reference")
    comp = Components(donor=float(iv.donor[0]), replicate=float(iv.replicate[0]),
                      residual=float(iv.residual[0]), w2=float(iv.w2[0]), c=iv.c,
                      n_donors=n_donors, seeds=n_seeds if kind == "paired" else min(units),
                      units=sum(units), groups=len(units), kind=kind)
    needs = needs_text(comp, delta, settings) if verdict == NOT_DISTINGUISHABLE else ""
    return Effect(delta, low, high, n_donors, verdict=verdict, df=float(iv.df[0]),
                  needs=needs, components=comp, **base)


# --------------------------------------------------------------------------- factors
def _identity(params: Mapping[str, Any], drop: set[str]) -> str:
    return repr(sorted((k, repr(v)) for k, v in params.items() if k not in drop))


def _seed_of(row: Mapping[str, Any]) -> str:
    return str(row.get("seed", row["sweep_params"].get(SEED_KEY, "")))


def factor_trials(rows: Sequence[dict[str, Any]], factor: str, linked: set[str]) -> list[Trial]:
    """Trials of ``rows`` (trial_table rows) with their configuration and block identities."""
    drop = {factor, *linked, *REPLICATE_KEYS}
    return [Trial(key=r["trial_id"], config=_identity(r["sweep_params"], set(REPLICATE_KEYS)),
                  block=_identity(r["sweep_params"], drop) + f"|seed={_seed_of(r)}",
                  others=_identity(r["sweep_params"], drop), seed=_seed_of(r)) for r in rows]


def reference_level(values: Sequence[Any], base_value: Any, *, has_base: bool = True) -> str:
    """The level of the base config's value when trials hold it, else the first level."""
    label = level_labeler(values)
    labels = [str(label(v)) for v in values]
    ref = label(base_value) if has_base else None
    if ref in labels:
        return str(ref)
    return sorted(set(labels), key=level_order(values, labels))[0]


def _sub_experiment(trials: list[Trial], labels: list[str]) -> list[bool]:
    """Controlled rows: keep the trials whose other-factor setting was run at >= 2 levels
    (the confirm phase's other factors' sub-experiments are not this factor's)."""
    levels: dict[str, set[str]] = {}
    for t, lab in zip(trials, labels):
        levels.setdefault(t.others, set()).add(lab)
    return [len(levels[t.others]) >= 2 for t in trials]


def design_of(row: Mapping[str, Any]) -> str | None:
    """A row's design label: its ``design``, else "controlled" for the confirm phase."""
    if row.get("design"):
        return str(row["design"])
    return "controlled" if row.get("phase") == "confirm" else None


def factor_effects(
    rows: Sequence[dict[str, Any]],
    per_donor: Mapping[str, pd.DataFrame],
    *,
    metrics: Sequence[str],
    base: Mapping[str, Any] | None = None,
    linked: Mapping[str, set[str]] | None = None,
    settings: EffectSettings = EffectSettings(),
    members: Mapping[str, Collection[str]] | None = None,
) -> pd.DataFrame:
    """Every sweep factor's levels against its reference level, per metric, with CIs.

    ``rows``: finished trial_table rows of ONE protocol (never mix saw_heldout strata); a row
    may carry ``design`` ("controlled": replicates of a controlled experiment such as the
    confirm phase, the default for ``phase == "confirm"``; "marginal": a search), and
    designs are analysed apart (``design_of``); ``per_donor``:
    trial id -> checked per-donor table; ``base``: factor -> the base config's value (None:
    the factor is absent from the base config, i.e. the ``(base)`` level); ``linked``:
    factor -> sweep params conditional on it or it on them (left out of the matching);
    ``members``: factor -> the trial ids of its sub-experiment (others are left out); with
    ``members``, a controlled design's factors not in it are not analysed.
    Columns: ``EFFECT_COLUMNS``.
    """
    rows = [r for r in rows if r["trial_id"] in per_donor]
    by_design: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        by_design.setdefault(design_of(r), []).append(r)
    frames = [_factor_effects(group, per_donor, metrics, dict(base or {}), dict(linked or {}),
                              settings, members, label)
              for label, group in sorted(by_design.items(), key=lambda kv: str(kv[0]))]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    return pd.concat(frames, ignore_index=True)[EFFECT_COLUMNS]


def _factor_effects(rows, per_donor, metrics, base, linked, settings, members,
                    label: str | None) -> pd.DataFrame:
    factors = sorted({k for r in rows for k in r["sweep_params"] if k not in REPLICATE_KEYS})
    matrices = {m: donor_matrix({r["trial_id"]: per_donor[r["trial_id"]] for r in rows}, m)
                for m in metrics}
    recs = []
    for factor in factors:
        if members is not None and label == "controlled" and factor not in members:
            continue  # the plan did not confirm it (e.g. a condition off in the best config)
        sub = [r for r in rows if members is None or factor not in members
               or r["trial_id"] in members[factor]]
        trials = factor_trials(sub, factor, linked.get(factor, set()))
        labels = level_labels([r["sweep_params"].get(factor) for r in sub])
        if label == "controlled":
            keep = _sub_experiment(trials, labels)
            sub = [r for r, k in zip(sub, keep) if k]
            trials = [t for t, k in zip(trials, keep) if k]
        values = [r["sweep_params"].get(factor) for r in sub]
        labels = level_labels(values)
        if len(set(labels)) < 2:
            continue
        ref = reference_level(values, base.get(factor), has_base=factor in base)
        order = sorted(set(labels) - {ref}, key=level_order(values, labels))
        for metric in metrics:
            vals, wts = matrices[metric]
            by_level = {lv: [t for t, lab in zip(trials, labels)
                             if lab == lv and t.key in vals.index] for lv in [ref, *order]}
            for lv in order:
                if not by_level[lv] or not by_level[ref]:
                    continue
                eff = compare(by_level[lv], by_level[ref], vals, wts, settings)
                recs.append({"factor": factor, "level": lv, "reference": ref, "metric": metric,
                             "delta": eff.delta, "ci_low": eff.low, "ci_high": eff.high,
                             "n_donors": eff.n_donors,
                             "trials": f"{len(by_level[lv])} vs {len(by_level[ref])}",
                             "n_seeds": eff.n_seeds, "df": eff.df,
                             "comparison": label or eff.comparison, "design": eff.design,
                             "verdict": eff.verdict, "needs": eff.needs})
    return pd.DataFrame(recs, columns=EFFECT_COLUMNS)


EFFECT_COLUMNS = ["factor", "level", "reference", "metric", "delta", "ci_low", "ci_high",
                  "n_donors", "trials", "n_seeds", "df", "comparison", "design", "verdict",
                  "needs"]
