"""Slide/donor-level label probe (e.g. mutation status) that says when it cannot answer.

Patch embeddings are mean-pooled per group (slide, else donor) and classified with
donor-grouped cross-validation (no donor on both sides of a fold) by a standardised,
class-balanced L2 logistic regression (``_Fitter``).

- Power gate: every class needs ``min_donors_per_class`` donors and every training fold >= 2
  donors per class; otherwise every figure is NaN, ``mutation_underpowered`` is 1.0 and the
  reason is returned (and warned): below that, AUROC moves in coarse steps and the
  permutation null is wide (docs/measurements.md), so no figure is given.
- ``mutation_auroc`` is the mean of per-fold AUROCs (each from ONE fitted model), never an
  AUROC pooled over separately fitted fold models.
- ``mutation_auroc_pvalue``: TWO-SIDED donor-level label permutation test, the whole CV
  redone under each labeling; exact over all distinct labelings when there are at most
  ``n_permutations`` of them (p counts the observed one), else Monte Carlo (seeded) with
  one-sided p = (1 + #{null >= observed}) / (1 + B); the two-sided p doubles the smaller
  one-sided p.
- ``mutation_auroc_ci_low`` / ``_high``: 95% interval for the procedure's AUROC (the
  expected ``mutation_auroc`` at this cohort size), the same permutation test inverted
  (``auroc_interval``): it excludes 0.5 exactly when ``p <= 0.05``. No refitting beyond
  the permutations.

Coverage, agreement with the test and cost were measured by simulation
(``python -m benchmarks.mutation_interval``, docs/measurements.md). Labels must be constant
within a donor (donor-level). numpy / sklearn only.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from hescape.metrics.logistic import fit_binary_logistic
from hescape.metrics.probes import present

NAN = float("nan")
TIE = 1e-12  # figures this close count as equal (p-value and interval alike)
GRID = 20_000  # resolution of the inverted-test interval: 5e-5 in AUROC


def donor_folds(
    group_donors: np.ndarray, group_labels: np.ndarray, cv_folds: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CV folds over groups (slides/donors), grouped by donor.

    Stratified group k-fold (seeded) with ``min(cv_folds, donors of the smallest class)``
    splits when there are more than ``cv_folds`` donors and that is >= 2; otherwise
    leave-one-donor-out.
    """
    donors, labels = np.asarray(group_donors), np.asarray(group_labels)
    names, d_inv = np.unique(donors, return_inverse=True)
    classes, y_inv = np.unique(labels, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"mutation probe needs >= 2 donors for grouped CV, got {len(names)}")
    pairs = np.unique(d_inv * len(classes) + y_inv)  # (donor, label) pairs
    n_splits = min(cv_folds, int(np.bincount(pairs % len(classes)).min()))
    index = np.arange(len(donors))
    if len(names) <= cv_folds or n_splits < 2:
        tests = [index[d_inv == d] for d in range(len(names))]
    else:
        tests = stratified_group_kfold(y_inv, d_inv, n_splits, seed)
    return [(index[~np.isin(index, te)], te) for te in tests]


