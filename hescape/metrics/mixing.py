"""Batch-mixing and biology-conservation metrics of an embedding, following scib-metrics.

Protocol: scib-metrics 0.5.10's ``Benchmarker`` (Luecken et al. 2022, reimplemented by
scib-metrics), computed with numpy / scipy / scikit-learn because JAX is not part of the
default install. One exact Euclidean 90-NN list per embedding, the cell itself as neighbour 0,
cut to 15 / 50 / 90 neighbours as the Benchmarker does (it uses pynndescent's approximate
search; exact and approximate lists coincide on the reference inputs), on the measured rows
(a seeded, batch-stratified subsample above ``subsample`` rows; the Benchmarker uses all).
Every figure is in [0, 1], higher is better. tests/data/scib_reference holds scib-metrics'
own values on real (STARmap) and simulated inputs; tests/metrics/test_mixing.py checks these
against them. ``backend="scib"`` computes the same keys with scib-metrics itself (optional
extra ``scib``), approximate neighbours and all.

Same number as scib-metrics (names kept):

- ``ilisi``: ``scib_metrics.ilisi_knn`` -- per cell, inverse Simpson's index of batch under a
  Gaussian kernel calibrated to perplexity 30 over the 90-NN list (self excluded); the
  median, scaled ``(median - 1) / (n_batches - 1)``. Randomly mixed data scores below 1
  (finite-neighbourhood bias, as scib's).
- ``kbet``: ``scib_metrics.kbet_per_label`` (the Benchmarker's "KBET"), labels only -- kBET
  acceptance per cell-type label on a diffusion-map kNN graph (see :mod:`.kbet`), mean over
  labels.
- ``kbet_global``: ``scib_metrics.kbet`` on the 50-NN list (self included) -- one kBET over all
  cells against the global batch frequencies; label-free, confounded by cell-type composition.
- ``graph_connectivity`` (labels): ``scib_metrics.graph_connectivity`` -- per label, the largest
  strongly connected component of the directed 15-NN graph restricted to the label, over the
  label size; mean over labels.
- ``silhouette_batch`` (labels): ``scib_metrics.silhouette_batch`` -- ``1 - |silhouette(batch)|``
  per cell within each label, mean per label, mean over labels (scib's batch ASW; the 0.5
  Benchmarker's default batch silhouette is BRAS, not computed here).
- ``silhouette_label`` (labels): ``scib_metrics.silhouette_label`` -- ``(ASW(labels) + 1) / 2``.

Named for what they are (not scib's number):

- ``nmi_kmeans`` / ``ari_kmeans`` (labels): NMI / ARI of scikit-learn KMeans (k = number of
  labels, k-means++, 10 inits, seeded) against the labels. Same definition as scib-metrics'
  "KMeans NMI/ARI", but another KMeans run (scib-metrics: its JAX KMeans, one init), so the two
  agree only up to clustering randomness. Not scib's Leiden NMI (resolution-optimised).

Beside the figures: ``n_batches`` (and ``n_labels`` with labels) of the measured rows -- print
them with every figure -- ``subsample_n``, ``subsample_seed`` and ``knn_capped`` (1.0 when
fewer than 90 rows: the lists run short of the Benchmarker's 50 / 90 neighbours and are padded
as pynndescent pads them, which scib-metrics' kBET counts as the last cell's batch; treat such
figures as under-powered). With a single batch the batch figures are NaN (nothing to mix),
not an error: a held-out split may hold one donor. Renamed in this version: ``nmi -> nmi_kmeans``, ``ari -> ari_kmeans``; ``kbet`` now
needs labels (the old label-free one is ``kbet_global``, now with scib's 50 neighbours);
``silhouette_batch`` now needs labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from threadpoolctl import threadpool_limits

from hescape.metrics.kbet import kbet_acceptance, kbet_per_label, knn_with_self

NEIGHBOURS = {"graph": 15, "kbet": 50, "lisi": 90}  # scib-metrics Benchmarker's lists
BATCH_KEYS = ("ilisi", "kbet_global")
LABEL_BATCH_KEYS = ("kbet", "silhouette_batch")
BIO_KEYS = ("graph_connectivity", "nmi_kmeans", "ari_kmeans", "silhouette_label")
INFO_KEYS = ("n_batches", "n_labels", "subsample_n", "subsample_seed", "knn_capped")
MIXING_KEYS = BATCH_KEYS + LABEL_BATCH_KEYS + BIO_KEYS + INFO_KEYS
KMEANS_INITS = 10
BACKENDS = ("hescape", "scib")
MIN_CELLS = NEIGHBOURS["graph"] + 1


def mixing_metrics(
    emb: Any,
    batch: Any,
    labels: Any = None,
    *,
    subsample: int | None = 5000,
    seed: int = 0,
    backend: str = "hescape",
) -> dict[str, float]:
    """Batch-mixing (and, with ``labels``, biology-conservation) metrics of ``emb`` (N x D).

    Returns ``ilisi, kbet_global, n_batches`` (+ ``kbet, silhouette_batch,
    graph_connectivity, nmi_kmeans, ari_kmeans, silhouette_label, n_labels`` with labels) plus
    ``subsample_n``, ``subsample_seed`` and ``knn_capped``. ``subsample=None`` uses every row;
    otherwise rows are drawn per batch in proportion (seeded). See the module docstring for
    which protocol each figure follows. ``backend="scib"`` computes the same keys with
    scib-metrics itself (``pip install 'hescape-study[scib]'``; approximate neighbours, its
    JAX KMeans), e.g. to cross-check a study's figures.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    x, b, y = _check_inputs(emb, batch, labels)
    idx = stratified_subsample(b, subsample, seed=seed)
    x, b = x[idx], b[idx]
    y = y[idx] if y is not None else None
    _, b_codes = np.unique(b, return_inverse=True)
    out: dict[str, float] = {"n_batches": float(b_codes.max() + 1)}
    if y is not None:
        out["n_labels"] = float(len(np.unique(y)))
    if backend == "scib":
        out.update(_scib_figures(x, b_codes, y, seed=seed))
    else:  # small products (<= subsample rows): BLAS threads only wait on each other here
        with threadpool_limits(limits=1):
            out.update(_own_figures(x, b_codes, y, seed=seed))
    out["subsample_n"] = float(len(idx))
    out["subsample_seed"] = float(seed)
    out["knn_capped"] = float(len(x) < NEIGHBOURS["lisi"])
    return out


