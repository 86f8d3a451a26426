"""HEST-Benchmark's expression probe, pinned against a literal copy of HEST's own steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from hescape.metrics.hest import HestUnavailable, hest_predict, hest_probe


def _data(n_train=300, n_test=150, dim=300, genes=40, seed=0):
    """Counts driven by a latent the features see; spot library sizes vary 10x."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    latent = rng.normal(size=(n, 6))
    feats = latent @ rng.normal(size=(6, dim)) + rng.normal(size=(n, dim))
    library = rng.uniform(0.3, 3.0, size=(n, 1))
    counts = rng.poisson(library * np.exp(0.6 * latent @ rng.normal(size=(6, genes)))).astype(float)
    donors = np.repeat(["a", "b", "c"], n_test // 3)
    return feats[:n_train], counts[:n_train], feats[n_train:], counts[n_train:], donors


def _hest_train_test_reg(X_train, X_test, y_train, y_test, max_iter=1000, random_state=0):
    """mahmoodlab/HEST ``src/hest/bench/trainer.py::train_test_reg`` (method="ridge"),
    line for line (prints and the unused error/r2 lists left out)."""
    alpha = 100 / (X_train.shape[1] * y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=random_state, fit_intercept=False,
                max_iter=max_iter)  # fmt: skip
    reg.fit(X_train, y_train)
    preds_all = reg.predict(X_test)
    pearson_corrs = []
    for target in range(y_test.shape[1]):
        pearson_corr, _ = pearsonr(y_test[:, target], preds_all[:, target])
        pearson_corrs.append(pearson_corr)
    return np.array(pearson_corrs)


def _hest_predict_single_split(X_train, X_test, y_train, y_test, seed=0, tensor=torch.Tensor):
    """``benchmark.py::predict_single_split`` from the PCA step on (dimreduce="PCA",
    latent_dim=256): the PCA output wrapped in ``torch.Tensor`` as HEST does."""
    pipe = Pipeline([("scaler", StandardScaler()),
                     ("PCA", PCA(n_components=256, random_state=seed))])  # fmt: skip
    X_train, X_test = tensor(pipe.fit_transform(X_train)), tensor(pipe.transform(X_test))
    return _hest_train_test_reg(X_train, X_test, y_train, y_test, random_state=seed)


def _direct_hest(x_tr, y_tr, x_te, y_te):
    r = _hest_predict_single_split(x_tr, x_te, y_tr, y_te)
    return float(np.mean(r)), float(np.std(r))


def test_hest_probe_is_the_hest_recipe():
    x_tr, c_tr, x_te, c_te, donors = _data()
    names = [f"g{i}" for i in range(c_tr.shape[1])]
    m, table, per_donor = hest_probe(x_tr, c_tr, x_te, c_te, gene_names=names,
                                     test_donors=donors, n_top=10, seed=0)  # fmt: skip
    var = np.log1p(c_tr).var(axis=0)  # the 10 most variable genes of log1p counts, train rows
    genes = np.sort(np.argsort(-var, kind="stable")[:10])
    assert sorted(table["gene"]) == sorted(names[g] for g in genes)
    mean, std = _direct_hest(x_tr, np.log1p(c_tr[:, genes]), x_te, np.log1p(c_te[:, genes]))
    assert m["hest_pearson_mean"] == pytest.approx(mean, abs=1e-10)
    assert m["hest_pearson_std"] == pytest.approx(std, abs=1e-10)
    assert m["hest_pca_dim"] == 256 and m["hest_n_genes"] == 10
    assert (m["hest_n_train"], m["hest_n_test"]) == (300, 150)
    # targets are log1p of RAW counts: library-size normalisation gives another number
    norm = lambda c: np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)  # noqa: E731
    other, _ = _direct_hest(x_tr, norm(c_tr)[:, genes], x_te, norm(c_te)[:, genes])
    assert abs(other - m["hest_pearson_mean"]) > 0.02
    # the per-donor breakdown is the same predictions scored within each donor
    assert list(per_donor["donor"]) == ["a", "b", "c"] and set(per_donor["n"]) == {50}
    assert per_donor["metric"].unique().tolist() == ["hest_pearson_mean_within_donor"]


def test_sparse_counts_give_the_same_figure():
    x_tr, c_tr, x_te, c_te, donors = _data(seed=1)
    names = [f"g{i}" for i in range(c_tr.shape[1])]
    dense, _, _ = hest_probe(x_tr, c_tr, x_te, c_te, gene_names=names, test_donors=donors)
    sp, _, _ = hest_probe(x_tr, sparse.csr_matrix(c_tr), x_te, sparse.csr_matrix(c_te),
                          gene_names=names, test_donors=donors)  # fmt: skip
    assert sp["hest_pearson_mean"] == pytest.approx(dense["hest_pearson_mean"], abs=1e-12)


@pytest.mark.parametrize(("n_train", "dim", "says"), [
    (300, 128, "the features have 128 dimensions"),
    (200, 300, "there are 200 training rows"),
    (100, 64, "64 dimensions and there are 100 training rows"),
])  # fmt: skip
def test_too_small_for_pca_256_is_refused_saying_which(n_train, dim, says):
    x_tr, c_tr, x_te, c_te, donors = _data(n_train=n_train, dim=dim)
    names = [f"g{i}" for i in range(c_tr.shape[1])]
    with pytest.raises(HestUnavailable, match=says):
        hest_probe(x_tr, c_tr, x_te, c_te, gene_names=names, test_donors=donors)


@pytest.mark.parametrize("feat_dtype", [np.float64, np.float32])
def test_per_gene_pearson_equals_hest_train_test_reg_to_1e10(feat_dtype):
    # per gene, against HEST's own steps (torch.Tensor wrapping included): sklearn converts
    # the tensor to float64, so the ridge runs in float64 whatever the features' dtype
    x_tr, c_tr, x_te, c_te, donors = _data(n_train=600, n_test=300, dim=320, genes=50, seed=2)
    x_tr, x_te = x_tr.astype(feat_dtype), x_te.astype(feat_dtype)
    names = [f"g{i}" for i in range(c_tr.shape[1])]
    _, table, _ = hest_probe(x_tr, c_tr, x_te, c_te, gene_names=names, test_donors=donors,
                             n_top=50, seed=0)  # fmt: skip
    y_tr, y_te = np.log1p(c_tr), np.log1p(c_te)  # all 50 genes, float64 as normalize_adata
    hest_r = _hest_predict_single_split(x_tr, x_te, y_tr, y_te, seed=0)
    assert np.abs(table["pearson"].to_numpy() - hest_r).max() < 1e-10
    # the test can fail: a float32 ridge (numpy float32 input stays float32 in sklearn) is
    # measurably off HEST's number on the same data
    f32 = _hest_predict_single_split(x_tr, x_te, y_tr, y_te, seed=0,
                                     tensor=lambda a: np.asarray(a, dtype=np.float32))  # fmt: skip
    assert np.abs(f32 - hest_r).max() > 1e-7
    pred = hest_predict(x_tr, y_tr, x_te, seed=0)
    assert pred.dtype == np.float64
