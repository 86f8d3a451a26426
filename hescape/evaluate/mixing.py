"""Batch-mixing and biology-conservation metrics of an embedding (scib definitions, own code).

scib-metrics needs JAX, which the default install does not carry, so the definitions are
re-implemented here with numpy / scipy / scikit-learn and checked against them in tests:

- ``ilisi``: integration LISI (Korsunsky et al. 2019). Per cell, the inverse Simpson's index
  of batch over a Gaussian-kernel neighbourhood calibrated to ``perplexity`` (30, scib's
  default) on the ``3 * perplexity`` nearest neighbours (as harmony's ``compute_lisi`` and
  scib-metrics' 90-neighbour graph); the median over cells is scaled as scib does:
  ``(median - 1) / (n_batches - 1)`` -> 0 separated, 1 mixed. Like scib's, the figure has a
  finite-neighbourhood bias: randomly mixed data scores ~0.9 with 2 batches, ~0.7 with 5.
- ``kbet``: kBET acceptance rate (Buttner et al. 2019): per cell, a chi-square test of the
  batch counts among its k nearest neighbours against the global batch frequencies
  (alpha 0.05); the fraction of cells not rejected. ``k = max(n_neighbors, 5 * n_batches)``
  so every expected count is >= 5. Global, not per label (scib runs it per label).
- ``graph_connectivity`` (labels only): per label, the size of the largest connected
  component of the (symmetrised) kNN graph restricted to that label, over the label size;
  mean over labels.
- ``silhouette_batch``: scib's batch ASW, ``1 - |silhouette(batch)|`` per cell within each
  label (over all cells without labels), mean per label, mean over labels.
- ``nmi`` / ``ari`` (labels only): KMeans with ``n_clusters = n labels`` over a few seeds;
  the clustering with the best NMI is kept (scib keeps the best Leiden resolution likewise).
- ``silhouette_label`` (labels only): ``(ASW(labels) + 1) / 2``.

Large inputs are subsampled (stratified by batch, seeded); ``subsample_n`` and
``subsample_seed`` are returned beside the metrics. With a single batch the batch metrics
are NaN (nothing to mix), not an error: a held-out split may hold one donor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse, stats
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

BATCH_KEYS = ("ilisi", "kbet", "silhouette_batch")
BIO_KEYS = ("graph_connectivity", "nmi", "ari", "silhouette_label")
KMEANS_SEEDS = 3
KBET_ALPHA = 0.05


def mixing_metrics(
    emb: Any,
    batch: Any,
    labels: Any = None,
    *,
    n_neighbors: int = 15,
    subsample: int | None = 5000,
    seed: int = 0,
    perplexity: float = 30.0,
) -> dict[str, float]:
    """Batch-mixing (and, with ``labels``, biology-conservation) metrics of ``emb`` (N x D).

    Returns ``ilisi, kbet, silhouette_batch`` (+ ``graph_connectivity, nmi, ari,
    silhouette_label`` with labels) in [0, 1], higher is better, plus ``subsample_n`` and
    ``subsample_seed``. ``subsample=None`` uses every row. ``n_neighbors`` sets the kNN graph
    (graph connectivity, kBET); ``perplexity`` the iLISI neighbourhood.
    """
    x, b, y = _check_inputs(emb, batch, labels, n_neighbors)
    idx = stratified_subsample(b, subsample, seed=seed)
    x, b = x[idx], b[idx]
    y = y[idx] if y is not None else None
    _, b_codes = np.unique(b, return_inverse=True)
    n_batches = int(b_codes.max()) + 1
    out: dict[str, float] = {}
    k_kbet = max(n_neighbors, 5 * n_batches)
    kmax = min(max(int(3 * perplexity), k_kbet, n_neighbors), len(x) - 1)
    nn_idx, nn_dist = _knn(x, kmax)
    if n_batches < 2:
        out.update({k: float("nan") for k in BATCH_KEYS})
    else:
        out["ilisi"] = ilisi_scaled(nn_idx, nn_dist, b_codes, perplexity=perplexity)
        out["kbet"] = kbet_acceptance(nn_idx[:, : min(k_kbet, kmax)], b_codes)
        out["silhouette_batch"] = silhouette_batch(x, b_codes, y)
    if y is not None:
        out["graph_connectivity"] = graph_connectivity(nn_idx[:, : min(n_neighbors, kmax)], y)
        out.update(cluster_agreement(x, y, seed=seed))
        out["silhouette_label"] = silhouette_label(x, y)
    out["subsample_n"] = float(len(idx))
    out["subsample_seed"] = float(seed)
    return out


# ----------------------------------------------------------------------------- inputs
def _check_inputs(emb: Any, batch: Any, labels: Any, n_neighbors: int):
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"emb must be 2-D (cells x dims), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("emb contains NaN or inf; fix the embedding before measuring mixing")
    b = _as_labels(batch, "batch", len(x))
    y = _as_labels(labels, "labels", len(x)) if labels is not None else None
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    if len(x) < n_neighbors + 2:
        raise ValueError(f"need at least n_neighbors + 2 = {n_neighbors + 2} cells, got {len(x)}")
    return x, b, y


def _as_labels(values: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=object)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be 1-D with one entry per row of emb ({n}), got {arr.shape}")
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in arr])
    if missing.any():
        raise ValueError(f"{name} has {int(missing.sum())} missing values (NaN/None), e.g. row "
                         f"{int(np.flatnonzero(missing)[0])}; drop or fill them first")
    return arr.astype(str)


def stratified_subsample(batch: np.ndarray, n: int | None, *, seed: int = 0) -> np.ndarray:
    """Sorted row indices: ``n`` rows drawn per batch in proportion to its size (seeded)."""
    total = len(batch)
    if n is None or n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    values, codes = np.unique(np.asarray(batch).astype(str), return_inverse=True)
    picks = []
    for code in range(len(values)):
        members = np.flatnonzero(codes == code)
        take = min(len(members), max(1, int(round(n * len(members) / total))))
        picks.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picks))


def _knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    nn = NearestNeighbors(n_neighbors=k).fit(x)
    dist, idx = nn.kneighbors()  # query=None: a point is not its own neighbour
    return idx, dist


# ----------------------------------------------------------------------- batch metrics
def lisi(nn_idx: np.ndarray, nn_dist: np.ndarray, codes: np.ndarray, *, perplexity: float,
         n_iter: int = 50, tol: float = 1e-5) -> np.ndarray:
    """Per-cell LISI: inverse Simpson's index of ``codes`` under perplexity-calibrated weights."""
    d = nn_dist - nn_dist[:, :1]  # shift: the entropy is invariant, exp() no longer underflows
    log_u = np.log(min(perplexity, d.shape[1]))
    n = len(d)
    beta = np.ones(n)
    lo = np.full(n, -np.inf)
    hi = np.full(n, np.inf)
    for _ in range(n_iter):
        p = np.exp(-d * beta[:, None])
        p_sum = p.sum(1)
        h = np.log(p_sum) + beta * (d * p).sum(1) / p_sum
        diff = h - log_u
        if np.all(np.abs(diff) < tol):
            break
        up = diff > 0  # entropy too high: sharpen (raise beta)
        lo = np.where(up, beta, lo)
        hi = np.where(up, hi, beta)
        beta = np.where(up, np.where(np.isinf(hi), beta * 2, (beta + hi) / 2),
                        np.where(np.isinf(lo), beta / 2, (beta + lo) / 2))
    p = np.exp(-d * beta[:, None])
    p /= p.sum(1, keepdims=True)
    nb = codes[nn_idx]
    simpson = np.zeros(n)
    for c in range(int(codes.max()) + 1):
        simpson += ((nb == c) * p).sum(1) ** 2
    return 1.0 / simpson