def _own_figures(x: np.ndarray, codes: np.ndarray, y: np.ndarray | None, *,
                 seed: int) -> dict[str, float]:
    nn_idx, nn_dist = knn_with_self(x, NEIGHBOURS["lisi"])
    k_kbet, out = NEIGHBOURS["kbet"], {}
    if codes.max() < 1:
        out.update(_nan_batch_figures(y))
    else:
        out["ilisi"] = ilisi(nn_idx, nn_dist, codes)
        out["kbet_global"] = kbet_acceptance(nn_idx[:, :k_kbet], codes)
        if y is not None:
            out["kbet"] = kbet_per_label(nn_idx[:, :k_kbet], nn_dist[:, :k_kbet], codes, y)[0]
            out["silhouette_batch"] = silhouette_batch(x, codes, y)
    if y is not None:
        out["graph_connectivity"] = graph_connectivity(nn_idx[:, : NEIGHBOURS["graph"]], y)
        out.update(kmeans_agreement(x, y, seed=seed))
        out["silhouette_label"] = silhouette_label(x, y)
    return out


def _scib_figures(x: np.ndarray, codes: np.ndarray, y: np.ndarray | None, *,
                  seed: int) -> dict[str, float]:
    """The same figures from scib-metrics itself, neighbours as its Benchmarker finds them."""
    try:
        import scib_metrics
        from scib_metrics.nearest_neighbors import pynndescent
    except ImportError as exc:
        raise ImportError("mixing backend 'scib' needs scib-metrics (and JAX): "
                          "pip install 'hescape-study[scib]'") from exc
    x = x.astype(np.float32)
    nn = pynndescent(x, n_neighbors=NEIGHBOURS["lisi"], random_state=0)
    nn_kbet, nn_graph = nn.subset_neighbors(NEIGHBOURS["kbet"]), nn.subset_neighbors(NEIGHBOURS["graph"])
    out: dict[str, float] = {}
    if codes.max() < 1:
        out.update(_nan_batch_figures(y))
    else:
        out["ilisi"] = float(scib_metrics.ilisi_knn(nn, codes))
        out["kbet_global"] = float(scib_metrics.kbet(nn_kbet, codes)[0])
        if y is not None:
            out["kbet"] = float(scib_metrics.kbet_per_label(nn_kbet, codes, y))
            try:
                out["silhouette_batch"] = float(scib_metrics.silhouette_batch(x, y, codes))
            except ValueError:  # no label holds two batches: scib-metrics concatenates nothing
                out["silhouette_batch"] = float("nan")
    if y is not None:
        out["graph_connectivity"] = float(scib_metrics.graph_connectivity(nn_graph, y))
        if len(np.unique(y)) < 2:
            out.update(dict.fromkeys(("nmi_kmeans", "ari_kmeans", "silhouette_label"), np.nan))
            return out
        km = scib_metrics.nmi_ari_cluster_labels_kmeans(x, y)
        out.update(nmi_kmeans=float(km["nmi"]), ari_kmeans=float(km["ari"]))
        out["silhouette_label"] = float(scib_metrics.silhouette_label(x, y))
    return out


def _nan_batch_figures(y: np.ndarray | None) -> dict[str, float]:
    """One batch: nothing to mix, every batch figure NaN (a held-out split may hold one donor)."""
    keys = BATCH_KEYS + (LABEL_BATCH_KEYS if y is not None else ())
    return dict.fromkeys(keys, float("nan"))


