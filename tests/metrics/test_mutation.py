"""The mutation probe: power gate, per-fold AUROC, permutation p-value, and the interval
that inverts the permutation test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hescape.metrics.mutation import (
    auroc,
    auroc_interval,
    balanced_accuracy,
    donor_folds,
    hanley_mcneil_var,
    labelings,
    mutation_probe,
    n_labelings,
    permutation_pvalue,
)


def _cohort(n_mut=12, n_wt=12, slides=2, patches=5, signal=2.0, seed=0):
    """Donor-level labels; ``signal`` shifts the mutant donors' patch embeddings."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_mut + n_wt):
        lab = "mut" if d < n_mut else "wt"
        for s in range(slides):
            rows += [(f"d{d}", f"d{d}_s{s}", lab)] * patches
    donors, groups, labels = map(np.array, zip(*rows, strict=True))
    emb = rng.normal(size=(len(rows), 8))
    emb[:, 0] += signal * (labels == "mut")
    return emb, donors, groups, labels


def _probe(emb, donors, groups, labels, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mutation_probe(emb, group_ids=groups, labels=labels, donors=donors, **kw)


def test_seven_donors_is_underpowered_with_reason():
    emb, donors, groups, labels = _cohort(n_mut=3, n_wt=4)
    with pytest.warns(UserWarning, match="underpowered"):
        m, reason = mutation_probe(emb, group_ids=groups, labels=labels, donors=donors)
    assert "3 'mut'" in reason and "4 'wt'" in reason and "fewer than 10" in reason
    for key in ("mutation_auroc", "mutation_auroc_ci_low", "mutation_auroc_ci_high",
                "mutation_auroc_pvalue", "mutation_balanced_accuracy"):  # fmt: skip
        assert np.isnan(m[key]), key
    assert m["mutation_underpowered"] == 1.0 and m["mutation_n_donors_min_class"] == 3
    assert m["mutation_n_donors"] == 7


def test_training_fold_needs_two_donors_per_class():
    # 2 mutant donors pass a gate of 2 per class, but 2-fold CV trains on 1 mutant donor
    emb, donors, groups, labels = _cohort(n_mut=2, n_wt=6)
    m, reason = _probe(emb, donors, groups, labels, min_donors_per_class=2)
    assert "training fold" in reason and "'mut'" in reason
    assert np.isnan(m["mutation_auroc"]) and m["mutation_underpowered"] == 1.0


def test_real_signal_high_auroc_small_p_ci_above_chance():
    emb, donors, groups, labels = _cohort(n_mut=12, n_wt=12, signal=1.5)
    train_donors = [f"d{i}" for i in range(0, 24, 2)]
    m, reason = _probe(emb, donors, groups, labels, encoder_donors=train_donors,
                       n_permutations=40)  # fmt: skip
    assert reason is None and m["mutation_underpowered"] == 0.0
    assert m["mutation_auroc"] > 0.9
    assert m["mutation_auroc_pvalue"] < 0.05 and m["mutation_pvalue_exact"] == 0.0
    assert m["mutation_auroc_pvalue"] == pytest.approx(2 / 41)  # two-sided floor, B = 40
    assert 0.5 < m["mutation_auroc_ci_low"] <= m["mutation_auroc"] <= m["mutation_auroc_ci_high"]
    assert m["mutation_n_encoder_donors"] == 12 and m["mutation_n_permutations"] == 40


@pytest.mark.parametrize("kind", ["no signal", "permuted labels"])
def test_no_signal_large_p_ci_covers_chance(kind):
    if kind == "no signal":
        emb, donors, groups, labels = _cohort(signal=0.0, seed=3)
    else:  # the real signal, but donor labels shuffled: the signal no longer follows labels
        emb, donors, groups, labels = _cohort(signal=1.5)
        rng = np.random.default_rng(5)
        donor_names = np.unique(donors)
        shuffled = dict(zip(donor_names, rng.permutation([labels[donors == d][0]
                                                          for d in donor_names])))  # fmt: skip
        labels = np.array([shuffled[d] for d in donors])
    m, _ = _probe(emb, donors, groups, labels, n_permutations=40)
    assert m["mutation_auroc_pvalue"] > 0.1
    assert m["mutation_auroc_ci_low"] < 0.5 < m["mutation_auroc_ci_high"]


def test_exact_permutation_when_few_labelings():
    # 3 + 3 donors, gate lowered to 3: C(6, 3) = 20 labelings <= 200 -> exact p-value. A
    # labeling and its complement give the same AUROC (the classifier flips with the
    # labels), so the one-sided p >= 2/20 and the two-sided p >= 4/20 however strong the
    # signal: 6 donors cannot give p < 0.05.
    emb, donors, groups, labels = _cohort(n_mut=3, n_wt=3, signal=4.0)
    m, reason = _probe(emb, donors, groups, labels, min_donors_per_class=3)
    assert reason is None and m["mutation_pvalue_exact"] == 1.0
    assert m["mutation_n_permutations"] == 20 and m["mutation_n_folds"] == 3
    assert m["mutation_auroc_pvalue"] * 20 == pytest.approx(round(m["mutation_auroc_pvalue"] * 20))
    assert m["mutation_auroc_pvalue"] >= 0.2
    assert m["mutation_auroc_ci_low"] <= 0.5  # the interval inverts the same exact test


def test_labelings_enumerate_each_assignment_once():
    y = np.array([0, 0, 1, 1, 1, 2])
    all_ = [tuple(v) for v in labelings(y)]
    assert len(all_) == len(set(all_)) == n_labelings(y) == 60  # 6! / (2! 3! 1!)
    assert all(sorted(v) == sorted(y) for v in all_)


def test_fold_count_follows_donors_per_class_not_slides():
    _, donors, groups, labels = _cohort(n_mut=3, n_wt=3, slides=4)  # 12 slides per class
    g = np.unique(groups)
    folds = donor_folds(np.array([s.split("_")[0] for s in g]),
                        np.array([labels[groups == s][0] for s in g]), 5)  # fmt: skip
    assert len(folds) == 3  # 3 donors per class -> 3 folds, each testing one donor per class


def test_donor_folds_never_share_a_donor():
    _, donors, groups, labels = _cohort(n_mut=6, n_wt=6)
    g = np.unique(groups)
    g_donor = np.array([s.split("_")[0] for s in g])
    g_lab = np.array([labels[groups == s][0] for s in g])
    for n_folds in (3, 5, 20):
        folds = donor_folds(g_donor, g_lab, n_folds, seed=1)
        seen = np.concatenate([te for _, te in folds])
        assert sorted(seen) == list(range(len(g)))  # each group tested exactly once
        for tr, te in folds:
            assert not set(g_donor[tr]) & set(g_donor[te])


def test_folds_are_sklearns_stratified_group_kfold():
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

    rng = np.random.default_rng(0)
    for trial in range(60):
        n_donors = int(rng.integers(6, 40))
        donor_y = rng.permutation(np.r_[[0, 1] * 3, rng.integers(0, 2 + trial % 2, n_donors - 6)])
        slides = rng.integers(1, 4, n_donors)  # 1-3 groups per donor
        g_donor = np.repeat([f"p{d:02d}" for d in range(n_donors)], slides)
        g_lab = np.repeat(np.array(["mut", "wt", "x"])[donor_y], slides)
        cv_folds, seed = int(rng.integers(2, 8)), int(rng.integers(0, 1000))
        ours = donor_folds(g_donor, g_lab, cv_folds, seed)
        per_class = min(len(set(g_donor[g_lab == c])) for c in set(g_lab))
        n_splits = min(cv_folds, per_class)
        x = np.zeros((len(g_donor), 1))
        if n_donors <= cv_folds or n_splits < 2:
            ref = LeaveOneGroupOut().split(x, g_lab, g_donor)
        else:
            ref = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(
                x, g_lab, g_donor)  # fmt: skip
        ref = list(ref)
        assert len(ours) == len(ref)
        for (tr, te), (rtr, rte) in zip(ours, ref, strict=True):
            assert np.array_equal(te, rte) and np.array_equal(tr, rtr)


def test_missing_labels_dropped_and_clear_errors():
    emb, donors, groups, labels = _cohort(n_mut=3, n_wt=3)
    labels = labels.astype(object)
    labels[:5] = None  # unlabelled patches are dropped, not an error
    m, _ = _probe(emb, donors, groups, labels)
    assert m["mutation_n_donors"] == 6
    mixed = np.array(labels, dtype=object)
    mixed[30] = "wt" if mixed[30] == "mut" else "mut"
    with pytest.raises(ValueError, match="mixes labels"):
        _probe(emb, donors, groups, mixed)
    by_slide = np.array(labels, dtype=object)
    by_slide[(groups == "d1_s1")] = "wt"  # donor d1: one mutant slide, one wild-type slide
    with pytest.raises(ValueError, match="donor-level label"):
        _probe(emb, donors, groups, by_slide)


# ------------------------------------------------------------ interval = inverted test
def _one_sided(null, observed, exact, greater):
    """One-sided permutation p, written out: exact #{...} / B, else (1 + #{...}) / (1 + B)
    (a NaN null figure is in neither tail: its comparisons are False)."""
    hits = int(np.sum(null >= observed - 1e-12) if greater else np.sum(null <= observed + 1e-12))
    return hits / len(null) if exact else (1 + hits) / (1 + len(null))


@pytest.mark.parametrize(("n_null", "exact"), [(40, False), (200, False), (70, True)])
def test_interval_excludes_half_exactly_when_the_test_rejects(n_null, exact):
    # random nulls on the AUROC grid of a small fold (ties with the observed value common)
    rng = np.random.default_rng(n_null)
    seen = {"low": 0, "high": 0, "none": 0}
    for _ in range(300):
        null = np.round(rng.normal(0.5, rng.uniform(0.05, 0.2), n_null) * 36) / 36
        null[rng.integers(0, n_null, rng.integers(0, 3))] = np.nan  # a fold without a class
        observed = float(np.round(rng.uniform(0.1, 0.95) * 36) / 36)
        low, high = auroc_interval(observed, null, exact, n_pos=6, n_neg=6)
        p_hi, p_lo = (_one_sided(null, observed, exact, g) for g in (True, False))
        assert 0.0 <= low <= high <= 1.0
        assert (low > 0.5) == (p_hi <= 0.025), (observed, p_hi, low)
        assert (high < 0.5) == (p_lo <= 0.025), (observed, p_lo, high)
        # the probe's two-sided p is the dual of the whole interval
        p = permutation_pvalue(null, observed, exact)
        assert p == pytest.approx(min(1.0, 2 * min(p_hi, p_lo)))
        assert (low > 0.5 or high < 0.5) == (p <= 0.05)
        seen["low" if low > 0.5 else "high" if high < 0.5 else "none"] += 1
    assert min(seen.values()) > 10  # every outcome was exercised


def test_interval_width_follows_hanley_mcneil():
    null = np.random.default_rng(0).normal(0.5, 0.12, 200)
    width = {obs: np.subtract(*auroc_interval(obs, null, False, 5, 5)[::-1])
             for obs in (0.5, 0.7, 0.9, 0.98)}  # fmt: skip
    assert width[0.5] > width[0.7] > width[0.9] > width[0.98] > 0
    # each bound is the theta whose scaled reference puts the observed figure at its tail
    # quantile (B = 200: the 5th largest / smallest null figure, as p = 5/201 <= 0.025)
    r = lambda t: np.sqrt(hanley_mcneil_var(t, 5, 5) / hanley_mcneil_var(0.5, 5, 5))  # noqa: E731
    q_hi, q_lo = np.sort(null)[::-1][4], np.sort(null)[4]
    for obs in (0.5, 0.8):
        low, high = auroc_interval(obs, null, False, 5, 5)
        assert low + r(low) * (q_hi - 0.5) == pytest.approx(obs, abs=1e-4)
        assert high + r(high) * (q_lo - 0.5) == pytest.approx(obs, abs=1e-4)


def test_too_few_permutations_give_no_bound():
    null = np.random.default_rng(1).normal(0.5, 0.1, 30)  # (1 + 0) / 31 > 0.025
    assert auroc_interval(0.99, null, False, 5, 5) == (0.0, 1.0)


def test_hanley_mcneil_is_the_mann_whitney_null_variance_at_half():
    for n1, n0 in ((3, 4), (10, 10), (25, 7)):
        assert hanley_mcneil_var(0.5, n1, n0) == pytest.approx((n1 + n0 + 1) / (12 * n1 * n0))
    assert hanley_mcneil_var(1.0, 5, 5) == pytest.approx(0.0, abs=1e-15)


def test_auroc_and_balanced_accuracy_equal_sklearn_with_ties():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rng = np.random.default_rng(2)
    for _ in range(50):
        y = rng.integers(0, 2, 15)
        y[:2] = [0, 1]
        score = np.round(rng.uniform(size=15), 1)  # many ties
        proba = np.column_stack([1 - score, score])
        assert auroc(y, proba, 2) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        pred = (score > 0.5).astype(int)
        assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))


