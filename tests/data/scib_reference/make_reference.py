"""Compute scib-metrics' values on fixed inputs, once, for hescape's mixing regression test.

Run by hand (not in CI) in a separate environment that has scib-metrics and JAX::

    python3.11 -m venv /tmp/scib && /tmp/scib/bin/pip install scib-metrics==0.5.10
    /tmp/scib/bin/python tests/data/scib_reference/make_reference.py

Writes ``inputs.npz`` (embeddings, batches, labels) and ``reference.json`` beside this file.
Two neighbour modes are recorded per dataset:

- ``exact_knn``: scib-metrics' metric functions on exact Euclidean neighbour lists (self
  included as the first neighbour, as scib-metrics expects), with the approximate search
  inside ``kbet_per_label``'s diffusion step replaced by the same exact search. This isolates
  the metric definitions; hescape's implementation is tested against it.
- ``pynndescent``: the same functions on scib-metrics' own approximate neighbours
  (``pynndescent(X, 90, random_state=0)``, as ``Benchmarker.prepare`` does), to show how far
  the shipped pipeline's approximate search moves each figure.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import scib_metrics
from scib_metrics import nearest_neighbors
from scib_metrics.nearest_neighbors import NeighborsResults
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

HERE = Path(__file__).parent
STARMAP = HERE.parent / "real" / "starmap_mpfc_3sections.h5ad"  # the copy the tests read
N_STARMAP = 1500
N_PCS = 30
PACKAGES = ("scib-metrics", "jax", "jaxlib", "numpy", "scipy", "scikit-learn", "pynndescent",
            "umap-learn", "igraph", "anndata", "pandas")


def exact_knn(x: np.ndarray, k: int) -> NeighborsResults:
    """Exact Euclidean kNN, self as neighbour 0; padded with -1 / inf beyond n, as pynndescent."""
    x = np.asarray(x, dtype=np.float64)
    n, kk = len(x), min(k, len(x))
    dist, idx = NearestNeighbors(n_neighbors=kk - 1, algorithm="brute").fit(x).kneighbors()
    idx = np.hstack([np.arange(n)[:, None], idx, np.full((n, k - kk), -1)])
    dist = np.hstack([np.zeros((n, 1)), dist, np.full((n, k - kk), np.inf)])
    return NeighborsResults(indices=idx, distances=dist)


def starmap_inputs() -> dict[str, np.ndarray]:
    """Seeded 1,500-cell subsample of STARmap mPFC (labelled cells), PCA 30 of log-normalised counts."""
    adata = ad.read_h5ad(STARMAP)
    adata = adata[adata.obs["cell_type"].astype(str) != "NA"]
    counts = adata.X.toarray().astype(np.float64)
    keep = np.flatnonzero(counts.sum(1) > 0)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(keep, size=N_STARMAP, replace=False))
    x = counts[rows]
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    emb = PCA(n_components=N_PCS, svd_solver="full", random_state=0).fit_transform(x)
    return {"emb": emb.astype(np.float32),
            "batch": np.asarray(adata.obs["batch"], dtype=str)[rows],
            "labels": np.asarray(adata.obs["cell_type"], dtype=str)[rows]}


def simulated_inputs(batch_shift: float, seed: int) -> dict[str, np.ndarray]:
    """600 cells, 4 labels x 3 batches in 10 dims; ``batch_shift`` sets the batch offset size."""
    rng = np.random.default_rng(seed)
    n_labels, n_batches, per, dim = 4, 3, 50, 10
    centres = rng.normal(scale=4.0, size=(n_labels, dim))
    offsets = rng.normal(scale=batch_shift, size=(n_batches, dim))
    emb, batch, labels = [], [], []
    for lab in range(n_labels):
        for b in range(n_batches):
            emb.append(centres[lab] + offsets[b] + rng.normal(size=(per, dim)))
            batch += [f"b{b}"] * per
            labels += [f"type{lab}"] * per
    return {"emb": np.concatenate(emb).astype(np.float32), "batch": np.array(batch),
            "labels": np.array(labels)}


def scib_values(x: np.ndarray, batch: np.ndarray, labels: np.ndarray,
                nn90: NeighborsResults) -> dict:
    """Every scib-metrics figure hescape mirrors or names, from one 90-NN result."""
    nn15, nn50 = nn90.subset_neighbors(15), nn90.subset_neighbors(50)
    kbet_score, kbet_table = scib_metrics.kbet_per_label(nn50, batch, labels, return_df=True)
    kmeans = scib_metrics.nmi_ari_cluster_labels_kmeans(x, labels)
    leiden = scib_metrics.nmi_ari_cluster_labels_leiden(nn15, labels)
    return {
        "ilisi_knn": float(scib_metrics.ilisi_knn(nn90, batch)),
        "kbet_per_label": float(kbet_score),
        "kbet_per_label_table": {str(c): (None if np.isnan(s) else float(s))
                                 for c, s in zip(kbet_table["cluster"], kbet_table["kBET"])},
        "kbet": float(scib_metrics.kbet(nn50, batch)[0]),
        "graph_connectivity": float(scib_metrics.graph_connectivity(nn15, labels)),
        "silhouette_batch": float(scib_metrics.silhouette_batch(x, labels, batch)),
        "silhouette_label": float(scib_metrics.silhouette_label(x, labels)),
        "nmi_ari_cluster_labels_kmeans_nmi": float(kmeans["nmi"]),
        "nmi_ari_cluster_labels_kmeans_ari": float(kmeans["ari"]),
        "nmi_ari_cluster_labels_leiden_nmi": float(leiden["nmi"]),
        "nmi_ari_cluster_labels_leiden_ari": float(leiden["ari"]),
        "clisi_knn": float(scib_metrics.clisi_knn(nn90, labels)),
        "bras": float(scib_metrics.bras(x, labels, batch)),
    }


def with_exact_diffusion_knn(fn, *args):
    """Run ``fn`` with scib-metrics' internal pynndescent swapped for the exact search."""
    original = nearest_neighbors.pynndescent
    nearest_neighbors.pynndescent = lambda x, n_neighbors, **_: exact_knn(x, n_neighbors)
    try:
        return fn(*args)
    finally:
        nearest_neighbors.pynndescent = original


