"""Probes on synthetic data with known signal: per-donor ridge, BLEEP, label (logistic, kNN)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hescape.metrics.pearson import pearson_by_donor, per_donor_means
from hescape.metrics.probes import (
    label_probe,
    retrieval_expression_probe,
    ridge_per_donor_probe,
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
    m, table = ridge_per_donor_probe(
        emb[tr], expr[tr], emb[te], expr[te], test_donors=donors[te], gene_names=genes, n_top=10
    )
    assert m["ridge_per_donor_pearson_mean"] > 0.95 and m["ridge_per_donor_pearson_median"] > 0.95
    assert m["ridge_per_donor_n_genes"] == 10 and len(table) == 10  # one held-out donor
    assert m["ridge_per_donor_pca_dim"] == 16  # capped at the feature dimension, and says so
    noise = np.random.default_rng(9).normal(size=emb.shape)
    m0, _ = ridge_per_donor_probe(
        noise[tr], expr[tr], noise[te], expr[te], test_donors=donors[te], gene_names=genes
    )
    assert abs(m0["ridge_per_donor_pearson_mean"]) < 0.15


def test_hvg_uses_train_rows_only():
    emb, expr, donors, genes = _linear(g=20)
    expr[:, :5] *= 10  # genes 0-4 most variable on train
    tr, te = slice(0, 200), slice(200, 300)
    test_expr = expr[te].copy()
    test_expr[:, 15:] *= 1000  # huge test variance in other genes must not change the choice
    _, table = ridge_per_donor_probe(
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
    m, _ = pearson_by_donor(pred, true, donors, ["g"], "ridge_per_donor")
    pooled = np.corrcoef(pred[:, 0], true[:, 0])[0, 1]
    assert m["ridge_per_donor_pearson_mean"] == pytest.approx(-1.0)
    assert pooled > 0.9


def test_constant_genes_are_skipped_and_counted():
    true = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    pred = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    m, table = pearson_by_donor(pred, true, np.array(["d"] * 3), ["x", "y"], "bleep")
    assert m["bleep_n_skipped_constant"] == 1
    assert m["bleep_pearson_mean"] == pytest.approx(1.0)
    assert np.isnan(table.loc[table.gene == "y", "pearson"]).all()
    per = per_donor_means(table, "bleep_pearson_mean")
    assert per.to_dict("records") == [
        {"metric": "bleep_pearson_mean", "donor": "d", "value": 1.0, "n": 3}
    ]


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


def _knn_data(train_x, train_y, test_x, test_y):
    from hescape.config import EvalConfig
    from hescape.evaluate.probe_spec import EvalData

    x = np.vstack([train_x, test_x])
    y = np.concatenate([train_y, test_y]).astype(object)
    obs = pd.DataFrame({"donor": ["d0"] * len(train_x) + ["d1"] * len(test_x), "state": y})
    n = len(train_x)
    return x, EvalData(obs=obs, img=x, train_idx=np.arange(n), test_idx=np.arange(n, len(x)),
                       cfg=EvalConfig(), label_key="state")  # fmt: skip


def test_knn_label_probe_signal_and_noise():
    from hescape.evaluate.suite import KNN_K, knn_label

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=400).astype(str)
    x = np.eye(3)[y.astype(int)] * 3 + rng.normal(size=(400, 3))
    feats, data = _knn_data(x[:300], y[:300], x[300:], y[300:])
    m = knn_label(feats, data).metrics
    assert m["knn_label_balanced_accuracy"] > 0.8 and m["knn_label_k"] == KNN_K
    assert m["knn_label_n_test"] == 100
    feats0, data0 = _knn_data(rng.normal(size=(300, 3)), y[:300], rng.normal(size=(100, 3)), y[300:])
    assert knn_label(feats0, data0).metrics["knn_label_balanced_accuracy"] < 0.5


def test_knn_label_vote_and_tie_break():
    from hescape.evaluate.suite import KNN_K, knn_label

    assert KNN_K == 15  # 15 training spots: all are neighbours; votes a 7, b 7, c 1
    angles = np.array([0.3] * 7 + [0.1] + [0.5] * 6 + [0.05])  # nearest: c, then b
    labels = np.array(["a"] * 7 + ["b"] * 7 + ["c"])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    feats, data = _knn_data(train, labels, np.array([[1.0, 0.0]]), np.array(["b"]))
    assert knn_label(feats, data).metrics["knn_label_balanced_accuracy"] == 1.0  # b beat a
    feats, data = _knn_data(train[::-1] * [1, -1], labels[::-1], np.array([[1.0, 0.0]]),
                            np.array(["b"]))  # fmt: skip
    assert knn_label(feats, data).metrics["knn_label_balanced_accuracy"] == 1.0  # order-free
