"""kBET as scib-metrics 0.5.10 computes it (``kbet`` and ``kbet_per_label``), numpy/scipy only.

Mirrors ``scib_metrics.metrics._kbet`` line by line, on exact neighbour lists instead of
pynndescent's approximate ones (identical on the reference inputs, see
tests/data/scib_reference): neighbour lists include the cell itself as neighbour 0, as
scib-metrics' do.

- :func:`kbet_acceptance` = ``scib_metrics.kbet``: per cell, a chi-square test of the batch
  counts among its neighbours (self included) against the batch frequencies of all cells
  passed in; the fraction with p >= alpha.
- :func:`kbet_per_label` = ``scib_metrics.kbet_per_label`` (the Benchmarker's "KBET"): per
  label, UMAP connectivities of the 50-NN graph restricted to the label -> diffusion map
  (<= 100 components) -> ``k0 + 1`` nearest neighbours in diffusion space, with
  ``k0 = min(70, max(10, mean cells per batch in the label // 4))`` -> kBET against the
  label's own batch frequencies. Labels with < 10 cells or one batch are NaN (skipped);
  labels whose graph falls apart into components of < ``3 k0`` cells holding > 25% of the
  label score 0. Mean over labels, NaN ignored. scib-metrics' quirks are kept on purpose
  (they change its numbers): the diffusion-map size shrinks across labels (see
  :func:`_kbet_one_label`), and short neighbour lists are padded with index -1, which counts
  as the last cell's batch.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse, stats
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.neighbors import NearestNeighbors

KBET_ALPHA = 0.05
SMOOTH_K_TOLERANCE = 1e-5  # umap-learn's constants (umap.umap_)
MIN_K_DIST_SCALE = 1e-3
DIFFUSION_COMPONENTS = 100
_EPS = 1e-8


def knn_with_self(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean ``k``-NN lists with the cell itself as neighbour 0 (scib's convention).

    Beyond ``len(x)`` neighbours the lists are padded with index -1 and distance inf, as
    pynndescent pads them (scib-metrics then reads batch ``codes[-1]`` there; so do we).
    """
    n = len(x)
    kk = min(k, n)
    self_idx = np.arange(n)[:, None]
    if kk > 1:
        dist, idx = NearestNeighbors(n_neighbors=kk - 1, algorithm="brute").fit(x).kneighbors()
        idx, dist = np.hstack([self_idx, idx]), np.hstack([np.zeros((n, 1)), dist])
    else:
        idx, dist = self_idx, np.zeros((n, 1))
    if k > n:
        idx = np.hstack([idx, np.full((n, k - n), -1)])
        dist = np.hstack([dist, np.full((n, k - n), np.inf)])
    return idx, dist


def kbet_acceptance(nn_idx: np.ndarray, codes: np.ndarray, *, alpha: float = KBET_ALPHA) -> float:
    """``scib_metrics.kbet``: fraction of cells whose neighbour batch counts pass chi-square."""
    _, codes = np.unique(codes, return_inverse=True)
    n_batches = int(codes.max()) + 1
    freq = np.bincount(codes, minlength=n_batches) / len(codes)
    nb = codes[nn_idx]
    counts = np.stack([(nb == c).sum(1) for c in range(n_batches)], axis=1)
    expected = nn_idx.shape[1] * freq[None, :]
    chi2 = ((counts - expected) ** 2 / expected).sum(1)
    pvals = stats.chi2.sf(chi2, df=n_batches - 1)
    return float((pvals >= alpha).mean())


def kbet_per_label(nn_idx: np.ndarray, nn_dist: np.ndarray, codes: np.ndarray,
                   labels: np.ndarray, *, alpha: float = KBET_ALPHA) -> tuple[float, dict]:
    """``scib_metrics.kbet_per_label`` on a kNN list (self first); returns (score, per label)."""
    conn = umap_connectivities(nn_idx, nn_dist)
    per_label: dict[str, float] = {}
    n_comps = DIFFUSION_COMPONENTS
    for lab in np.unique(labels):  # sorted, as scib-metrics; n_comps carries over (see below)
        mask = labels == lab
        per_label[str(lab)], n_comps = _kbet_one_label(conn[mask][:, mask].tocsr(), codes[mask],
                                                       alpha, n_comps)
    scores = np.array(list(per_label.values()), dtype=float)
    score = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
    return score, per_label


