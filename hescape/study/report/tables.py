"""The study report's tables: leaderboard, ablation (mean ± sd per level), contrastive vs
baselines, Pareto front, factor effects with CIs. They take ``trial_table`` rows; pass
the rows of ONE protocol (see ``notes.by_protocol``) to anything that ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from hescape.config import StudyConfig, get_path
from hescape.study.confirm import membership
from hescape.study.report import notes
from hescape.study.report.effects import (
    EFFECT_COLUMNS,
    EffectSettings,
    factor_effects,
    level_labels,
    level_order,
)
from hescape.study.space import SEED_KEY

KEY_METRICS = notes.FALLBACK_HEADLINE
EFFECT_METRICS = ("r5_img2gene", "r5_gene2img", "img/ridge_per_donor_pearson_mean",
                  "bleep_pearson_mean")
SEARCHERS = ("tpe", "random")  # their trials compare levels marginally, whatever matched
MAX_COLUMNS = 10  # headline metrics shown in the leaderboard / ablation tables


def finished(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "FINISHED"]


def _present(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    return [k for k in dict.fromkeys(keys) if any(k in r["metrics"] for r in rows)]




def with_companions(keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    """``keys`` with the batch count after mixing figures and the PCA dimension after
    expression-probe figures (where the trials logged them)."""
    mixing, out = notes.mixing_figures(), []
    for key in keys:
        out.append(key)
        out += [c for c in notes.companions(key, mixing) if c not in out]
    return _present(rows, out)


def leaderboard(rows: list[dict[str, Any]], metric: str, mode: str,
                keys: Sequence[str] = KEY_METRICS) -> pd.DataFrame:
    """Trials sorted by ``metric`` with the headline ``keys`` the trials logged."""
    shown = [metric, *with_companions([k for k in keys if k != metric], rows)]
    flag = any(str(r.get("preprocess_converged", "")).lower() == "false" for r in rows)
    recs = []
    for r in rows:
        rec = {"trial": r["trial_id"], "status": r["status"], "phase": r["phase"],
               "config": r["config_id"], "seed": r["seed"], "protocol": notes.protocol_of(r)}
        if flag:
            rec["pre_converged"] = r.get("preprocess_converged", "")
        rec.update({k: r["metrics"].get(k, np.nan) for k in shown})
        recs.append(rec)
    df = pd.DataFrame(recs)
    if df.empty:
        return df
    return df.sort_values(metric, ascending=(mode == "min"), na_position="last")


def ablation(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, pd.DataFrame]:
    """Per sweep factor: mean +/- sd (and n) of each metric per factor level, over seeds.

    A numeric factor sampled continuously (TPE/random: more than ``MAX_LEVELS`` distinct
    values) is grouped in quantile bins labelled by their range; trials where a conditional
    factor is absent form the ``(base)`` level. Pass the rows of ONE protocol.
    """
    done = finished(rows)
    factors = sorted({k for r in done for k in r["sweep_params"] if k != SEED_KEY})
    tables = {}
    for factor in factors:
        values = [r["sweep_params"].get(factor) for r in done]
        levels = level_labels(values)
        recs = [{"level": level, **{m: r["metrics"].get(m, np.nan) for m in metrics}}
                for level, r in zip(levels, done)]
        agg = pd.DataFrame(recs).groupby("level", sort=False).agg(["mean", "std", "count"])
        tables[factor] = agg.loc[sorted(agg.index, key=level_order(values, levels))]
    return tables


def _feature_label(features: str) -> str:
    if features in ("img", "gene", "joint"):
        return f"contrastive {features}"
    if features == "baseline_pca":
        return "pca expr"
    return f"{features.removeprefix('baseline_')} img"


def baseline_comparison(rows: list[dict[str, Any]],
                        tasks: dict[str, str] | None = None) -> pd.DataFrame:
    """Tasks x feature sets over finished trials (mean ± sd; one value where every trial
    gave the same, as baselines do): does contrastive training beat the frozen image encoder
    and PCA of expression on each held-out task? Mutation rows leave out trials whose
    mutation probe was underpowered."""
    tasks = notes.comparison_tasks() if tasks is None else tasks
    recs, done = [], finished(rows)
    for r in done:
        weak = notes.underpowered(r)
        for key, value in r["metrics"].items():
            split, features, metric = notes.split_key(key)
            if split != "test" or features is None:
                continue
            for label, task_metric in tasks.items():
                if metric == task_metric and not (weak and metric.startswith("mutation_")):
                    recs.append({"task": label, "features": features, "value": value})
    if not recs:
        return pd.DataFrame()
    long = pd.DataFrame(recs)
    feats = set(long["features"])
    if not feats & {"img", "gene", "joint"} or not any(f.startswith("baseline_") for f in feats):
        return pd.DataFrame()  # a comparison needs both sides
    g = long.groupby(["task", "features"], sort=False)["value"]
    # a figure equal in every trial (a baseline: the same features each time) is one value
    cell = (g.agg(["mean", "std", "nunique"]).apply(lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
            if s["nunique"] > 1 else f"{s['mean']:.3f}", axis=1))
    table = cell.unstack("features").reindex(index=[t for t in tasks if t in set(long["task"])])
    rank = {"img": 0, "gene": 1, "joint": 2, "baseline_pca": 4}
    table = table[sorted(table.columns, key=lambda f: (rank.get(f, 3), f))].fillna("")
    table.index = [_with_companions(label, tasks[label], done) for label in table.index]
    table.columns = [_feature_label(c) for c in table.columns]
    return table


def _with_companions(label: str, metric: str, rows: Sequence[dict[str, Any]]) -> str:
    """A row label with the batch count (mixing) or PCA dimension (expression probes) the
    trials logged beside that figure."""
    found = notes.companions(f"test/x/{metric}", notes.mixing_figures())
    if not found:
        return label
    name = notes.split_key(found[0])[2]
    values = sorted({int(v) for r in rows for k, v in r["metrics"].items()
                     if k.startswith("test/") and k.endswith(f"/{name}")})
    what = "batches" if name == "n_batches" else "PCA dim"
    if not values:
        return f"{label} ({what} not recorded)"
    span = str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
    return f"{label} ({what} {span})"


def pareto_front(rows: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[str]:
    """Trial ids not dominated on all objectives (pass the rows of ONE protocol)."""
    pts = [(r["trial_id"], [r["metrics"].get(m) for m in metrics]) for r in rows
           if r["status"] == "FINISHED" and all(m in r["metrics"] for m in metrics)]
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    front = []
    for tid, v in pts:
        vs = [s * x for s, x in zip(sign, v)]
        dominated = any(
            all(s * y >= x for s, y, x in zip(sign, w, vs))
            and any(s * y > x for s, y, x in zip(sign, w, vs))
            for _, w in pts
        )
        if not dominated:
            front.append(tid)
    return front


# ------------------------------------------------------------------------- factor effects
def _condition_holds(cfg: StudyConfig, factor: str, base: dict[str, Any]) -> bool:
    when = cfg.sweep.params[factor].when if cfg.sweep and factor in cfg.sweep.params else None
    try:
        return all(get_path(base, k) in allowed for k, allowed in (when or {}).items())
    except KeyError:
        return False


def sweep_structure(cfg: StudyConfig) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """(factor -> the base config's value or None = absent, factor -> linked params)."""
    params = cfg.sweep.params if cfg.sweep else {}
    base_cfg = cfg.model_dump()
    base: dict[str, Any] = {}
    for factor in params:
        try:
            base[factor] = get_path(base_cfg, factor) if _condition_holds(
                cfg, factor, base_cfg) else None
        except KeyError:
            continue
    linked = {f: set(p.when or {}) | {k for k, q in params.items() if q.when and f in q.when}
              for f, p in params.items()}
    return base, linked


def _shadow_factors(cfg: StudyConfig) -> set[str]:
    """Conditional factors swept at one value (e.g. ``adversary.weight: [0.5]`` when the
    adversary is on): their "(base) vs value" comparison is their condition's, row for row."""
    params = cfg.sweep.params if cfg.sweep else {}
    return {k for k, p in params.items()
            if p.when and p.type == "choice" and len(p.values or []) == 1}


def effect_metrics(per_donor: dict[str, pd.DataFrame]) -> list[str]:
    """Per-donor metrics to test: the preferred ones present, else the first four."""
    present = sorted({m for t in per_donor.values() for m in t["metric"].unique()})
    preferred = [m for m in EFFECT_METRICS if m in present]
    return preferred or present[:4]


def effect_table(rows: list[dict[str, Any]], per_donor: dict[str, pd.DataFrame],
                 cfg: StudyConfig, settings: EffectSettings,
                 plan: dict[str, Any] | None = None) -> pd.DataFrame:
    """Factor effects per protocol (a ``protocol`` column first).

    ``plan``: the confirm phase's plan (``confirm.read_plan``). With it, the confirm trials
    are analysed per factor on that factor's own sub-experiment (``confirm.membership``)
    against the searched best configuration's level; the other trials (search, seeds)
    against the base config's level, as marginal or paired comparisons."""
    base, linked = sweep_structure(cfg)
    metrics = effect_metrics(per_donor)
    parts = []
    for proto, group in notes.by_protocol(rows).items():
        done = finished(group)
        confirm = [r for r in done if r.get("phase") == "confirm"] if plan else []
        other = [r for r in done if not (plan and r.get("phase") == "confirm")]
        if cfg.sweep is not None and cfg.sweep.searcher in SEARCHERS:  # what TPE chose
            other = [r if r.get("design") or r.get("phase") == "confirm"
                     else {**r, "design": "marginal"} for r in other]
        if other:
            parts.append(factor_effects(other, per_donor, metrics=metrics, base=base,
                                        linked=linked, settings=settings).assign(protocol=proto))
        if confirm and plan is not None:
            best = plan.get("best") or {}
            members = {f: {r["trial_id"] for r in rs}
                       for f, rs in membership(cfg, plan, confirm).items()}
            confirm_base = {f: best.get(f) for f in members}
            parts.append(factor_effects(confirm, per_donor, metrics=metrics, base=confirm_base,
                                        linked=linked, settings=settings, members=members)
                         .assign(protocol=proto))
    frames = [p for p in parts if len(p)]
    shadows = _shadow_factors(cfg)
    frames = [f[~f["factor"].isin(shadows)] for f in frames]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["protocol", *EFFECT_COLUMNS])
    return pd.concat(frames, ignore_index=True)[["protocol", *EFFECT_COLUMNS]]


