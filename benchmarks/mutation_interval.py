"""Mutation-probe interval: coverage and agreement with the permutation test, by simulation.

The probe (``hescape.metrics.mutation``) reports ``mutation_auroc`` (mean of per-fold AUROCs
of a donor-grouped CV), a one-sided permutation p-value and a 95% interval. This script
draws cohorts from a known population and measures, per donor count and effect size:

- the procedure's TRUE AUROC: the expected value of ``mutation_auroc`` over cohorts of the
  same size drawn from the same population, estimated from ``--truth-draws`` extra cohorts
  (the figure alone, no p-value or interval);
- for ``--runs`` cohorts, the whole probe (B = ``--permutations`` permutations, the
  production default 200): the p-value and every candidate interval, each computed from
  the same fitted folds and the same permutation null, and the interval that
  ``mutation_probe`` reports (checked equal to it on the first cohort of each condition);
- coverage of the true AUROC, mean bounds, how often each interval excludes 0.5 and how
  often that agrees with ``p < 0.05`` (and with ``p <= 0.025``, the dual of a two-sided
  95% interval).

Candidates: ``perm_hm`` (the product: the permutation test inverted, null spread scaled by
Hanley-McNeil), ``perm_shift`` (the same without the scaling), ``delong`` (Wald interval
from donor-clustered DeLong variances of the per-fold AUROCs), ``jackknife`` (delete one
donor, folds kept, t interval) and ``bootstrap`` (the previous interval: donor bootstrap
within class, whole CV refit per resample, 95% percentile; costly, so only on the first
``--bootstrap-runs`` cohorts of each condition).

Population: ``--dim`` features with an anisotropic donor spread (sd 1/sqrt(k) on dim k),
mutant donors shifted by ``effect`` along one fixed random direction, 1-3 slides per donor
(slide sd half the donor sd), 4 patches per slide (sd 1), mean-pooled per slide by the probe.

Also times one probe call before (CV + permutations + the 200-resample refit bootstrap)
and after (``mutation_probe`` now) at 12 + 12 donors, 64-d and 1280-d, side by side.

    python -m benchmarks.mutation_interval              # full (hours on 2 busy cores)
    python -m benchmarks.mutation_interval --smoke      # seconds: proves it runs
    python -m benchmarks.mutation_interval --donors 12 --effects 0,0.7 --runs 100

Results: ``benchmarks/results/mutation_interval.{json,md}`` (``mutation_interval_smoke.*``
with ``--smoke``); the markdown tables are printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hescape.atomic import write_json, write_text  # noqa: E402
from hescape.metrics.mutation import (  # noqa: E402
    _cv,
    _Fitter,
    _groups,
    _mean,
    _tail_rank,
    auroc_interval,
    donor_folds,
    heldout_counts,
    mutation_probe,
    permutation_null,
    permutation_pvalue,
    tail_pvalues,
)

RESULTS = REPO / "benchmarks" / "results"
CANDIDATES = ("perm_hm", "perm_shift", "delong", "jackknife", "bootstrap")
LEVEL = 0.95
CV_FOLDS = 5
PATCHES = 4


# ------------------------------------------------------------------------ population
def population(dim: int, seed: int = 2024) -> dict[str, np.ndarray]:
    """Fixed population: per-dim donor sd and the unit direction the mutation shifts."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    return {
        "sd": 1.0 / np.sqrt(np.arange(1, dim + 1)),
        "dir": direction / np.linalg.norm(direction),
    }


def cohort(pop: dict[str, np.ndarray], n_per_class: int, effect: float, seed: int,
           patches: int = PATCHES, slides: tuple[int, int] = (1, 3)):  # fmt: skip
    """(patch embeddings, slide ids, labels, donors) of ``n_per_class`` mutant and wild-type
    donors."""
    rng = np.random.default_rng(seed)
    sd, direction = pop["sd"], pop["dir"]
    emb, groups, labels, donors = [], [], [], []
    for d in range(2 * n_per_class):
        mutant = d < n_per_class
        centre = rng.normal(size=sd.size) * sd + effect * mutant * direction
        for s in range(int(rng.integers(slides[0], slides[1] + 1))):
            slide = centre + 0.5 * rng.normal(size=sd.size) * sd
            emb.append(slide + rng.normal(size=(patches, sd.size)))
            groups += [f"d{d}_s{s}"] * patches
            labels += ["mut" if mutant else "wt"] * patches
            donors += [f"d{d}"] * patches
    return (
        np.concatenate(emb).astype(np.float32),
        np.array(groups),
        np.array(labels),
        np.array(donors),
    )


