"""Probes on synthetic data with known signal: expression, BLEEP, label, mutation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hescape.evaluate.pearson import pearson_by_donor
from hescape.evaluate.probes import (
    donor_folds,
    expression_probe,
    label_probe,
    mutation_probe,
    retrieval_expression_probe,
    top_variable_genes,
)


def _linear(n=300, d=16, g=30, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d))
    expr = emb @ rng.normal(size=(d, g)) + noise * rng.normal(size=(n, g))
    donors = np.repeat(["a", "b", "c"], n // 3)
    return emb, expr, donors, [f"g{i}" for i in range(g)]


def test_expression_probe_finds_linear_signal_and_not_noise():
    emb, expr, donors, genes = _linear()
    tr, te = slice(0, 200), slice(200, 300)
    m, table = expression_probe(
        emb[tr], expr[tr], emb[te], expr[te], test_donors=donors[te], gene_names=genes, n_top=10
    )
    assert m["probe_pearson_mean"] > 0.95 and m["probe_pearson_median"] > 0.95
    assert m["probe_n_genes"] == 10 and len(table) == 10  # one held-out donor
    noise = np.random.default_rng(9).normal(size=emb.shape)
    m0, _ = expression_probe(
        noise[tr], expr[tr], noise[te], expr[te], test_donors=donors[te], gene_names=genes
    )
    assert abs(m0["probe_pearson_mean"]) < 0.15


def test_hvg_uses_train_rows_only():
    emb, expr, donors, genes = _linear(g=20)
    expr[:, :5] *= 10  # genes 0-4 most variable on train
    tr, te = slice(0, 200), slice(200, 300)
    test_expr = expr[te].copy()
    test_expr[:, 15:] *= 1000  # huge test variance in other genes must not change the choice
    _, table = expression_probe(
        emb[tr], expr[tr], emb[te], test_expr, test_donors=donors[te], gene_names=genes, n_top=5
    )
    assert sorted(table["gene"].unique()) == [f"g{i}" for i in range(5)]
    np.testing.assert_array_equal(top_variable_genes(expr[tr], 5), np.arange(5))


def test_per_donor_pearson_differs_from_concatenated():
    # within each donor prediction is anti-correlated, but donor means line up: pooled r > 0
    t1, t2 = np.array([0.0, 1, 2]), np.array([10.0, 11, 12])
    true = np.concatenate([t1, t2])[:, None]
    pred = np.concatenate([t1[::-1], t2[::-1]])[:, None]
    donors = np.array(["a"] * 3 + ["b"] * 3)
    m, _ = pearson_by_donor(pred, true, donors, ["g"], "probe")
    pooled = np.corrcoef(pred[:, 0], true[:, 0])[0, 1]
    assert m["probe_pearson_mean"] == pytest.approx(-1.0)
    assert pooled > 0.9


def test_constant_genes_are_skipped_and_counted():
    true = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    pred = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    m, table = pearson_by_donor(pred, true, np.array(["d"] * 3), ["x", "y"], "probe")
    assert m["probe_n_skipped_constant"] == 1
    assert m["probe_pearson_mean"] == pytest.approx(1.0)
    assert np.isnan(table.loc[table.gene == "y", "pearson"]).all()
    assert "probe_pearson_mean_donor_d" in m


def test_bleep_probe_retrieves_expression():
    emb, expr, donors, genes = _linear(noise=0.0)
    gene_emb = emb + 0.01  # a gene embedding aligned with the image one
    tr, te = slice(0, 200), slice(200, 300)
    m, _ = retrieval_expression_probe(
        gene_emb[tr], expr[tr], emb[te], expr[te], test_donors=donors[te], gene_names=genes, k=3
    )
    assert m["bleep_pearson_mean"] > 0.5 and m["bleep_k"] == 3


def test_label_probe():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=300)
    emb = np.eye(3)[y] * 3 + rng.normal(size=(300, 3))
    m = label_probe(emb[:200], y[:200].astype(str), emb[200:], y[200:].astype(str))
    assert m["label_balanced_accuracy"] > 0.8 and m["label_macro_f1"] > 0.8
    m0 = label_probe(rng.normal(size=(200, 3)), y[:200], rng.normal(size=(100, 3)), y[200:])
    assert m0["label_balanced_accuracy"] < 0.55


def _cohort(n_donors=8, slides=2, patches=20, signal=2.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_donors):
        lab = "mut" if d % 2 else "wt"
        for s in range(slides):
            for _ in range(patches):
                rows.append((f"d{d}", f"d{d}_s{s}", lab))
    donors, slides_, labels = map(np.array, zip(*rows, strict=True))
    emb = rng.normal(size=(len(rows), 8))
    emb[:, 0] += signal * (labels == "mut")
    return emb, donors, slides_, labels


def test_donor_folds_never_share_a_donor():
    _, donors, slides, labels = _cohort(n_donors=12)
    groups = np.unique(slides)
    g_donor = np.array([s.split("_")[0] for s in groups])
    g_lab = np.array([labels[slides == s][0] for s in groups])
    for n_folds in (3, 5, 20):
        folds = donor_folds(g_donor, g_lab, n_folds, seed=1)
        seen = np.concatenate([te for _, te in folds])
        assert sorted(seen) == list(range(len(groups)))  # each group tested exactly once
        for tr, te in folds:
            assert not set(g_donor[tr]) & set(g_donor[te])


def test_mutation_probe_signal_vs_noise():
    emb, donors, slides, labels = _cohort()
    m = mutation_probe(emb, group_ids=slides, labels=labels, donors=donors, cv_folds=4)
    assert m["mutation_auroc_pooled"] > 0.9 and m["mutation_n_donors"] == 8
    assert m["mutation_n_groups"] == 16 and m["mutation_few_donors"] == 0.0
    assert np.isfinite(m["mutation_auroc_sd"])
    # noise: 40 donors so chance AUROC has sd ~0.09 around 0.5
    emb0, donors0, slides0, labels0 = _cohort(n_donors=40, slides=1, patches=5, signal=0.0)
    m0 = mutation_probe(emb0, group_ids=slides0, labels=labels0, donors=donors0, cv_folds=4)
    assert abs(m0["mutation_auroc_pooled"] - 0.5) < 0.3


def test_mutation_probe_few_donors_flagged_and_attention_runs():
    emb, donors, slides, labels = _cohort(n_donors=4, patches=6)
    with pytest.warns(UserWarning, match="4 donors"):
        m = mutation_probe(
            emb, group_ids=donors, labels=labels, donors=donors, aggregate="attention"
        )
    assert m["mutation_few_donors"] == 1.0 and m["mutation_n_folds"] == 4  # leave-one-donor-out
    assert 0.0 <= m["mutation_balanced_accuracy_pooled"] <= 1.0


def test_mutation_probe_image_only_and_errors():
    emb, donors, slides, labels = _cohort(n_donors=6)
    labels = labels.astype(object)
    labels[:5] = None  # unlabelled patches are dropped, not an error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = mutation_probe(emb, group_ids=slides, labels=labels, donors=donors)
    assert np.isfinite(m["mutation_auroc_pooled"])
    mixed = np.array(labels, dtype=object)
    mixed[30] = "wt" if mixed[30] == "mut" else "mut"
    with pytest.raises(ValueError, match="mixes labels"):
        mutation_probe(emb, group_ids=slides, labels=mixed, donors=donors)