@pytest.mark.parametrize(("signal", "seed"), [(1.5, 0), (0.0, 3), (0.0, 4), (0.6, 1)])
def test_probe_interval_agrees_with_its_p_value(signal, seed):
    # planted effect and null cohorts through the whole probe (B = 40: p >= 2/41 ~ 0.049)
    emb, donors, groups, labels = _cohort(signal=signal, seed=seed)
    m, reason = _probe(emb, donors, groups, labels, n_permutations=40)
    assert reason is None
    low, high, p = (m["mutation_auroc_ci_low"], m["mutation_auroc_ci_high"],
                    m["mutation_auroc_pvalue"])  # fmt: skip
    assert low <= high and (low > 0.5 or high < 0.5) == (p < 0.05)
    if signal == 1.5:
        assert p == pytest.approx(2 / 41) and low > 0.5
    if signal == 0.0:
        assert p > 0.05 and low <= 0.5 <= high


def test_obsolete_bootstrap_key_still_loads_with_a_warning():
    from hescape.config import EvalConfig

    with pytest.warns(UserWarning, match="mutation_bootstrap is obsolete"):
        cfg = EvalConfig.model_validate({"mutation_bootstrap": 200})
    assert cfg.mutation_bootstrap is None  # dropped, so re-validating a dump stays quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EvalConfig.model_validate(cfg.model_dump())
