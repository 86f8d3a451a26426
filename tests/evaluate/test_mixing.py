"""Batch-mixing / bio-conservation metrics checked against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from hescape.evaluate.mixing import (
    kbet_acceptance,
    lisi,
    mixing_metrics,
    stratified_subsample,
)


def _interleaved(n_sites=8, per_batch=60, n_batches=2, seed=0):
    """Far-apart sites, each holding the same number of cells of every batch: mixed by design."""
    rng = np.random.default_rng(seed)
    emb, batch = [], []
    for site in range(n_sites):
        for b in range(n_batches):
            emb.append(rng.normal(size=(per_batch, 5)) + 100 * site)
            batch += [b] * per_batch
    return np.concatenate(emb), np.array(batch)


def _separated(n=200, n_batches=2, seed=0):
    rng = np.random.default_rng(seed)
    emb = np.concatenate([rng.normal(size=(n, 5)) + 50 * b for b in range(n_batches)])
    batch = np.repeat(np.arange(n_batches), n)
    return emb, batch


@pytest.mark.parametrize("n_batches", [2, 3])
def test_ilisi_interleaved_is_one(n_batches):
    emb, batch = _interleaved(n_batches=n_batches)
    m = mixing_metrics(emb, batch)
    assert m["ilisi"] > 0.85  # scib-style LISI keeps a finite-neighbourhood bias
    assert m["kbet"] > 0.9
    assert m["silhouette_batch"] > 0.9


def test_ilisi_random_batches_close_to_one():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(1000, 8))
    batch = rng.integers(0, 2, size=1000)
    m = mixing_metrics(emb, batch)
    assert m["ilisi"] > 0.85  # finite-neighbourhood bias (as scib's): ~0.9, not 1
    assert m["kbet"] > 0.85  # alpha 0.05: ~95% accepted under the null


@pytest.mark.parametrize("n_batches", [2, 4])
def test_separated_batches_score_zero(n_batches):
    emb, batch = _separated(n_batches=n_batches)
    m = mixing_metrics(emb, batch)
    assert m["ilisi"] < 0.02
    assert m["kbet"] < 0.02
    assert m["silhouette_batch"] < 0.1


def test_ilisi_orders_partial_mixing():
    emb, batch = _separated()
    rng = np.random.default_rng(0)
    mixed = batch.copy()
    flip = rng.random(len(batch)) < 0.25  # a quarter of each blob relabelled
    mixed[flip] = 1 - mixed[flip]
    scores = [mixing_metrics(emb, b)["ilisi"] for b in (batch, mixed, rng.permutation(batch))]
    assert scores[0] < scores[1] < scores[2]


def test_lisi_uniform_weights_hand_case():
    # equal distances -> uniform weights over the neighbourhood; 4 neighbours, batches 0,0,1,1
    nn_idx = np.array([[1, 2, 3, 4]])
    dist = np.ones((1, 4))
    codes = np.array([0, 0, 0, 1, 1])
    # Simpson = 0.5^2 + 0.5^2 = 0.5 -> LISI 2 ; perplexity 4 = all four neighbours equally
    assert lisi(nn_idx, dist, codes, perplexity=4)[0] == pytest.approx(2.0)
    codes_one = np.array([0, 0, 0, 0, 0])
    assert lisi(nn_idx, dist, codes_one, perplexity=4)[0] == pytest.approx(1.0)


def test_lisi_perplexity_calibrates_effective_neighbourhood():
    # distances grow: perplexity 2 puts nearly all weight on ~2 neighbours
    nn_idx = np.array([[1, 2, 3, 4, 5, 6]])
    dist = np.array([[0.0, 0.0, 5.0, 5.0, 5.0, 5.0]])
    codes = np.array([0, 0, 0, 1, 1, 1, 1])
    # the two near neighbours are batch 0 (self is not counted) -> LISI ~ 1
    assert lisi(nn_idx, dist, codes, perplexity=2)[0] == pytest.approx(1.0, abs=0.05)


def test_kbet_hand_case():
    codes = np.array([0] * 10 + [1] * 10)
    # balanced neighbourhoods accepted, one-batch neighbourhoods rejected
    balanced = np.tile(np.r_[np.arange(5), np.arange(10, 15)], (20, 1))
    assert kbet_acceptance(balanced, codes) == 1.0
    pure = np.tile(np.arange(10), (20, 1))
    assert kbet_acceptance(pure, codes) == 0.0


def test_bio_metrics_with_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 100)
    centers = {"a": 0, "b": 20, "c": 40}
    emb = np.stack([rng.normal(size=4) + centers[lab] for lab in labels])
    batch = rng.integers(0, 2, size=300)
    m = mixing_metrics(emb, batch, labels)
    assert m["nmi"] == pytest.approx(1.0)
    assert m["ari"] == pytest.approx(1.0)
    assert m["graph_connectivity"] == pytest.approx(1.0)
    assert m["silhouette_label"] == pytest.approx((silhouette_score(emb, labels) + 1) / 2)
    assert m["silhouette_label"] > 0.9
    assert m["ilisi"] > 0.7  # batches random within each cluster


def test_graph_connectivity_split_label():
    # label "a" lives in two far-apart blobs -> largest component is half of it
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) + 100,
                          rng.normal(size=(100, 3)) + 200])
    labels = np.array(["a"] * 100 + ["b"] * 100)
    m = mixing_metrics(emb, np.arange(200) % 2, labels, n_neighbors=5)
    assert m["graph_connectivity"] == pytest.approx(0.75)


def test_subsample_recorded_and_stratified():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3000, 4))
    batch = np.array(["x"] * 2000 + ["y"] * 1000)
    m = mixing_metrics(emb, batch, subsample=300, seed=7)
    assert m["subsample_n"] == 300 and m["subsample_seed"] == 7
    idx = stratified_subsample(batch, 300, seed=7)
    assert (batch[idx] == "x").sum() == 200
    assert np.array_equal(idx, stratified_subsample(batch, 300, seed=7))
    assert not np.array_equal(idx, stratified_subsample(batch, 300, seed=8))
    full = mixing_metrics(emb, batch, subsample=None)
    assert full["subsample_n"] == 3000


def test_single_batch_gives_nan_not_error():
    rng = np.random.default_rng(0)
    m = mixing_metrics(rng.normal(size=(50, 3)), np.zeros(50), np.arange(50) % 2)
    assert np.isnan(m["ilisi"]) and np.isnan(m["kbet"])
    assert 0 <= m["ari"] <= 1 or np.isnan(m["ari"])


def test_bad_input_messages():
    emb = np.zeros((30, 2))
    with pytest.raises(ValueError, match="one entry per row"):
        mixing_metrics(emb, np.zeros(29))
    with pytest.raises(ValueError, match="missing"):
        mixing_metrics(emb, [np.nan] + [1.0] * 29)
    with pytest.raises(ValueError, match="NaN or inf"):
        mixing_metrics(np.full((30, 2), np.nan), np.zeros(30))
