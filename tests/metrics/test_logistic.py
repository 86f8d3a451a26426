"""The exact Newton logistic regression is sklearn's StandardScaler + balanced L2 model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hescape.metrics.logistic import fit_binary_logistic


def _sklearn(x, y, tol=1e-12):
    model = make_pipeline(StandardScaler(), LogisticRegression(
        class_weight="balanced", tol=tol, max_iter=100_000))  # fmt: skip
    return model.fit(x, y)


@pytest.mark.parametrize(("n", "dim", "imbalance"), [(40, 8, 20), (38, 64, 12), (30, 1280, 10)])
def test_same_optimum_as_sklearn(n, dim, imbalance):
    # few and many features (the optimum lies in the rows' span), unbalanced classes, a
    # constant column (StandardScaler leaves it unscaled)
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(n + 15, dim)) * rng.uniform(0.1, 5, dim)
    y = (np.arange(n + 15) < imbalance).astype(int)
    x[:, 0] += 1.5 * y
    x[:, 1] = 3.0
    tr, te = np.arange(n), np.arange(n, n + 15)
    ours = fit_binary_logistic(x[tr], y[tr])
    ref = _sklearn(x[tr], y[tr])
    d_ours, d_ref = ours.decision(x[te]), ref.decision_function(x[te])
    assert np.max(np.abs(d_ours - d_ref)) <= 1e-5 * np.max(np.abs(d_ref))
    assert np.allclose(ours.proba(x[te]), ref.predict_proba(x[te]), atol=1e-6)
    # sklearn's default (L-BFGS stopping at gradient 1e-4) is further from that optimum
    loose = _sklearn(x[tr], y[tr], tol=1e-4).decision_function(x[te])
    assert np.max(np.abs(d_ours - d_ref)) < np.max(np.abs(loose - d_ref))


def test_separable_data_still_converge_to_the_penalised_optimum():
    x = np.r_[np.zeros((5, 3)), np.ones((5, 3))] + np.arange(3) * 0.01
    y = np.r_[np.zeros(5), np.ones(5)].astype(int)
    ours = fit_binary_logistic(x, y)
    assert np.allclose(ours.decision(x), _sklearn(x, y).decision_function(x), atol=1e-6)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="labels 0 and 1"):
        fit_binary_logistic(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="do not match"):
        fit_binary_logistic(np.ones((4, 2)), np.zeros(3))