def ilisi_scaled(nn_idx: np.ndarray, nn_dist: np.ndarray, codes: np.ndarray, *,
                 perplexity: float) -> float:
    """scib's scaled iLISI: ``(median LISI - 1) / (n_batches - 1)``, in [0, 1]."""
    n_batches = int(codes.max()) + 1
    k = min(int(3 * perplexity), nn_idx.shape[1])
    score = np.median(lisi(nn_idx[:, :k], nn_dist[:, :k], codes, perplexity=perplexity))
    return float(np.clip((score - 1) / (n_batches - 1), 0.0, 1.0))


def kbet_acceptance(nn_idx: np.ndarray, codes: np.ndarray, *, alpha: float = KBET_ALPHA) -> float:
    """Fraction of cells whose neighbourhood batch counts pass a chi-square test (global freqs)."""
    n_batches = int(codes.max()) + 1
    freq = np.bincount(codes, minlength=n_batches) / len(codes)
    k = nn_idx.shape[1]
    nb = codes[nn_idx]
    counts = np.stack([(nb == c).sum(1) for c in range(n_batches)], axis=1)
    expected = k * freq[None, :]
    chi2 = ((counts - expected) ** 2 / expected).sum(1)
    pvals = stats.chi2.sf(chi2, df=n_batches - 1)
    return float((pvals >= alpha).mean())


def silhouette_batch(x: np.ndarray, codes: np.ndarray, labels: np.ndarray | None) -> float:
    """scib's batch ASW: mean over labels of mean(1 - |silhouette(batch)|) within the label."""
    groups = [np.arange(len(x))] if labels is None else [
        np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    scores = []
    for g in groups:
        n_b = len(np.unique(codes[g]))
        if n_b < 2 or n_b >= len(g):
            continue  # silhouette undefined (one batch, or every cell its own batch)
        scores.append(np.mean(1.0 - np.abs(silhouette_samples(x[g], codes[g]))))
    return float(np.mean(scores)) if scores else float("nan")


# ------------------------------------------------------------------------- bio metrics
def graph_connectivity(nn_idx: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels of (largest connected component within the label) / (label size)."""
    n, k = nn_idx.shape
    graph = sparse.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), nn_idx.ravel())),
                              shape=(n, n))
    fractions = []
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        _, comp = connected_components(graph[members][:, members], directed=False)
        fractions.append(np.bincount(comp).max() / len(members))
    return float(np.mean(fractions))


def cluster_agreement(x: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """NMI and ARI of KMeans (k = n labels, best-NMI of a few seeds) against ``labels``."""
    n_clusters = len(np.unique(labels))
    if n_clusters < 2:
        return {"nmi": float("nan"), "ari": float("nan")}
    best: tuple[float, float] | None = None
    for s in range(KMEANS_SEEDS):
        pred = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed + s).fit_predict(x)
        nmi = normalized_mutual_info_score(labels, pred)
        if best is None or nmi > best[0]:
            best = (nmi, adjusted_rand_score(labels, pred))
    return {"nmi": float(best[0]), "ari": float(best[1])}


def silhouette_label(x: np.ndarray, labels: np.ndarray) -> float:
    """Label ASW scaled to [0, 1]: ``(silhouette(labels) + 1) / 2``."""
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(x):
        return float("nan")
    return float((silhouette_score(x, labels) + 1) / 2)
