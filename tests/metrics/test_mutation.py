"""The mutation probe: power gate, per-fold AUROC, permutation p-value, donor-bootstrap CI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hescape.metrics.mutation import (
    donor_folds,
    labelings,
    mutation_probe,
    n_labelings,
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
                       n_permutations=40, n_bootstrap=60)  # fmt: skip
    assert reason is None and m["mutation_underpowered"] == 0.0
    assert m["mutation_auroc"] > 0.9
    assert m["mutation_auroc_pvalue"] < 0.05 and m["mutation_pvalue_exact"] == 0.0
    assert m["mutation_auroc_pvalue"] == pytest.approx(1 / 41)  # Monte Carlo floor, B = 40
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
    m, _ = _probe(emb, donors, groups, labels, n_permutations=40, n_bootstrap=60)
    assert m["mutation_auroc_pvalue"] > 0.1
    assert m["mutation_auroc_ci_low"] < 0.5 < m["mutation_auroc_ci_high"]


def test_exact_permutation_when_few_labelings():
    # 3 + 3 donors, gate lowered to 3: C(6, 3) = 20 labelings <= 200 -> exact p-value. A
    # labeling and its complement give the same AUROC (the classifier flips with the
    # labels), so p >= 2/20 however strong the signal: 6 donors cannot give p < 0.05.
    emb, donors, groups, labels = _cohort(n_mut=3, n_wt=3, signal=4.0)
    m, reason = _probe(emb, donors, groups, labels, min_donors_per_class=3, n_bootstrap=20)
    assert reason is None and m["mutation_pvalue_exact"] == 1.0
    assert m["mutation_n_permutations"] == 20 and m["mutation_n_folds"] == 3
    assert m["mutation_auroc_pvalue"] * 20 == pytest.approx(round(m["mutation_auroc_pvalue"] * 20))
    assert m["mutation_auroc_pvalue"] >= 0.1


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