def prepared(emb, groups, labels, donors, seed: int = 0):
    """The probe's own preparation: groups, fitter, integer labels/donors, folds."""
    g = _groups(emb, groups, labels, donors)
    classes, y = np.unique(g["label"], return_inverse=True)
    _, donor_idx = np.unique(g["donor"], return_inverse=True)
    fit = _Fitter(emb, g["rows"], len(classes), seed)
    folds = donor_folds(donor_idx, y, CV_FOLDS, seed)
    return fit, y, donor_idx, folds


# ------------------------------------------------------------------------ candidates
def shift_interval(observed: float, null: np.ndarray, exact: bool) -> tuple[float, float]:
    """Permutation test inverted under a pure shift: ``theta + (null - 0.5)``."""
    m = _tail_rank(len(null), exact, (1 - LEVEL) / 2)
    if m < 1:
        return 0.0, 1.0
    high = np.sort(np.nan_to_num(null, nan=-np.inf))[::-1][m - 1]
    low = np.sort(np.nan_to_num(null, nan=np.inf))[m - 1]
    return float(np.clip(observed - (high - 0.5), 0, 1)), float(
        np.clip(observed - (low - 0.5), 0, 1)
    )


def clustered_auc_var(score: np.ndarray, y: np.ndarray, cluster: np.ndarray) -> float:
    """Donor-clustered DeLong (Obuchowski 1997) variance of the AUROC of ``score`` (labels
    constant within a cluster)."""
    pos, neg = score[y == 1], score[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)  # placements of each slide
    out = 0.0
    for place, clus in ((v10, cluster[y == 1]), (v01, cluster[y == 0])):
        ids = np.unique(clus)
        if len(ids) < 2:
            return math.nan
        x = np.array([place[clus == c].sum() for c in ids])
        m = np.array([(clus == c).sum() for c in ids], dtype=float)
        out += len(ids) / (len(ids) - 1) * np.sum((x - auc * m) ** 2) / m.sum() ** 2
    return float(out)


def delong_interval(fit, y, donor_idx, folds) -> tuple[float, float]:
    """Wald interval for the mean per-fold AUROC: (1/k^2) sum of per-fold clustered
    variances (training variability not included)."""
    aucs, variances = [], []
    for tr, te in folds:
        proba = fit(tr, y[tr], te)
        score = proba[:, 1]
        psi_auc = np.mean((score[y[te] == 1][:, None] > score[y[te] == 0][None, :])
                          + 0.5 * (score[y[te] == 1][:, None] == score[y[te] == 0][None, :]))  # fmt: skip
        aucs.append(psi_auc)
        variances.append(clustered_auc_var(score, y[te], donor_idx[te]))
    if not np.all(np.isfinite(variances)):
        return math.nan, math.nan
    mean, se = float(np.mean(aucs)), math.sqrt(np.sum(variances)) / len(folds)
    z = stats.norm.ppf(1 - (1 - LEVEL) / 2)
    return max(0.0, mean - z * se), min(1.0, mean + z * se)


def jackknife_interval(fit, y, donor_idx, folds) -> tuple[float, float]:
    """Delete one donor (its groups leave their fold; folds otherwise kept), t interval."""
    n = donor_idx.max() + 1
    values = []
    for d in range(n):
        keep = donor_idx != d
        remap = -np.ones(len(y), dtype=int)
        remap[keep] = np.arange(keep.sum())
        sub = [(remap[tr[keep[tr]]], remap[te[keep[te]]]) for tr, te in folds]
        groups = np.flatnonzero(keep)
        values.append(_mean(_cv(fit, y[keep], sub, groups)[0]))
    values = np.asarray(values)
    full = _mean(_cv(fit, y, folds)[0])
    se = math.sqrt((n - 1) / n * np.sum((values - values.mean()) ** 2))
    t = stats.t.ppf(1 - (1 - LEVEL) / 2, n - 1)
    return max(0.0, full - t * se), min(1.0, full + t * se)


