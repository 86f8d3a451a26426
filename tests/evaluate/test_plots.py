"""Every plot writes a non-empty PNG atomically; the UMAP / PCA switch."""

from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd

from hescape.evaluate import plots

PNG = b"\x89PNG"


def _ok(path):
    data = path.read_bytes()
    assert data[:4] == PNG and len(data) > 1000
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_embedding_plot_pca_fallback(tmp_path):
    emb = np.random.default_rng(0).normal(size=(40, 5))
    xy, method = plots.embedding_2d(emb)
    assert method == "PCA" and xy.shape == (40, 2)
    labels = np.array(["a", "b", None, "c"] * 10, dtype=object)
    _ok(plots.plot_embedding(xy, labels, title="t", path=tmp_path / "e.png", method=method))


def test_embedding_uses_umap_for_large_n(monkeypatch):
    calls = {}

    class FakeUMAP:
        def __init__(self, **kw):
            calls.update(kw)

        def fit_transform(self, x):
            return x[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    xy, method = plots.embedding_2d(np.ones((plots.UMAP_MIN_N, 4)), seed=3)
    assert method == "UMAP" and xy.shape == (plots.UMAP_MIN_N, 2) and calls["random_state"] == 3
    # below umap-learn's all-pairs threshold it gets the cosine distances, above it the rows
    assert calls["metric"] == "precomputed"
    plots.embedding_2d(np.ones((plots.UMAP_SMALL_DATA, 4)))
    assert calls["metric"] == "cosine"


def test_cosine_distances_are_umaps():
    from umap.distances import cosine

    x = np.random.default_rng(1).normal(size=(30, 7)).astype(np.float32)
    x[3] = 0.0
    x[4] = 0.0
    d = plots.cosine_distances(x)
    ref = np.array([[cosine(a, b) for b in x] for a in x])
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(d, ref, atol=1e-6)
    assert d[3, 4] == 0.0 and d[3, 5] == 1.0


def test_recall_hist_comparison(tmp_path):
    rng = np.random.default_rng(0)
    _ok(plots.plot_recall_curve({"img2gene": rng.integers(1, 100, 100)}, tmp_path / "r.png"))
    table = pd.DataFrame({"gene": ["a", "b", "c"] * 2, "donor": ["x"] * 3 + ["y"] * 3,
                          "pearson": [0.1, 0.5, np.nan, 0.3, 0.2, 0.9]})  # fmt: skip
    _ok(plots.plot_pearson_hist(table, tmp_path / "h.png"))
    comp = pd.DataFrame(
        {"contrastive_img": [0.5, 0.7], "frozen_img": [0.4, np.nan]}, index=["a", "b"]
    )
    _ok(plots.plot_comparison(comp, tmp_path / "c.png"))