def fmt_effects(df: pd.DataFrame) -> pd.DataFrame:
    """The effects table as the report shows it: the verdict followed by what would give one
    (``needs``) where there is no claim."""
    def ci(r) -> str:
        if not np.isfinite(r["delta"]):
            return ""
        if not np.isfinite(r["ci_low"]):
            return f"{r['delta']:+.3f} (no CI)"
        return f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"

    def verdict(r) -> str:
        needs = r.get("needs")
        if not isinstance(needs, str) or not needs or str(r["verdict"]).startswith("no CI"):
            return str(r["verdict"])
        return f"{r['verdict']}: {needs}"

    out = df[["factor", "level", "reference", "metric"]].copy()
    out["difference [95% CI]"] = df.apply(ci, axis=1)
    out["verdict"] = df.apply(verdict, axis=1) if len(df) else df["verdict"]
    out["donors"] = df["n_donors"]
    out["seeds"] = df["n_seeds"] if "n_seeds" in df else ""
    out["trials"] = df["trials"]
    out["design"] = df["design"]
    return out


def fmt_ablation(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=df.index)
    for metric in df.columns.get_level_values(0).unique():
        m, s, n = df[(metric, "mean")], df[(metric, "std")], df[(metric, "count")]
        out[metric] = [("" if c == 0 else f"{a:.3f} ± {b:.3f} (n={int(c)})" if c > 1
                        else f"{a:.3f} (n=1)") for a, b, c in zip(m, s.fillna(0), n)]
    return out