def bootstrap_interval(fit, y, donor_idx, *, n_boot: int = 200, seed: int = 0, cv=_cv):
    """The previous ``mutation_probe`` interval, verbatim: donors resampled with replacement
    within class, the whole CV refit per resample, 95% percentile interval."""
    donor_y = np.array([y[donor_idx == d][0] for d in range(donor_idx.max() + 1)])
    by_class = [np.flatnonzero(donor_y == c) for c in range(fit.n_classes)]
    members = [np.flatnonzero(donor_idx == d) for d in range(len(donor_y))]
    rng = np.random.default_rng(seed)
    values = []
    for b in range(n_boot):
        picks = np.concatenate([rng.choice(ids, len(ids), replace=True) for ids in by_class])
        groups = np.concatenate([members[d] for d in picks])
        folds = donor_folds(donor_idx[groups], y[groups], CV_FOLDS, seed + b + 1)
        values.append(_mean(cv(fit, y[groups], folds, groups)[0]))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


# ------------------------------------------------------------------------ before
class LegacyFitter(_Fitter):
    """The previous fold model, verbatim: sklearn ``StandardScaler`` + ``LogisticRegression``
    (L-BFGS, stops at gradient 1e-4), its AUROC and balanced accuracy from sklearn."""

    def __call__(self, tr, y_tr, te):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=2000, class_weight="balanced", random_state=self.seed))  # fmt: skip
        model.fit(self.means[tr], y_tr)
        proba = np.zeros((len(te), self.n_classes))
        proba[:, model.classes_] = model.predict_proba(self.means[te])
        return proba