def stratified_group_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int,
                           seed: int) -> list[np.ndarray]:  # fmt: skip
    """Test indices of sklearn's ``StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed)`` for integer-coded ``y`` and ``groups`` (0..n-1), the same
    computation without its per-call overhead (the permutation test calls it B times);
    tests/metrics/test_mutation.py checks it against the installed sklearn."""
    y_cnt = np.bincount(y).astype(np.float64)
    n_groups = int(groups.max()) + 1
    counts = np.zeros((n_groups, len(y_cnt)))
    np.add.at(counts, (groups, y), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    counts = counts[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    groups = inv_perm[groups]
    per_fold = np.zeros((n_splits, len(y_cnt)))
    fold_of = np.empty(n_groups, dtype=int)
    eye = np.eye(n_splits)[:, :, None]
    for g in np.argsort(-np.std(counts, axis=1), kind="stable"):
        # fold i's score: mean over classes of the sd over folds of the class fraction,
        # with group g in fold i (sklearn's _find_best_fold, all i at once)
        trial = (per_fold[None] + eye * counts[g]) / y_cnt.reshape(1, -1)
        scores = np.mean(np.std(trial, axis=1), axis=1).tolist()
        sizes = per_fold.sum(axis=1).tolist()
        best, best_score, best_size = 0, scores[0], sizes[0]
        for i in range(1, n_splits):  # np.isclose(a, b): |a - b| <= 1e-8 + 1e-5 |b|
            close = abs(scores[i] - best_score) <= 1e-8 + 1e-5 * abs(best_score)
            if scores[i] < best_score or (close and sizes[i] < best_size):
                best, best_score, best_size = i, scores[i], sizes[i]
        per_fold[best] += counts[g]
        fold_of[g] = best
    return [np.flatnonzero(fold_of[groups] == i) for i in range(n_splits)]


def _groups(emb: np.ndarray, group_ids, labels, donors) -> dict:
    """One row per group: label, donor, patch rows; labels constant per group and donor."""
    frame = pd.DataFrame({"group": np.asarray(group_ids).astype(str),
                          "label": np.asarray(labels, dtype=object),
                          "donor": np.asarray(donors).astype(str)})  # fmt: skip
    if len(frame) != len(emb):
        raise ValueError(f"mutation probe: {len(emb)} embedding rows but {len(frame)} ids")
    frame = frame[present(frame["label"])]
    frame["label"] = frame["label"].astype(str)
    per = frame.groupby("group", sort=True).agg(label=("label", "nunique"),
                                                donor=("donor", "nunique"))  # fmt: skip
    bad = per.index[(per["label"] > 1) | (per["donor"] > 1)]
    if len(bad):
        raise ValueError(f"mutation probe: group {bad[0]!r} mixes labels or donors; use a "
                         "slide/donor-level label column and group by slide or donor")  # fmt: skip
    mixed = frame.groupby("donor")["label"].nunique()
    if (mixed > 1).any():
        raise ValueError(f"mutation probe: donor {mixed.index[mixed > 1][0]!r} has groups with "
                         "different labels; the probe needs a donor-level label")  # fmt: skip
    first = frame.groupby("group", sort=True).first()
    positions = frame.groupby("group", sort=True).indices
    rows = [frame.index.to_numpy()[positions[g]] for g in first.index]
    return {"label": first["label"].to_numpy(), "donor": first["donor"].to_numpy(), "rows": rows}


class _Fitter:
    """Fits one fold model on groups ``tr`` and returns class probabilities of groups ``te``
    (indices into the cohort's groups; a resample may repeat a group).

    The model is ``StandardScaler`` + class-balanced L2 logistic regression (C = 1) on the
    groups' mean embeddings: for two classes solved exactly (``hescape.metrics.logistic``,
    ~5x faster than sklearn's L-BFGS, which stops at gradient 1e-4), for more classes
    sklearn's multinomial ``LogisticRegression``."""

    def __init__(self, emb: np.ndarray, rows: list[np.ndarray], n_classes: int,
                 seed: int) -> None:  # fmt: skip
        self.n_classes, self.seed = n_classes, seed
        self.means = np.stack([emb[r].mean(axis=0) for r in rows])

    def __call__(self, tr: np.ndarray, y_tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        if self.n_classes == 2 and len(np.unique(y_tr)) == 2:
            return fit_binary_logistic(self.means[tr], y_tr).proba(self.means[te])
        model = make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=2000, class_weight="balanced", random_state=self.seed))  # fmt: skip
        model.fit(self.means[tr], y_tr)
        proba = np.zeros((len(te), self.n_classes))
        proba[:, model.classes_] = model.predict_proba(self.means[te])
        return proba


def auroc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """AUROC (ties count 1/2), one-vs-rest macro for > 2 classes; NaN when a class is
    absent. Binary: the Mann-Whitney statistic from ranks (= ``roc_auc_score``)."""
    if len(np.unique(y)) < n_classes:
        return NAN
    if n_classes == 2:
        pos = y == 1
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        ranks = rankdata(proba[:, 1])
        return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(n_classes)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (= sklearn's balanced accuracy)."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _cv(fit: _Fitter, y: np.ndarray, folds, groups: np.ndarray | None = None):
    """Per-fold AUROC and balanced accuracy. ``groups``: cohort group of each row of ``y``
    (default: row i is group i)."""
    groups = np.arange(len(y)) if groups is None else groups
    aucs, baccs = [], []
    for tr, te in folds:
        if len(np.unique(y[tr])) < fit.n_classes:
            aucs.append(NAN), baccs.append(NAN)
            continue
        proba = fit(groups[tr], y[tr], groups[te])
        aucs.append(auroc(y[te], proba, fit.n_classes))
        baccs.append(balanced_accuracy(y[te], proba.argmax(axis=1)))
    return aucs, baccs


def _mean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else NAN


def labelings(donor_y: np.ndarray) -> Iterator[np.ndarray]:
    """Every distinct assignment of the observed class counts to donors."""
    n = len(donor_y)
    counts = np.bincount(donor_y)

    def rec(free: tuple[int, ...], cls: int) -> Iterator[dict[int, int]]:
        if cls == len(counts) - 1:
            yield dict.fromkeys(free, cls)
            return
        for chosen in itertools.combinations(free, int(counts[cls])):
            rest = tuple(i for i in free if i not in chosen)
            for tail in rec(rest, cls + 1):
                yield {**dict.fromkeys(chosen, cls), **tail}

    for assignment in rec(tuple(range(n)), 0):
        yield np.array([assignment[i] for i in range(n)])


def n_labelings(donor_y: np.ndarray) -> int:
    """Multinomial count of distinct donor labelings with the observed class counts."""
    out, left = 1, len(donor_y)
    for c in np.bincount(donor_y):
        out *= math.comb(left, int(c))
        left -= int(c)
    return out


def permutation_null(fit, y, donor_idx, *, cv_folds, n_permutations, seed):
    """(null figures, exact): donor labels permuted, the whole CV (stratified folds included)
    redone under each labeling; every distinct labeling (the observed one included) when
    there are at most ``n_permutations`` of them, else ``n_permutations`` seeded draws."""
    donor_y = np.array([y[donor_idx == d][0] for d in range(donor_idx.max() + 1)])
    exact = n_labelings(donor_y) <= n_permutations
    if exact:
        draws = labelings(donor_y)
    else:
        rng = np.random.default_rng(seed)
        draws = (rng.permutation(donor_y) for _ in range(n_permutations))
    null = []
    for perm in draws:
        y_perm = perm[donor_idx]
        folds = donor_folds(donor_idx, y_perm, cv_folds, seed)
        null.append(_mean(_cv(fit, y_perm, folds)[0]))
    return np.asarray(null, dtype=np.float64), exact


def tail_pvalues(null: np.ndarray, observed: float, exact: bool) -> tuple[float, float]:
    """One-sided permutation p-values (greater, less) of ``observed``: exact, #{null >= obs}
    / B (the observed labeling is among the B); Monte Carlo, (1 + #{null >= obs}) / (1 + B);
    likewise with <=. Figures within 1e-12 tie (and count); a NaN null figure never counts."""
    null = np.asarray(null, dtype=np.float64)
    finite = np.isfinite(null)
    hits = (
        int(np.sum(null[finite] >= observed - TIE)),
        int(np.sum(null[finite] <= observed + TIE)),
    )
    if exact:
        return hits[0] / len(null), hits[1] / len(null)
    return (1 + hits[0]) / (1 + len(null)), (1 + hits[1]) / (1 + len(null))


def permutation_pvalue(null: np.ndarray, observed: float, exact: bool) -> float:
    """Two-sided permutation p-value: twice the smaller one-sided p (``tail_pvalues``),
    capped at 1. ``p <= 0.05`` exactly when the 95% ``auroc_interval`` excludes 0.5."""
    return float(min(1.0, 2.0 * min(tail_pvalues(null, observed, exact))))


def _tail_rank(n_null: int, exact: bool, tail: float) -> int:
    """m such that a one-sided ``p <= tail`` exactly when fewer than m null figures reach
    the observed one (0: no count makes p that small; that side of the interval is open)."""
    if exact:
        return math.floor(tail * n_null + TIE) + 1
    return math.floor(tail * (1 + n_null) + TIE)


def hanley_mcneil_var(auc: np.ndarray | float, n_pos: float, n_neg: float) -> np.ndarray:
    """Hanley & McNeil (1982) variance of an AUROC ``auc`` from ``n_pos`` x ``n_neg``."""
    a = np.asarray(auc, dtype=np.float64)
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    return (a * (1 - a) + (n_pos - 1) * (q1 - a**2) + (n_neg - 1) * (q2 - a**2)) / (n_pos * n_neg)


def auroc_interval(observed: float, null: np.ndarray, exact: bool, n_pos: float, n_neg: float,
                   level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """The permutation test inverted: every AUROC ``theta`` the data do not reject.

    Under ``theta`` the figure is taken to vary as the permutation null does about 0.5,
    scaled by the Hanley-McNeil spread at ``theta`` relative to 0.5 (``n_pos`` / ``n_neg``:
    held-out groups per class in a fold): reference ``theta + r(theta) (null - 0.5)``,
    ``r = sqrt(V_HM(theta) / V_HM(0.5))``. ``theta`` is rejected when ``observed`` lies in
    either ``(1 - level) / 2`` tail of that reference, counted as ``tail_pvalues`` counts;
    at ``theta = 0.5`` this is the permutation test itself, so the interval excludes 0.5
    exactly when the two-sided ``permutation_pvalue <= 1 - level``. Returns (0, 1) when
    too few permutations can reach that tail (B < 39 at 95%). Calibrated by simulation
    (docs/measurements.md).
    """
    null = np.asarray(null, dtype=np.float64)
    tail = (1.0 - level) / 2.0
    m = _tail_rank(len(null), exact, tail)
    theta = np.linspace(0.0, 1.0, GRID + 1)
    r = np.sqrt(hanley_mcneil_var(theta, n_pos, n_neg) / hanley_mcneil_var(0.5, n_pos, n_neg))
    keep = np.ones_like(theta, dtype=bool)
    if m >= 1:
        high = np.sort(np.nan_to_num(null, nan=-np.inf))[::-1][m - 1]  # m-th largest
        low = np.sort(np.nan_to_num(null, nan=np.inf))[m - 1]  # m-th smallest
        keep &= observed - TIE <= theta + r * (high - 0.5)  # not in the upper tail
        keep &= theta + r * (low - 0.5) <= observed + TIE  # not in the lower tail
    if not keep.any():
        return NAN, NAN
    return float(theta[keep].min()), float(theta[keep].max())


def heldout_counts(y: np.ndarray, folds, n_classes: int) -> tuple[float, float]:
    """Mean held-out groups per fold of one class and of the others (a class's mean over
    classes when more than two)."""
    per = np.array([np.bincount(y[te], minlength=n_classes) for _, te in folds], dtype=float)
    per_class = per.mean(axis=0)
    if n_classes == 2:
        return float(per_class[1]), float(per_class[0])
    return float(per_class.mean()), float(per_class.sum() - per_class.mean())


def power_gate(donor_y, classes, folds, donor_idx, min_per_class: int) -> str | None:
    """Why the probe cannot answer (None when it can): donors per class, per training fold."""
    counts = np.bincount(donor_y, minlength=len(classes))
    if counts.min() < min_per_class:
        have = ", ".join(f"{n} {c!r}" for c, n in zip(classes, counts))
        return (f"{have} donors: fewer than {min_per_class} donors per class "
                "(eval.mutation_min_donors_per_class)")  # fmt: skip
    for i, (tr, _) in enumerate(folds):
        per = np.bincount(donor_y[np.unique(donor_idx[tr])], minlength=len(classes))
        if per.min() < 2:
            c = classes[int(per.argmin())]
            return f"training fold {i} holds {per.min()} {c!r} donor(s) (< 2 per class)"
    return None


def mutation_probe(
    emb: np.ndarray,
    *,
    group_ids: Sequence | np.ndarray,
    labels: Sequence | np.ndarray,
    donors: Sequence | np.ndarray,
    encoder_donors: Sequence = (),
    cv_folds: int = 5,
    min_donors_per_class: int = 10,
    n_permutations: int = 200,
    seed: int = 0,
) -> tuple[dict[str, float], str | None]:
    """Donor-grouped CV probe -> (metrics, reason the figures are NaN or None); module doc.

    ``encoder_donors``: donors the evaluated encoder was trained on (counted in
    ``mutation_n_encoder_donors``; they are probed too).
    """
    emb = np.asarray(emb, dtype=np.float32)
    g = _groups(emb, group_ids, labels, donors)
    classes, y = np.unique(g["label"], return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"mutation probe needs >= 2 label values, got {list(classes)}")
    donor_names, donor_idx = np.unique(g["donor"], return_inverse=True)
    donor_y = np.array([y[donor_idx == d][0] for d in range(len(donor_names))])
    folds = donor_folds(donor_idx, y, cv_folds, seed)
    out = {
        "mutation_auroc": NAN, "mutation_auroc_ci_low": NAN, "mutation_auroc_ci_high": NAN,
        "mutation_auroc_pvalue": NAN, "mutation_pvalue_exact": NAN,
        "mutation_balanced_accuracy": NAN, "mutation_underpowered": 1.0,
        "mutation_n_donors": float(len(donor_names)),
        "mutation_n_donors_min_class": float(np.bincount(donor_y).min()),
        "mutation_n_encoder_donors": float(len(set(donor_names) & set(map(str, encoder_donors)))),
        "mutation_n_groups": float(len(y)), "mutation_n_folds": float(len(folds)),
        "mutation_n_permutations": 0.0,
    }  # fmt: skip
    reason = power_gate(donor_y, classes, folds, donor_idx, min_donors_per_class)
    if reason is not None:
        warnings.warn(f"mutation probe underpowered, no figure: {reason}", UserWarning,
                      stacklevel=2)  # fmt: skip
        return out, reason
    fit = _Fitter(emb, g["rows"], len(classes), seed)
    with threadpool_limits(limits=1):  # thousands of tiny fits: BLAS threads only cost here
        aucs, baccs = _cv(fit, y, folds)
        observed = _mean(aucs)
        if not np.isfinite(observed):
            return out, "no fold's held-out side holds every class: no per-fold AUROC"
        null, exact = permutation_null(fit, y, donor_idx, cv_folds=cv_folds,
                                       n_permutations=n_permutations, seed=seed)  # fmt: skip
    p = permutation_pvalue(null, observed, exact)
    low, high = auroc_interval(observed, null, exact, *heldout_counts(y, folds, len(classes)))
    out.update({"mutation_auroc": observed, "mutation_auroc_ci_low": low,
                "mutation_auroc_ci_high": high, "mutation_auroc_pvalue": p,
                "mutation_pvalue_exact": float(exact), "mutation_balanced_accuracy": _mean(baccs),
                "mutation_underpowered": 0.0, "mutation_n_permutations": float(len(null))})  # fmt: skip
    return out, None