def _kbet_one_label(conn: sparse.csr_matrix, codes: np.ndarray, alpha: float,
                    n_comps: int) -> tuple[float, int]:
    """kBET of one label and the diffusion-map size the next label starts from.

    scib-metrics 0.5.10 lowers its ``diffusion_n_comps`` to ``n_cells - 1`` of each label it
    embeds and never raises it again, so a label's map has at most as many components as the
    smallest label embedded before it (in sorted order). Mirrored so the numbers agree.
    """
    n_obs = conn.shape[0]
    if n_obs < 10 or len(np.unique(codes)) == 1:
        return float("nan"), n_comps
    quarter_mean = int(np.floor(np.mean(np.unique(codes, return_counts=True)[1]) / 4))
    k0 = min(70, max(10, quarter_mean))
    n_comp, comp = connected_components(conn, connection="strong")
    rows = np.arange(n_obs)
    if n_comp > 1:
        sizes = np.bincount(comp)
        rows = np.flatnonzero(sizes[comp] >= 3 * k0)
        if len(rows) / n_obs < 0.75:
            return 0.0, n_comps  # too many cells in small components: scib counts 100% rejection
    n_comps = min(n_comps, len(rows) - 1)
    try:
        nn_idx = diffusion_knn(conn[rows][:, rows], k=k0, n_comps=n_comps)
    except ValueError:
        return 0.0, n_comps  # as scib-metrics: a failed diffusion map rejects every cell
    return kbet_acceptance(nn_idx, codes[rows], alpha=alpha), n_comps


def diffusion_knn(conn: sparse.csr_matrix, *, k: int,
                  n_comps: int = DIFFUSION_COMPONENTS) -> np.ndarray:
    """``scib_metrics.utils.diffusion_nn``: ``k + 1`` neighbours (self first) in a diffusion map."""
    n_comps = min(n_comps, conn.shape[0] - 1)
    q = np.asarray(conn.sum(axis=0))
    qinv = sparse.spdiags(1.0 / q, 0, conn.shape[0], conn.shape[0])
    kern = qinv @ conn @ qinv  # density normalisation (Coifman et al. 2005), as scanpy
    z = np.sqrt(np.asarray(kern.sum(axis=0)))
    zinv = sparse.spdiags(1.0 / z, 0, kern.shape[0], kern.shape[0])
    transitions = (zinv @ kern @ zinv).astype(np.float64)
    v0 = np.random.default_rng(0).uniform(-1, 1, transitions.shape[0])  # reruns repeat exactly
    evals, evecs = eigsh(transitions, k=n_comps, which="LM", v0=v0)
    evals, evecs = evals.astype(np.float32)[::-1], evecs.astype(np.float32)[:, ::-1]
    evals = evals + np.float32(_EPS)
    scaled = np.array([e if e == 1 else e / (1 - e) for e in evals])
    embedding = (evecs * scaled).astype(np.float64)
    return knn_with_self(embedding, k + 1)[0]


def umap_connectivities(nn_idx: np.ndarray, nn_dist: np.ndarray) -> sparse.csr_matrix:
    """umap-learn's ``fuzzy_simplicial_set`` on given neighbours (local_connectivity 1, union)."""
    n, k = nn_idx.shape
    dist = nn_dist.astype(np.float32)
    sigma, rho = _smooth_knn_dist(dist, float(k))
    d = dist - rho[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        vals = np.exp(-(d / sigma[:, None])).astype(np.float32)
    vals[(d <= 0) | (sigma[:, None] == 0)] = 1.0
    vals[nn_idx == np.arange(n)[:, None]] = 0.0
    valid = nn_idx >= 0
    graph = sparse.coo_matrix((vals[valid], (np.repeat(np.arange(n), k)[valid.ravel()],
                                             nn_idx[valid])), shape=(n, n)).tocsr()
    graph.eliminate_zeros()
    graph = graph + graph.T - graph.multiply(graph.T)
    graph.eliminate_zeros()
    return graph.tocsr()


def _smooth_knn_dist(dist: np.ndarray, k: float, n_iter: int = 64) -> tuple[np.ndarray, ...]:
    """umap-learn's ``smooth_knn_dist`` (bandwidth 1), vectorised over cells."""
    n = len(dist)
    target = np.log2(k)
    nonzero = np.where(dist > 0, dist, np.inf)
    rho = np.where(np.isfinite(nonzero.min(1)), nonzero.min(1), 0.0).astype(np.float32)
    d = (dist[:, 1:] - rho[:, None]).astype(np.float64)  # column 0 is the cell itself
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter):
        with np.errstate(over="ignore", invalid="ignore"):
            psum = np.where(d > 0, np.exp(-(d / mid[:, None])), 1.0).sum(1)
        active &= np.abs(psum - target) >= SMOOTH_K_TOLERANCE
        if not active.any():
            break
        high = active & (psum > target)
        low = active & ~(psum > target)
        hi = np.where(high, mid, hi)
        lo = np.where(low, mid, lo)
        mid = np.where(high | (low & np.isfinite(hi)), (lo + hi) / 2, np.where(low, mid * 2, mid))
    sigma = mid.astype(np.float32)
    floor = MIN_K_DIST_SCALE * np.where(rho > 0, dist.mean(1), dist.mean())
    sigma = np.where(sigma < floor, floor, sigma).astype(np.float32)
    return sigma, rho
