"""Evaluation figures (matplotlib Agg). Each writer saves a PNG atomically and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hescape.atomic import atomic_path

UMAP_MIN_N = 200  # below this UMAP is neither stable nor worth its start-up cost: PCA 2-D
# umap-learn computes all pairwise distances below this many rows, through a Python call per
# pair for its cosine (75% of a 2,000-row layout); the same matrix from one product instead
UMAP_SMALL_DATA = 4096


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """All-pairs cosine distance (float64, zero diagonal): what umap-learn's small-data path
    computes for ``metric="cosine"``."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    zero = norm[:, 0] == 0
    dist[zero[:, None] ^ zero[None, :]] = 1.0  # as umap-learn: a zero row is 1 from the rest
    dist[zero[:, None] & zero[None, :]] = 0.0  # and 0 from another zero row
    np.fill_diagonal(dist, 0.0)
    return dist


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (``hescape.atomic``) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _figure(width: float = 5.5, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def embedding_2d(emb: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D layout: UMAP for ``N >= UMAP_MIN_N`` (cosine metric), else PCA. Returns (xy, method)."""
    emb = np.asarray(emb, dtype=np.float32)
    if len(emb) >= UMAP_MIN_N:
        import umap

        if len(emb) < UMAP_SMALL_DATA:  # umap's all-pairs path: hand it the distances
            reducer = umap.UMAP(n_neighbors=15, metric="precomputed", random_state=seed)
            return np.asarray(reducer.fit_transform(cosine_distances(emb))), "UMAP"
        reducer = umap.UMAP(n_neighbors=15, metric="cosine", random_state=seed)
        return np.asarray(reducer.fit_transform(emb)), "UMAP"
    from sklearn.decomposition import PCA

    n_comp = min(2, emb.shape[1], len(emb))
    xy = PCA(n_comp, random_state=seed).fit_transform(emb)
    if xy.shape[1] < 2:
        xy = np.column_stack([xy, np.zeros(len(xy))])
    return xy, "PCA"


def plot_embedding(
    xy: np.ndarray, colors: Sequence, *, title: str, path: str | Path, method: str = "UMAP"
) -> Path:
    """Scatter of a 2-D layout coloured by a categorical value (donor, label)."""
    fig, ax = _figure()
    values = pd.Series(np.asarray(colors, dtype=object)).fillna("NA").astype(str).to_numpy()
    cats = np.unique(values)
    cmap = _cmap(len(cats))
    for i, cat in enumerate(cats):
        m = values == cat
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=cmap(i), label=cat, linewidths=0)
    if len(cats) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    ax.set(title=title, xlabel=f"{method} 1", ylabel=f"{method} 2", xticks=[], yticks=[])
    return _save(fig, path)


def _cmap(n: int):
    import matplotlib.pyplot as plt

    return plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv", max(n, 1))


def plot_recall_curve(ranks: Mapping[str, np.ndarray], path: str | Path, max_k: int = 50) -> Path:
    """Recall@k for k = 1..max_k per direction, with the random-retrieval line k/N."""
    fig, ax = _figure()
    n = 1
    for name, r in ranks.items():
        r = np.asarray(r)
        n = max(n, len(r))
        ks = np.arange(1, min(max_k, len(r)) + 1)
        ax.plot(ks, [(r <= k).mean() for k in ks], label=name)
    ks = np.arange(1, min(max_k, n) + 1)
    ax.plot(ks, ks / n, ls="--", color="grey", label="random")
    ax.set(xlabel="k", ylabel="Recall@k", title=f"whole-set retrieval (N = {n})", ylim=(0, 1.02))
    ax.legend(frameon=False)
    return _save(fig, path)


def plot_pearson_hist(per_gene: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Histogram of per-gene Pearson r (mean over held-out donors)."""
    fig, ax = _figure()
    r = per_gene.groupby("gene")["pearson"].mean().dropna()
    ax.hist(r, bins=min(30, max(5, len(r) // 2)), range=(-1, 1), color="tab:blue")
    if len(r):
        ax.axvline(r.mean(), color="k", ls="--", label=f"mean {r.mean():.3f}")
        ax.legend(frameon=False)
    ax.set(xlabel="Pearson r per gene (mean over donors)", ylabel="genes", title=title)
    return _save(fig, path)


def plot_comparison(table: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars: rows are tasks, columns are feature sets (contrastive, frozen, PCA...)."""
    fig, ax = _figure(width=max(5.5, 1.2 * len(table)), height=4.5)
    data = table.astype(float)
    width = 0.8 / max(1, data.shape[1])
    x = np.arange(len(data))
    for i, col in enumerate(data.columns):
        ax.bar(x + i * width, data[col].fillna(0).to_numpy(), width, label=str(col))
    ax.set_xticks(x + width * (data.shape[1] - 1) / 2, [str(t) for t in data.index], rotation=30)
    ax.set(ylabel="score (missing = 0)", title="contrastive vs baselines")
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)
