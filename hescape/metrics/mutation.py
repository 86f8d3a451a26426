"""Slide/donor-level label probe (e.g. mutation status) that says when it cannot answer.

Patch embeddings are mean-pooled per group (slide, else donor) and classified with
donor-grouped cross-validation (no donor on both sides of a fold).

- Power gate: every class needs ``min_donors_per_class`` donors and every training fold >= 2
  donors per class; otherwise every figure is NaN, ``mutation_underpowered`` is 1.0 and the
  reason is returned (and warned): below that, AUROC moves in coarse steps and the
  permutation null is wide (docs/measurements.md), so no figure is given.
- ``mutation_auroc`` is the mean of per-fold AUROCs (each from ONE fitted model), never an
  AUROC pooled over separately fitted fold models.
- ``mutation_auroc_pvalue``: donor-level label permutation, the whole CV redone; exact
  over all distinct labelings when there are at most ``n_permutations`` of them (p counts
  the observed one), else Monte Carlo (seeded), p = (1 + #{null >= observed}) / (1 + B).
- ``mutation_auroc_ci_low`` / ``_high``: 95% percentile interval of a donor bootstrap
  (donors resampled with replacement within class, the whole CV refit on each resample,
  so training variability is part of the interval).

Labels must be constant within a donor (donor-level). numpy / sklearn only.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from hescape.metrics.probes import present

NAN = float("nan")


def donor_folds(
    group_donors: np.ndarray, group_labels: np.ndarray, cv_folds: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CV folds over groups (slides/donors), grouped by donor.

    Stratified group k-fold (seeded) with ``min(cv_folds, donors of the smallest class)``
    splits when there are more than ``cv_folds`` donors and that is >= 2; otherwise
    leave-one-donor-out.
    """
    donors, labels = np.asarray(group_donors), np.asarray(group_labels)
    n_donors = len(np.unique(donors))
    if n_donors < 2:
        raise ValueError(f"mutation probe needs >= 2 donors for grouped CV, got {n_donors}")
    x = np.zeros((len(donors), 1))
    per_donor = pd.DataFrame({"d": donors, "y": labels}).drop_duplicates()
    n_splits = min(cv_folds, int(per_donor["y"].value_counts().min()))
    if n_donors <= cv_folds or n_splits < 2:
        splitter = LeaveOneGroupOut().split(x, labels, donors)
    else:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splitter = cv.split(x, labels, donors)
    return [(np.asarray(tr), np.asarray(te)) for tr, te in splitter]


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
    (indices into the cohort's groups; a bootstrap may repeat a group)."""

    def __init__(self, emb: np.ndarray, rows: list[np.ndarray], n_classes: int,
                 seed: int) -> None:  # fmt: skip
        self.n_classes, self.seed = n_classes, seed
        self.means = np.stack([emb[r].mean(axis=0) for r in rows])

    def __call__(self, tr: np.ndarray, y_tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        model = make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=2000, class_weight="balanced", random_state=self.seed))  # fmt: skip
        model.fit(self.means[tr], y_tr)
        proba = np.zeros((len(te), self.n_classes))
        proba[:, model.classes_] = model.predict_proba(self.means[te])
        return proba


def auroc(y: np.ndarray, proba: np.ndarray, n_classes: int, weight=None) -> float:
    """(Weighted) AUROC, one-vs-rest macro for > 2 classes; NaN when a class is absent."""
    keep = slice(None) if weight is None else weight > 0
    y, proba = y[keep], proba[keep]
    w = None if weight is None else weight[keep]
    if len(np.unique(y)) < n_classes:
        return NAN
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1], sample_weight=w))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(n_classes),
                               sample_weight=w))  # fmt: skip


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            baccs.append(float(balanced_accuracy_score(y[te], proba.argmax(axis=1))))
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


def permutation_pvalue(fit, y, donor_idx, observed, *, cv_folds, n_permutations, seed):
    """(p, exact, n labelings scored): donor labels permuted, the whole CV (stratified folds
    included) redone under each labeling."""
    donor_y = np.array([y[donor_idx == d][0] for d in range(donor_idx.max() + 1)])
    total = n_labelings(donor_y)
    exact = total <= n_permutations
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
    hits = int(np.sum(np.nan_to_num(np.asarray(null), nan=-np.inf) >= observed - 1e-12))
    p = hits / len(null) if exact else (1 + hits) / (1 + len(null))
    return float(p), exact, len(null)


def bootstrap_ci(fit, y, donor_idx, *, cv_folds, n_boot, seed) -> tuple[float, float]:
    """95% percentile interval of the whole procedure (donor-grouped CV, refit, mean per-fold
    AUROC) over donor resamples drawn with replacement within class; a resampled donor's
    copies stay on one side of every fold."""
    donor_y = np.array([y[donor_idx == d][0] for d in range(donor_idx.max() + 1)])
    by_class = [np.flatnonzero(donor_y == c) for c in range(fit.n_classes)]
    members = [np.flatnonzero(donor_idx == d) for d in range(len(donor_y))]
    rng = np.random.default_rng(seed)
    stats = []
    for b in range(n_boot):
        picks = np.concatenate([rng.choice(ids, len(ids), replace=True) for ids in by_class])
        groups = np.concatenate([members[d] for d in picks])
        folds = donor_folds(donor_idx[groups], y[groups], cv_folds, seed + b + 1)
        stats.append(_mean(_cv(fit, y[groups], folds, groups)[0]))
    stats = np.asarray(stats)
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return NAN, NAN
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


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
    n_bootstrap: int = 200,
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
        p, exact, n_perm = permutation_pvalue(fit, y, donor_idx, observed, cv_folds=cv_folds,
                                              n_permutations=n_permutations, seed=seed)  # fmt: skip
        low, high = bootstrap_ci(fit, y, donor_idx, cv_folds=cv_folds, n_boot=n_bootstrap,
                                 seed=seed)  # fmt: skip
    out.update({"mutation_auroc": observed, "mutation_auroc_ci_low": low,
                "mutation_auroc_ci_high": high, "mutation_auroc_pvalue": p,
                "mutation_pvalue_exact": float(exact), "mutation_balanced_accuracy": _mean(baccs),
                "mutation_underpowered": 0.0, "mutation_n_permutations": float(n_perm)})  # fmt: skip
    return out, None