# ----------------------------------------------------------------------------- inputs
def _check_inputs(emb: Any, batch: Any, labels: Any):
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"emb must be 2-D (cells x dims), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("emb contains NaN or inf; fix the embedding before measuring mixing")
    b = _as_labels(batch, "batch", len(x))
    y = _as_labels(labels, "labels", len(x)) if labels is not None else None
    if len(x) < MIN_CELLS:
        raise ValueError(f"need at least {MIN_CELLS} cells for the 15-neighbour graph, "
                         f"got {len(x)}")
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


# ----------------------------------------------------------------------- batch metrics
def lisi(nn_idx: np.ndarray, nn_dist: np.ndarray, codes: np.ndarray, *,
         perplexity: float | None = None, n_iter: int = 50, tol: float = 1e-5) -> np.ndarray:
    """Per-cell LISI as ``scib_metrics.lisi_knn``: lists hold self first, self gets no weight.

    ``perplexity`` defaults to ``floor(k / 3)`` (30 for scib's 90 neighbours); each cell's
    kernel width is bisected until its entropy is within ``tol`` of log(perplexity).
    """
    k = nn_idx.shape[1]
    perplexity = np.floor(k / 3) if perplexity is None else perplexity
    weight = (nn_idx != np.arange(len(nn_idx))[:, None]) & np.isfinite(nn_dist)
    d = np.where(weight, nn_dist, np.inf)
    d = d - d.min(1, keepdims=True)  # shift: the entropy is invariant, exp() no longer underflows
    d = np.where(weight, d, 0.0)
    n = len(d)
    beta, lo, hi = np.ones(n), np.full(n, -np.inf), np.full(n, np.inf)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter + 1):
        p = np.exp(-d * beta[:, None]) * weight
        p_sum = p.sum(1)
        diff = np.log(p_sum) + beta * (d * p).sum(1) / p_sum - np.log(perplexity)
        active &= np.abs(diff) >= tol
        if not active.any():
            break
        up = active & (diff > 0)  # entropy too high: sharpen (raise beta)
        down = active & ~(diff > 0)
        lo, hi = np.where(up, beta, lo), np.where(down, beta, hi)
        beta = np.where(up, np.where(np.isinf(hi), beta * 2, (beta + hi) / 2),
                        np.where(down, np.where(np.isinf(lo), beta / 2, (beta + lo) / 2), beta))
    p = np.exp(-d * beta[:, None]) * weight
    p /= p.sum(1, keepdims=True)
    nb = codes[nn_idx]
    simpson = np.zeros(n)
    for c in range(int(codes.max()) + 1):
        simpson += ((nb == c) * p).sum(1) ** 2
    return 1.0 / simpson


def ilisi(nn_idx: np.ndarray, nn_dist: np.ndarray, codes: np.ndarray) -> float:
    """``scib_metrics.ilisi_knn``: ``(median LISI - 1) / (n_batches - 1)``."""
    n_batches = len(np.unique(codes))
    return float((np.nanmedian(lisi(nn_idx, nn_dist, codes)) - 1) / (n_batches - 1))


def silhouette_batch(x: np.ndarray, codes: np.ndarray, labels: np.ndarray) -> float:
    """``scib_metrics.silhouette_batch``: mean over labels of mean(1 - |silhouette(batch)|)."""
    scores = []
    for lab in np.unique(labels):
        g = np.flatnonzero(labels == lab)
        n_b = len(np.unique(codes[g]))
        if n_b < 2 or n_b >= len(g):
            continue  # silhouette undefined (one batch, or every cell its own batch)
        scores.append(np.mean(1.0 - np.abs(silhouette_samples(x[g], codes[g]))))
    return float(np.mean(scores)) if scores else float("nan")


# ------------------------------------------------------------------------- bio metrics
def graph_connectivity(nn_idx: np.ndarray, labels: np.ndarray) -> float:
    """``scib_metrics.graph_connectivity``: mean over labels of largest strong component / size."""
    n, k = nn_idx.shape
    valid = nn_idx >= 0
    graph = sparse.csr_matrix((np.ones(valid.sum()), (np.repeat(np.arange(n), k)[valid.ravel()],
                                                      nn_idx[valid])), shape=(n, n))
    fractions = []
    for lab in np.unique(labels):
        members = np.flatnonzero(labels == lab)
        _, comp = connected_components(graph[members][:, members], connection="strong")
        fractions.append(np.bincount(comp).max() / len(members))
    return float(np.mean(fractions))


def kmeans_agreement(x: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """NMI and ARI of KMeans (k = number of labels, 10 inits, seeded) against ``labels``."""
    n_clusters = len(np.unique(labels))
    if n_clusters < 2:
        return {"nmi_kmeans": float("nan"), "ari_kmeans": float("nan")}
    pred = KMeans(n_clusters=n_clusters, n_init=KMEANS_INITS, random_state=seed).fit_predict(x)
    return {"nmi_kmeans": float(normalized_mutual_info_score(labels, pred)),
            "ari_kmeans": float(adjusted_rand_score(labels, pred))}


def silhouette_label(x: np.ndarray, labels: np.ndarray) -> float:
    """``scib_metrics.silhouette_label``: ``(silhouette(labels) + 1) / 2``."""
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(x):
        return float("nan")
    return float((silhouette_score(x, labels) + 1) / 2)
