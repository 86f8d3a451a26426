"""``harmony``: Harmony (harmonypy 2.x) on PCA, inductive (Symphony-style query mapping)
or transductive; options under ``preprocess.expression.harmony``.

- ``inductive`` (default): PCA fitted on training rows, Harmony run on training rows only. Held-out
  donors are new batches that Harmony never saw, so they cannot reuse a learned per-batch
  offset; they are mapped as queries the way Symphony (Kang et al. 2021) maps onto a Harmony
  reference: soft-assign each held-out cell to the frozen reference centroids, then per
  cluster fit a ridge regression of that donor's offset (the intercept pinned by the
  reference's corrected statistics) and remove it. Each held-out donor is corrected from its
  own unlabelled cells only; the training representation never depends on held-out data.
- ``transductive`` (common practice, e.g. BLEEP): PCA and Harmony over every row,
  held-out donors included; flagged ``saw_heldout=True``.

harmonypy 2.x returns ``Z_corr`` as cells x PCs; it reports convergence only through its
logger, which we capture into ``info`` (``converged``, ``iterations``, ``log``).
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import numpy as np
from pydantic import Field

from hescape.preprocess.expression import MethodInput, MethodOutput
from hescape.preprocess.methods.pca import log_pcs
from hescape.preprocess.spec import MethodOptions, MethodSpec, register

QUERY_RIDGE = 1.0  # Symphony's default lambda for query batch terms
MAX_ITER = 20


class HarmonyOptions(MethodOptions):
    n_pcs: int = Field(30, ge=2, description="PCs Harmony corrects")
    theta: float = Field(2.0, ge=0.0, description="diversity penalty")
    sigma: float = Field(0.1, gt=0.0, description="soft-clustering width")
    mode: Literal["inductive", "transductive"] = "inductive"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_harmony(z: np.ndarray, batches: np.ndarray, *, theta: float, sigma: float,
                seed: int = 0):
    """harmonypy.run_harmony with its log captured; returns (Harmony, info)."""
    import harmonypy

    log = logging.getLogger("harmonypy")
    saved = (log.handlers[:], log.propagate)
    cap = _Capture()
    log.handlers, log.propagate = [cap], False
    try:
        ho = harmonypy.run_harmony(z, {"batch": batches}, "batch", theta=theta, sigma=sigma,
                                   max_iter_harmony=MAX_ITER, random_state=seed, ncores=1,
                                   verbose=True)
    finally:
        log.handlers, log.propagate = saved
    text = [ln.strip() for ln in cap.lines if ln.strip()]
    stopped = any("before convergence" in ln for ln in text)
    conv = [ln for ln in text if "Converged after" in ln]
    iters = re.findall(r"(\d+)", conv[-1]) if conv else []
    info = {"converged": bool(conv) and not stopped,
            "iterations": int(iters[0]) if iters else len(ho.objective_harmony),
            "max_iter_harmony": MAX_ITER, "n_clusters": int(ho.K),
            "log": [ln for ln in text if "onverge" in ln or "Iteration" in ln][-5:]}
    return ho, info


def symphony_map(ho, z_ref_corr: np.ndarray, z_query: np.ndarray, query_batches: np.ndarray,
                 *, sigma: float, ridge: float = QUERY_RIDGE) -> np.ndarray:
    """Correct query cells (N_q x d, reference PCA space) against a Harmony reference."""
    y = np.asarray(ho.Y, dtype=np.float64)  # d x K, unit-norm centroids
    r_ref = np.asarray(ho.R, dtype=np.float64)  # N_ref x K
    nr = r_ref.sum(axis=0)  # K
    c = r_ref.T @ z_ref_corr.astype(np.float64)  # K x d
    zq = z_query.astype(np.float64)
    zq_cos = zq / np.maximum(np.linalg.norm(zq, axis=1, keepdims=True), 1e-12)
    logits = -2.0 * (1.0 - zq_cos @ y) / sigma
    logits -= logits.max(axis=1, keepdims=True)
    rq = np.exp(logits)
    rq /= rq.sum(axis=1, keepdims=True)  # N_q x K
    names, codes = np.unique(query_batches, return_inverse=True)
    phi = np.zeros((len(zq), len(names) + 1))
    phi[:, 0] = 1.0
    phi[np.arange(len(zq)), codes + 1] = 1.0
    penalty = np.diag([0.0] + [ridge] * len(names))
    out = zq.copy()
    for k in range(y.shape[1]):
        phi_r = phi * rq[:, k : k + 1]  # N_q x (B+1)
        a = phi_r.T @ phi + penalty
        a[0, 0] += nr[k]
        b = phi_r.T @ zq
        b[0] += c[k]
        w = np.linalg.solve(a, b)
        w[0] = 0.0  # keep the intercept (the cluster's position)
        out -= phi_r @ w
    return out.astype(np.float32)


def run(inp: MethodInput, opts: HarmonyOptions) -> MethodOutput:
    """Harmony on PCs; ``opts.mode`` picks inductive or transductive (see module doc)."""
    inductive = opts.mode == "inductive"
    fit_rows = inp.train_mask if inductive else np.ones(inp.adata.n_obs, dtype=bool)
    z, info = log_pcs(inp, opts.n_pcs, fit_rows)
    ho, hinfo = run_harmony(z[fit_rows], inp.batches[fit_rows], theta=opts.theta,
                            sigma=opts.sigma)
    info.update(hinfo, mode=opts.mode)
    out = np.empty_like(z)
    out[fit_rows] = np.asarray(ho.Z_corr, dtype=np.float32)
    if inductive and not fit_rows.all():
        held = ~fit_rows
        out[held] = symphony_map(ho, out[fit_rows], z[held], inp.batches[held], sigma=opts.sigma)
        info["heldout_mapping"] = "symphony"
    return MethodOutput(X=out, feature_names=[f"harmony_{i + 1}" for i in range(out.shape[1])],
                        info=info)


SPEC = register(MethodSpec(
    name="harmony",
    summary="Harmony (harmonypy) on PCs of log-normalised expression",
    run=run,
    options=HarmonyOptions,
    needs_batches=True,
    heldout="inductive: held-out donors mapped onto the frozen training reference "
            "(Symphony); transductive: fitted on every donor",
    output="features",
    protocols=("inductive", "transductive"),
    legacy_keys={"n_pcs": "n_pcs", "theta": "theta", "sigma": "sigma", "harmony_mode": "mode"},
))