def legacy_cv(fit, y, folds, groups=None):
    """The previous ``_cv``: sklearn's roc_auc_score and balanced_accuracy_score per fold."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    groups = np.arange(len(y)) if groups is None else groups
    aucs, baccs = [], []
    for tr, te in folds:
        proba = fit(groups[tr], y[tr], groups[te])
        aucs.append(float(roc_auc_score(y[te], proba[:, 1])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            baccs.append(float(balanced_accuracy_score(y[te], proba.argmax(axis=1))))
    return aucs, baccs


def legacy_probe(emb, groups, labels, donors, *, n_perm: int, n_boot: int, seed: int = 0):
    """The previous ``mutation_probe`` computation (gate passed): sklearn fits, one-sided
    permutation p, refit donor bootstrap -> (auroc, one-sided p, low, high)."""
    g = _groups(emb, groups, labels, donors)
    _, y = np.unique(g["label"], return_inverse=True)
    _, donor_idx = np.unique(g["donor"], return_inverse=True)
    fit = LegacyFitter(emb, g["rows"], 2, seed)
    folds = donor_folds(donor_idx, y, CV_FOLDS, seed)
    with threadpool_limits(limits=1):
        observed = _mean(legacy_cv(fit, y, folds)[0])
        donor_y = np.array([y[donor_idx == d][0] for d in range(donor_idx.max() + 1)])
        rng = np.random.default_rng(seed)
        null = []
        for _ in range(n_perm):
            y_perm = rng.permutation(donor_y)[donor_idx]
            null.append(_mean(legacy_cv(fit, y_perm, donor_folds(donor_idx, y_perm, CV_FOLDS,
                                                                 seed))[0]))  # fmt: skip
        p = (1 + int(np.sum(np.asarray(null) >= observed - 1e-12))) / (1 + n_perm)
        low, high = bootstrap_interval(fit, y, donor_idx, n_boot=n_boot, seed=seed,
                                       cv=legacy_cv)  # fmt: skip
    return observed, p, low, high


# ------------------------------------------------------------------------ one cohort
def headline(job: tuple) -> float:
    """``mutation_auroc`` of one cohort (the figure only)."""
    pop, n, effect, seed = job
    with threadpool_limits(limits=1):
        fit, y, _, folds = prepared(*cohort(pop, n, effect, seed))
        return _mean(_cv(fit, y, folds)[0])


def one_run(job: tuple) -> dict[str, Any]:
    """Everything for one cohort: figure, p-value, every candidate interval."""
    pop, n, effect, seed, n_perm, n_boot, check_product = job
    data = cohort(pop, n, effect, seed)
    out: dict[str, Any] = {"seed": seed}
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fit, y, donor_idx, folds = prepared(*data)
        observed = _mean(_cv(fit, y, folds)[0])
        null, exact = permutation_null(fit, y, donor_idx, cv_folds=CV_FOLDS,
                                       n_permutations=n_perm, seed=0)  # fmt: skip
        out.update(
            auroc=observed,
            p=permutation_pvalue(null, observed, exact),
            p_greater=tail_pvalues(null, observed, exact)[0],
        )  # the previous p-value
        intervals = {
            "perm_hm": auroc_interval(observed, null, exact, *heldout_counts(y, folds, 2)),
            "perm_shift": shift_interval(observed, null, exact),
            "delong": delong_interval(fit, y, donor_idx, folds),
            "jackknife": jackknife_interval(fit, y, donor_idx, folds),
        }
        if n_boot:
            intervals["bootstrap"] = bootstrap_interval(fit, y, donor_idx, n_boot=n_boot)
        if check_product:  # the product path gives the perm_hm interval and the same p
            m, _ = mutation_probe(*data[:1], group_ids=data[1], labels=data[2], donors=data[3],
                                  n_permutations=n_perm, seed=0)  # fmt: skip
            got = (m["mutation_auroc"], m["mutation_auroc_pvalue"],
                   m["mutation_auroc_ci_low"], m["mutation_auroc_ci_high"])  # fmt: skip
            want = (observed, out["p"], *intervals["perm_hm"])
            if not np.allclose(got, want, atol=1e-12):
                raise AssertionError(f"mutation_probe {got} != building blocks {want}")
    out["ci"] = {k: [float(v[0]), float(v[1])] for k, v in intervals.items()}
    return out


# ------------------------------------------------------------------------ summaries
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def summarise(runs: list[dict], truth: float, candidate: str) -> dict[str, Any]:
    """Coverage of ``truth``, mean bounds, exclusion of 0.5 and agreement with the test
    (the probe's two-sided p; and the previous one-sided p, ``p_greater``)."""
    rows = [r for r in runs if candidate in r["ci"] and np.all(np.isfinite(r["ci"][candidate]))]
    if not rows:
        return {"n": 0}
    ci = np.array([r["ci"][candidate] for r in rows])
    p = np.array([r["p"] for r in rows])
    p_greater = np.array([r["p_greater"] for r in rows])
    cover = (ci[:, 0] <= truth) & (truth <= ci[:, 1])
    excl = (ci[:, 0] > 0.5) | (ci[:, 1] < 0.5)
    return {
        "n": len(rows), "n_undefined": sum(1 for r in runs if candidate in r["ci"]) - len(rows),
        "coverage": float(cover.mean()), "coverage_wilson": wilson(int(cover.sum()), len(rows)),
        "miss_low": float((truth < ci[:, 0]).mean()), "miss_high": float((truth > ci[:, 1]).mean()),
        "mean_low": float(ci[:, 0].mean()), "mean_high": float(ci[:, 1].mean()),
        "excludes_half": float(excl.mean()),
        "agree_p05": float((excl == (p < 0.05)).mean()),
        "agree_one_sided_p05": float((excl == (p_greater < 0.05)).mean()),
    }  # fmt: skip


def pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def pooled(conditions: list[dict], candidate: str) -> dict[str, float]:
    """Coverage and agreement over every run of every condition."""
    k = n = agree = 0
    for c in conditions:
        s = c["summary"].get(candidate, {"n": 0})
        if s["n"]:
            k += round(s["coverage"] * s["n"])
            agree += round(s["agree_p05"] * s["n"])
            n += s["n"]
    return {
        "n": n,
        "coverage": k / n if n else math.nan,
        "wilson": wilson(k, n),
        "agree_p05": agree / n if n else math.nan,
    }


def markdown(conditions: list[dict], timing: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['when']} on {meta['cpus']} CPUs ({meta['dim']}-d population, "
             f"B = {meta['permutations']} permutations, {meta['runs']} cohorts per condition, "
             f"true AUROC from {meta['truth_draws']} more; {meta['seconds'] / 60:.0f} min). "
             f"`{meta['command']}`", "",
             "**Product interval (`perm_hm`)**. True AUROC = E[`mutation_auroc`] over cohorts "
             "of that size (sd: of the figure over those cohorts). Power: the probe's two-sided "
             "p < 0.05; one-sided: the previous p-value's rate. Coverage with its Wilson 95% "
             "interval; misses below / above; agreement of 'CI excludes 0.5' with p < 0.05.", "",
             "| donors | effect | true AUROC (sd) | p<0.05 | one-sided p<0.05 | coverage | "
             "miss low / high | mean CI | CI excl. 0.5 | agree with p<0.05 |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]  # fmt: skip
    for c in conditions:
        s = c["summary"]["perm_hm"]
        lo, hi = s["coverage_wilson"]
        lines.append(f"| {c['n']}+{c['n']} | {c['effect']:g} | {c['truth']:.3f} "
                     f"({c['figure_sd']:.3f}) | {pct(c['power'])} | {pct(c['power_one_sided'])} | "
                     f"{pct(s['coverage'])} ({100 * lo:.0f}-{100 * hi:.0f}) | "
                     f"{pct(s['miss_low'])} / {pct(s['miss_high'])} | "
                     f"[{s['mean_low']:.2f}, {s['mean_high']:.2f}] | {pct(s['excludes_half'])} | "
                     f"{pct(s['agree_p05'])} |")  # fmt: skip
    lines += ["", "**Candidates**: coverage / agreement of 'CI excludes 0.5' with the two-sided "
              "p < 0.05 / mean CI (the bootstrap, the previous interval, on the first "
              f"{meta['bootstrap_runs']} cohorts of each condition). Pooled over all "
              "conditions in the last row.", "",
              "| donors | effect | " + " | ".join(CANDIDATES) + " |",
              "|---|---:|" + "---|" * len(CANDIDATES)]  # fmt: skip
    for c in conditions:
        cells = []
        for k in CANDIDATES:
            s = c["summary"].get(k, {"n": 0})
            cells.append("-" if not s["n"] else
                         f"{pct(s['coverage'])} / {pct(s['agree_p05'])} / "
                         f"[{s['mean_low']:.2f}, {s['mean_high']:.2f}]")  # fmt: skip
        lines.append(f"| {c['n']}+{c['n']} | {c['effect']:g} | " + " | ".join(cells) + " |")
    cells = []
    for k in CANDIDATES:
        pool = pooled(conditions, k)
        cells.append("-" if not pool["n"] else
                     f"{pct(pool['coverage'])} ({100 * pool['wilson'][0]:.1f}-"
                     f"{100 * pool['wilson'][1]:.1f}) / {pct(pool['agree_p05'])}, n={pool['n']}")  # fmt: skip
    lines.append("| all | | " + " | ".join(cells) + " |")
    if timing:
        lines += ["", "**Time per probe call** (12 + 12 donors, 2 slides each, 16 patches per "
                  f"slide, B = {meta['permutations']}; one process, same run; CPU seconds of "
                  "the process, wall seconds in brackets):", "",
                  "| features | before: sklearn fits + refit bootstrap | previous fits, no "
                  "bootstrap | after | before / after (CPU) |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for t in timing:
            lines.append(f"| {t['dim']}-d | {t['before_cpu_s']:.1f} ({t['before_wall_s']:.1f}) | "
                         f"{t['old_fits_no_bootstrap_cpu_s']:.1f} "
                         f"({t['old_fits_no_bootstrap_wall_s']:.1f}) | "
                         f"{t['after_cpu_s']:.1f} ({t['after_wall_s']:.1f}) | "
                         f"**{t['before_cpu_s'] / t['after_cpu_s']:.1f}x** |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ timing
def _clock(fn, *args, **kwargs):
    """(wall s, CPU s of this process, result) of ``fn(*args, **kwargs)``: CPU time is what
    the call costs on a shared machine, wall time what it took here."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0, out


def time_calls(dims: list[int], n_perm: int, n_boot: int) -> list[dict]:
    """One probe call per feature dim, side by side: before (the previous code: sklearn
    fits, permutations, refit bootstrap), the previous code without the bootstrap, and
    after (``mutation_probe`` now)."""
    out = []
    for dim in dims:
        emb, groups, labels, donors = cohort(population(dim), 12, 1.1, seed=7, patches=16,
                                             slides=(2, 2))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = (emb, groups, labels, donors)
            before = _clock(legacy_probe, *data, n_perm=n_perm, n_boot=n_boot)
            no_boot = _clock(legacy_probe, *data, n_perm=n_perm, n_boot=0)
            after = _clock(mutation_probe, emb, group_ids=groups, labels=labels, donors=donors,
                           n_permutations=n_perm, seed=0)  # fmt: skip
        m = after[2][0]
        out.append({"dim": dim, "before_wall_s": before[0], "before_cpu_s": before[1],
                    "old_fits_no_bootstrap_wall_s": no_boot[0],
                    "old_fits_no_bootstrap_cpu_s": no_boot[1],
                    "after_wall_s": after[0], "after_cpu_s": after[1], "before": before[2],
                    "after": [m["mutation_auroc"], m["mutation_auroc_pvalue"],
                              m["mutation_auroc_ci_low"], m["mutation_auroc_ci_high"]]})  # fmt: skip
    return out


# ------------------------------------------------------------------------ driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    ap.add_argument("--donors", default="10,12,20", help="donors per class, comma list")
    ap.add_argument(
        "--effects",
        default="0,0.8,1.1,1.5",
        help="mutant shift along the signal direction, comma list (0 = null)",
    )
    ap.add_argument("--runs", type=int, default=150, help="cohorts per condition (full probe)")
    ap.add_argument("--truth-draws", type=int, default=1000, help="cohorts for the true AUROC")
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument(
        "--bootstrap-runs",
        type=int,
        default=30,
        help="cohorts per condition that also run the old refit bootstrap",
    )
    ap.add_argument("--bootstrap", type=int, default=200, help="resamples of the old bootstrap")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--timing-dims", default="64,1280", help="'' to skip the timing")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.donors, args.effects, args.runs, args.truth_draws = "10", "0,1.1", 2, 10
        args.permutations, args.bootstrap_runs, args.bootstrap = 40, 1, 10
        args.timing_dims = "64"
    try:
        args.donor_list = [int(x) for x in args.donors.split(",") if x.strip()]
        args.effect_list = [float(x) for x in args.effects.split(",") if x.strip()]
        args.dims = [int(x) for x in args.timing_dims.split(",") if x.strip()]
    except ValueError as exc:
        ap.error(f"--donors / --effects / --timing-dims must be comma lists of numbers: {exc}")
    if min(args.donor_list) < 10:
        ap.error("--donors: the probe's power gate needs >= 10 donors per class")
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    pop = population(args.dim)
    t_start = time.perf_counter()
    pool = mp.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    imap = pool.imap if pool else map
    conditions = []
    try:
        for ci, n in enumerate(args.donor_list):
            for ei, effect in enumerate(args.effect_list):
                base = 1_000_000 * (ci * 10 + ei + 1)
                truth_jobs = [(pop, n, effect, base + 500_000 + i) for i in range(args.truth_draws)]
                figures = np.array(list(tqdm(imap(headline, truth_jobs), total=len(truth_jobs),
                                             desc=f"truth {n}+{n} effect {effect:g}")))  # fmt: skip
                truth = float(np.nanmean(figures))
                jobs = [(pop, n, effect, base + i, args.permutations,
                         args.bootstrap if i < args.bootstrap_runs else 0, i == 0)
                        for i in range(args.runs)]  # fmt: skip
                runs = list(tqdm(imap(one_run, jobs), total=len(jobs),
                                 desc=f"probe {n}+{n} effect {effect:g}"))  # fmt: skip
                p = np.array([r["p"] for r in runs])
                conditions.append({
                    "n": n, "effect": effect, "truth": truth,
                    "truth_se": float(np.nanstd(figures) / math.sqrt(len(figures))),
                    "figure_sd": float(np.nanstd(figures)), "power": float((p < 0.05).mean()),
                    "power_one_sided": float(np.mean([r["p_greater"] < 0.05 for r in runs])),
                    "summary": {k: summarise(runs, truth, k) for k in CANDIDATES},
                    "runs": runs,
                })  # fmt: skip
    finally:
        if pool:
            pool.close()
            pool.join()
    timing = time_calls(args.dims, args.permutations, args.bootstrap)
    meta = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": mp.cpu_count(),
        "dim": args.dim,
        "permutations": args.permutations,
        "runs": args.runs,
        "truth_draws": args.truth_draws,
        "bootstrap_runs": min(args.bootstrap_runs, args.runs),
        "seconds": time.perf_counter() - t_start,
        "smoke": args.smoke,
        "command": " ".join(
            ["python -m benchmarks.mutation_interval", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    table = markdown(conditions, timing, meta)
    stem = "mutation_interval_smoke" if args.smoke else "mutation_interval"
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{stem}.json", {"meta": meta, "conditions": conditions,
                                            "timing": timing}, indent=None)  # fmt: skip
    write_text(args.out / f"{stem}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
