"""Binary L2 logistic regression for small probes, solved exactly by Newton's method.

The mutation probe fits thousands of tiny models (tens of groups, 64-1280 features) for its
permutation test; sklearn's ``LogisticRegression`` spends ~5 ms of Python and L-BFGS
overhead on each. This module fits the SAME model as
``make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced"))``:

- features standardised with the training rows' mean and population sd (a constant
  feature gets scale 1, as ``StandardScaler``);
- minimise ``sum_i s_i logloss(y_i, x_i w + b) + ||w||^2 / (2 C)`` with the intercept
  unpenalised and ``s_i = n / (2 n_{y_i})`` (``class_weight="balanced"``), which is
  sklearn's objective up to the constant factor ``1 / sum(s)``;
- the optimum ``w`` lies in the row space of the training features, so the problem is
  solved in that space (``r = rank <= n_rows`` coordinates from the Gram matrix) with Newton
  steps and backtracking until the gradient is below ``tol`` (1e-10 by default, where
  sklearn's L-BFGS stops at 1e-4; tests/metrics/test_logistic.py compares the two).

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryLogistic:
    """A fitted model: standardisation, coefficients and intercept."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        """``x w + b`` on standardised ``x`` (the log-odds of class 1)."""
        return (
            (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        ) @ self.coef + self.intercept

    def proba(self, x: np.ndarray) -> np.ndarray:
        """(n, 2) probabilities of class 0 and class 1."""
        p1 = _sigmoid(self.decision(x))
        return np.column_stack([1.0 - p1, p1])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _objective(z: np.ndarray, y: np.ndarray, s: np.ndarray, w: np.ndarray, c: float) -> float:
    # log(1 + e^z) - y z, stably
    return float(np.sum(s * (np.logaddexp(0.0, z) - y * z)) + w @ w / (2.0 * c))


def fit_binary_logistic(x: np.ndarray, y: np.ndarray, *, c: float = 1.0, tol: float = 1e-10,
                        max_iter: int = 100) -> BinaryLogistic:  # fmt: skip
    """Fit the standardised, class-balanced L2 logistic regression (module docstring).

    ``y`` holds 0/1 with both present. Raises ``ValueError`` otherwise, or when Newton's
    method has not reached ``tol`` after ``max_iter`` steps.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"fit_binary_logistic: x {x.shape} and y {y.shape} do not match")
    n_pos = float(y.sum())
    if not set(np.unique(y)) == {0.0, 1.0}:
        raise ValueError("fit_binary_logistic needs labels 0 and 1, both present")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0.0] = 1.0  # StandardScaler leaves a constant feature unscaled
    xs = (x - mean) / scale
    n = len(y)
    s = np.where(y == 1.0, n / (2.0 * n_pos), n / (2.0 * (n - n_pos)))
    # row space of xs = u diag(sv) v^T from the Gram matrix (n x n, cheap when d >> n):
    # w = v beta with v = xs^T u / sv, so ||w|| = ||beta|| and xs w = (u sv) beta
    lam, u = np.linalg.eigh(xs @ xs.T)
    keep = lam > max(lam.max(initial=0.0), 0.0) * max(xs.shape) * np.finfo(np.float64).eps
    sv = np.sqrt(lam[keep])
    z_basis = u[:, keep] * sv  # n x r coordinates of the rows
    r = z_basis.shape[1]
    design = np.column_stack([z_basis, np.ones(n)])
    theta = np.zeros(r + 1)  # beta, then the intercept
    penalty = np.r_[np.full(r, 1.0 / c), 0.0]
    z = design @ theta
    f = _objective(z, y, s, theta[:r], c)
    for _ in range(max_iter):
        p = _sigmoid(z)
        grad = design.T @ (s * (p - y)) + penalty * theta
        if np.max(np.abs(grad)) <= tol * max(1.0, s.sum()):
            break
        hess = (design * (s * p * (1.0 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        t, decrease = 1.0, grad @ step
        # near the optimum the decrease is below rounding of f: take the full Newton step
        slack = 1e-12 * abs(f) if decrease <= 1e-9 * max(1.0, abs(f)) else 0.0
        while True:
            cand = theta - t * step
            z_new = design @ cand
            f_new = _objective(z_new, y, s, cand[:r], c)
            if f_new <= f - 1e-4 * t * decrease + slack or t < 1e-10:
                break
            t *= 0.5
        theta, z, f = cand, z_new, f_new
    else:
        raise ValueError(f"fit_binary_logistic: Newton did not converge in {max_iter} steps")
    coef = xs.T @ (u[:, keep] @ (theta[:r] / sv))
    return BinaryLogistic(mean=mean, scale=scale, coef=coef, intercept=float(theta[r]))