def main() -> None:
    datasets = {
        "starmap": starmap_inputs(),
        "sim_mixed": simulated_inputs(batch_shift=0.0, seed=1),
        "sim_partial": simulated_inputs(batch_shift=0.3, seed=2),
        "sim_separated": simulated_inputs(batch_shift=3.0, seed=3),
    }
    arrays, results = {}, {}
    for name, d in datasets.items():
        x, batch, labels = d["emb"], d["batch"], d["labels"]
        arrays.update({f"{name}_emb": x, f"{name}_batch": batch, f"{name}_labels": labels})
        approx = nearest_neighbors.pynndescent(x, n_neighbors=90, random_state=0)
        results[name] = {
            "n_cells": len(x), "n_dims": int(x.shape[1]),
            "n_batches": len(np.unique(batch)), "n_labels": len(np.unique(labels)),
            "exact_knn": with_exact_diffusion_knn(scib_values, x, batch, labels,
                                                  exact_knn(x, 90)),
            "pynndescent": scib_values(x, batch, labels, approx),
        }
        print(name, json.dumps({k: v for k, v in results[name]["exact_knn"].items()
                                if not isinstance(v, dict)}, indent=1), flush=True)
    np.savez_compressed(HERE / "inputs.npz", **arrays)
    meta = {"python": sys.version.split()[0], "platform": platform.platform(),
            "packages": {p: version(p) for p in PACKAGES},
            "jax_backend": __import__("jax").default_backend()}
    (HERE / "reference.json").write_text(json.dumps({"meta": meta, "datasets": results},
                                                    indent=1) + "\n")


if __name__ == "__main__":
    main()
