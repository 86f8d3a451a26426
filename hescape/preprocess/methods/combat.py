"""``combat``: ComBat (Johnson, Li & Rabinovic 2007) on log-normalised expression.

The parametric empirical-Bayes location/scale model, computed as scanpy's ``sc.pp.combat``
does (same standardisation, priors and iterative solution; equal output on every row when
fitted on all rows, tested), with an inductive mode scanpy lacks:

- ``inductive`` (default): the reference (gene-wise grand mean, pooled variance), each
  training batch's EB estimates and the EB hyperpriors (pooled over training batches) are
  estimated on training rows only. Each held-out batch (donor) is standardised with the
  training reference and adjusted from its own cells only: its location/scale estimates
  are shrunk towards the training hyperpriors. Training rows never depend on held-out rows.
- ``transductive``: every row (held-out donors included) is a batch of one ComBat fit.

Genes with zero pooled variance are left at their mean, as in scanpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from hescape.preprocess.expression import MethodInput, MethodOutput
from hescape.preprocess.spec import MethodOptions, MethodSpec, register

CONV = 1e-4  # relative change that ends the EB iteration (scanpy's default)
MAX_ITER = 1000


class CombatOptions(MethodOptions):
    mode: Literal["inductive", "transductive"] = "inductive"


@dataclass
class Prior:
    """EB hyperparameters: normal prior on gamma (mean, var), inverse gamma on delta (a, b)."""

    gamma_bar: float
    t2: float
    a: float
    b: float

    @classmethod
    def of(cls, gamma_hat: np.ndarray, delta_hat: np.ndarray) -> Prior:
        """Method-of-moments hyperparameters from estimates across genes (and batches)."""
        m, s2 = float(np.mean(delta_hat)), float(np.var(delta_hat, ddof=1))
        s2 = max(s2, 1e-12)
        return cls(float(np.mean(gamma_hat)), float(np.var(gamma_hat)),
                   (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2)


@dataclass
class Reference:
    """What training rows fix: grand mean and pooled variance per gene."""

    mean: np.ndarray
    var: np.ndarray

    def standardise(self, y: np.ndarray) -> np.ndarray:
        """(y - mean) / sd in one new array; genes with zero variance are 0."""
        sd = np.sqrt(self.var)
        out = np.subtract(y, self.mean)
        np.divide(out, sd, out=out, where=sd > 0)
        out[:, sd <= 0] = 0.0
        return out

    def restore(self, s: np.ndarray) -> np.ndarray:
        return s * np.sqrt(self.var) + self.mean


def fit_reference(y: np.ndarray, members: list[np.ndarray]) -> Reference:
    """Grand mean and pooled within-batch variance of the fitting rows, ``members[b]`` being
    batch b's row indices (one batch in memory at a time)."""
    total, sq = np.zeros(y.shape[1]), np.zeros(y.shape[1])
    for rows in members:
        block = y[rows]
        total += block.sum(axis=0)
        sq += ((block - block.mean(axis=0)) ** 2).sum(axis=0)
    n = sum(len(rows) for rows in members)
    return Reference(mean=total / n, var=sq / n)


def eb_solve(s: np.ndarray, prior: Prior, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior (gamma*, delta*) of one batch's standardised cells ``s`` (n x G).

    The iteration of Johnson et al. (scanpy's ``_it_sol``); convergence is judged on
    ``active`` genes (non-zero pooled variance) only.
    """
    n = s.shape[0]
    g_hat, d_hat = s.mean(axis=0), s.var(axis=0, ddof=1)
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(MAX_ITER):
        g_new = (prior.t2 * n * g_hat + d_old * prior.gamma_bar) / (prior.t2 * n + d_old)
        d_new = (0.5 * ((s - g_new) ** 2).sum(axis=0) + prior.b) / (n / 2.0 + prior.a - 1.0)
        change = max(_rel(g_new, g_old, active), _rel(d_new, d_old, active))
        g_old, d_old = g_new, d_new
        if change <= CONV:
            break
    return g_old, d_old


def _rel(new: np.ndarray, old: np.ndarray, active: np.ndarray) -> float:
    if not active.any():
        return 0.0
    return float(np.max(np.abs(new - old)[active] / np.maximum(np.abs(old[active]), 1e-12)))


def combat(y: np.ndarray, batches: np.ndarray, fit_rows: np.ndarray) -> tuple[np.ndarray, dict]:
    """ComBat-adjusted ``y`` (N x G, float64): fitted on ``fit_rows``, other rows mapped.

    Memory: one N x G float64 array besides ``y`` (the standardised matrix, adjusted in
    place into the result) plus one batch at a time.
    """
    names, codes = np.unique(batches[fit_rows], return_inverse=True)
    fit_idx = np.flatnonzero(fit_rows)
    members = [fit_idx[codes == b] for b in range(len(names))]
    ref = fit_reference(y, members)
    active = ref.var > 0
    s = ref.standardise(y)
    gamma_hat = np.stack([s[rows].mean(axis=0) for rows in members])
    delta_hat = np.stack([s[rows].var(axis=0, ddof=1) for rows in members])
    fitted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for b, name in enumerate(names):
        fitted[str(name)] = eb_solve(s[members[b]], Prior.of(gamma_hat[b], delta_hat[b]), active)
    pooled = Prior.of(gamma_hat, delta_hat)  # the prior a new (held-out) batch is shrunk to
    new_batches = sorted(set(batches[~fit_rows]) - set(fitted))
    for name in new_batches:
        fitted[name] = eb_solve(s[(batches == name) & ~fit_rows], pooled, active)
    for name, (gs, ds) in fitted.items():  # every estimate is made: adjust s in place
        rows = np.flatnonzero(batches == name)
        s[rows] = ref.restore((s[rows] - gs) / np.sqrt(ds))
    info = {"n_batches_fitted": int(len(names)), "heldout_batches_mapped": len(new_batches),
            "n_zero_variance_genes": int((~active).sum())}
    return s, info


def run(inp: MethodInput, opts: CombatOptions) -> MethodOutput:
    """Corrected log-expression of the selected genes (N x G), possibly negative."""
    x = inp.log_expression()
    genes = inp.genes(x)
    inductive = opts.mode == "inductive"
    fit_rows = inp.train_mask if inductive else np.ones(inp.adata.n_obs, dtype=bool)
    y = x.astype(np.float64) if len(genes) == x.shape[1] else x[:, genes].astype(np.float64)
    del x  # float32 copy no longer needed
    out, info = combat(y, inp.batches, fit_rows)
    del y
    info.update(n_genes=int(len(genes)), mode=opts.mode,
                fit_rows="training" if inductive else "all")
    if inductive and not fit_rows.all():
        info["heldout_mapping"] = "own cells, training reference and priors"
    return MethodOutput(X=out.astype(np.float32), feature_names=inp.gene_names(genes), info=info)


SPEC = register(MethodSpec(
    name="combat",
    summary="ComBat empirical-Bayes location/scale correction of log expression",
    run=run,
    options=CombatOptions,
    needs_batches=True,
    heldout="inductive: each held-out donor standardised with the training reference and "
            "adjusted from its own cells, shrunk to training priors; transductive: one fit "
            "over every donor",
    output="features",  # corrected log-expression can be negative
    protocols=("inductive", "transductive"),
    version=2,  # numpy ComBat with inductive mode (v1: scanpy, transductive, NaN -> 0)
))
