"""Retrieval against a brute-force reference, plus perfect / random / within-donor / in-batch."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.metrics.retrieval import (
    cross_modal_retrieval,
    fixed_gallery_retrieval,
    l2_normalize,
    rank_of_true,
    recall_by_donor,
    retrieval_ranks,
    top_k_rows,
    top_k_rows_exact,
    topk_blocked,
)


def _brute_ranks(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    s = l2_normalize(q) @ l2_normalize(c).T
    return np.array([(s[i] >= s[i, i]).sum() for i in range(len(q))])


def _pair(n: int, d: int = 8, noise: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d))
    return a, a + noise * rng.normal(size=(n, d))


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_rank_matches_brute_force(block):
    img, gene = _pair(53)
    np.testing.assert_array_equal(rank_of_true(img, gene, block), _brute_ranks(img, gene))


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_both_directions_from_one_product_equal_rank_of_true(block):
    img, gene = _pair(130, d=12, noise=0.7, seed=5)
    img[3], gene[3] = img[4], gene[4]  # a duplicated pair: ties both ways
    gene[9] = gene[10]
    ranks = retrieval_ranks(img, gene, block)
    np.testing.assert_array_equal(ranks["img2gene"], rank_of_true(img, gene, block))
    np.testing.assert_array_equal(ranks["gene2img"], rank_of_true(gene, img, block))
    np.testing.assert_array_equal(ranks["gene2img"], _brute_ranks(gene, img))
    flat = retrieval_ranks(np.ones((6, 3)), np.ones((6, 3)), 4)  # ties count against
    assert (flat["img2gene"] == 6).all() and (flat["gene2img"] == 6).all()


@pytest.mark.parametrize("block", [1, 5, 100])
def test_topk_matches_brute_force(block):
    img, gene = _pair(40, seed=1)
    idx, scores = topk_blocked(img, gene, 5, block)
    s = l2_normalize(img) @ l2_normalize(gene).T
    ref = np.argsort(-s, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(scores, np.take_along_axis(s, ref, 1), rtol=1e-6)


def test_topk_ties_go_to_lower_index():
    q = np.ones((2, 3))
    c = np.ones((6, 3))
    idx, _ = topk_blocked(q, c, 3, block_size=1)
    np.testing.assert_array_equal(idx, [[0, 1, 2], [0, 1, 2]])


@pytest.mark.parametrize("kind", ["continuous", "rounded", "integers", "repeated"])
def test_top_k_rows_equals_row_by_row_selection(kind):
    # the bounded pool (every 16th column) must give exactly the row-by-row selection,
    # ties to the lower column included: long rows (the pool path), short ones (exact bound)
    rng = np.random.default_rng(len(kind))
    for b, n, k in [(7, 3000, 15), (33, 5000, 10), (5, 200, 15), (4, 12, 12), (9, 961, 15)]:
        s = rng.normal(size=(b, n)).astype(np.float32)
        if kind == "rounded":
            s = np.round(s, 1)
        elif kind == "integers":
            s = rng.integers(0, 6, size=(b, n)).astype(np.float32)  # mass ties at the bound
        elif kind == "repeated":
            s[:, ::7] = s[:, :1]
        got, want = top_k_rows(s, k), top_k_rows_exact(s, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_top_k_rows_with_a_few_mass_tie_rows():
    # rows whose bound keeps thousands of tied entries go row by row, the others pooled
    s = np.random.default_rng(5).normal(size=(50, 4000)).astype(np.float32)
    s[3] = 0.5  # a zero query: every candidate ties
    s[7, ::2] = 3.0
    got, want = top_k_rows(s, 15), top_k_rows_exact(s, 15)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_top_k_rows_ranks_nan_last():
    s = np.random.default_rng(0).normal(size=(3, 2000)).astype(np.float32)
    s[1, 17], s[1, 5] = np.nan, np.inf
    idx, scores = top_k_rows(s, 5)
    want = top_k_rows_exact(np.where(np.isnan(s), -np.inf, s), 5)
    np.testing.assert_array_equal(idx, want[0])
    assert idx[1, 0] == 5 and 17 not in idx[1]
    assert np.isfinite(scores[[0, 2]]).all()


def test_topk_of_a_collapsed_embedding_keeps_lowest_indices():
    idx, scores = topk_blocked(np.ones((4, 3)), np.ones((5000, 3)), 15, block_size=3)
    np.testing.assert_array_equal(idx, np.tile(np.arange(15), (4, 1)))
    assert np.allclose(scores, 1.0)


def test_ties_count_against():
    x = np.ones((10, 4))
    ranks = rank_of_true(x, x, 3)
    assert (ranks == 10).all()
    m = cross_modal_retrieval(x, x, inbatch_size=5, inbatch_repeats=2)
    assert m["r1_img2gene"] == 0.0


def test_perfect_embeddings_give_recall_one():
    img, _ = _pair(200)
    m = cross_modal_retrieval(img, img * 3.0, donors=np.repeat(["a", "b"], 100), block_size=17)
    for key in ("r1_img2gene", "r1_gene2img", "r1_img2gene_within_donor", "inbatch64_r5_img2gene"):
        assert m[key] == 1.0, key
    assert m["mean_rank_img2gene"] == 1.0 and m["median_rank_gene2img"] == 1.0
    assert all("@" not in k for k in m)


def test_random_embeddings_give_about_k_over_n():
    rng = np.random.default_rng(3)
    n = 1000
    m = cross_modal_retrieval(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)), block_size=128)
    for k in (1, 5, 10):
        expected = k / n
        sd = np.sqrt(expected * (1 - expected) / n)
        assert abs(m[f"r{k}_img2gene"] - expected) < 4 * sd + 1e-3
    assert abs(m["mean_rank_img2gene"] - (n + 1) / 2) < 0.1 * n
    assert abs(m["inbatch64_r5_img2gene"] - 5 / 64) < 0.02


def test_within_donor_uses_only_same_donor_candidates():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(60, 6))
    gene = img + 0.8 * rng.normal(size=img.shape)
    donors = np.repeat(["d0", "d1", "d2"], 20)
    m = cross_modal_retrieval(img, gene, donors=donors, ks=(1, 5))
    ref = np.concatenate(
        [_brute_ranks(img[donors == d], gene[donors == d]) for d in "d0 d1 d2".split()]
    )
    assert m["r5_img2gene_within_donor"] == pytest.approx(np.mean(ref <= 5))
    assert m["mean_rank_img2gene_within_donor"] == pytest.approx(ref.mean())
    # fewer candidates can only help
    assert m["r1_img2gene_within_donor"] >= m["r1_img2gene"]


def test_in_batch_matches_reference_and_is_seeded():
    img, gene = _pair(130, noise=1.0, seed=4)
    kw = dict(inbatch_size=32, inbatch_repeats=3, seed=7, ks=(5,))
    m1, m2 = cross_modal_retrieval(img, gene, **kw), cross_modal_retrieval(img, gene, **kw)
    assert m1["inbatch32_r5_img2gene"] == m2["inbatch32_r5_img2gene"]
    rng = np.random.default_rng(7)
    hits = []
    for _ in range(3):
        perm = rng.permutation(130)
        for start in range(0, 130 - 32 + 1, 32):
            rows = perm[start : start + 32]
            hits.append(_brute_ranks(img[rows], gene[rows]) <= 5)
    assert m1["inbatch32_r5_img2gene"] == pytest.approx(np.concatenate(hits).mean())
    # exactly the per-batch ranks of retrieval_ranks (its normalisation and tie rule), also
    # with duplicated pairs (ties) in the set
    img[7], gene[7] = img[8], gene[8]
    m3 = cross_modal_retrieval(img, gene, inbatch_size=32, inbatch_repeats=3, seed=7, ks=(1, 5))
    rng = np.random.default_rng(7)
    parts = {"img2gene": [], "gene2img": []}
    ni, ng = l2_normalize(img), l2_normalize(gene)
    for _ in range(3):
        perm = rng.permutation(130)
        for start in range(0, 130 - 32 + 1, 32):
            rows = perm[start : start + 32]
            for direction, r in retrieval_ranks(ni[rows], ng[rows], 32).items():
                parts[direction].append(r)
    for direction, r in parts.items():
        r = np.concatenate(r)
        for k in (1, 5):
            assert m3[f"inbatch32_r{k}_{direction}"] == np.mean(r <= k)
    # a smaller batch is an easier task than the whole set
    assert m1["inbatch32_r5_img2gene"] > m1["r5_img2gene"]


def test_small_set_names_real_batch_size():
    img, gene = _pair(20)
    m = cross_modal_retrieval(img, gene, inbatch_size=64, inbatch_repeats=2)
    assert "inbatch20_r5_img2gene" in m and "inbatch64_r5_img2gene" not in m


def test_clear_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        cross_modal_retrieval(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="donors"):
        cross_modal_retrieval(np.eye(4), np.eye(4), donors=["a"])
    with pytest.raises(ValueError, match="block_size"):
        rank_of_true(np.eye(3), np.eye(3), 0)


def test_fixed_gallery_recall_is_size_invariant_and_matches_reference():
    # same embedding quality, sets of 1,500 and 6,000 pairs: the whole-set recall falls with
    # the set size, the fixed-gallery recall does not
    small, large = _pair(1500, d=16, noise=1.2, seed=1), _pair(6000, d=16, noise=1.2, seed=2)
    whole = [cross_modal_retrieval(*p, inbatch_repeats=1)["r5_img2gene"] for p in (small, large)]
    fixed = [fixed_gallery_retrieval(*p, size=500, draws=3, ks=(5,))["r5_img2gene_gallery500"]
             for p in (small, large)]  # fmt: skip
    assert whole[1] < 0.7 * whole[0]
    assert fixed[1] == pytest.approx(fixed[0], rel=0.15)
    # reference: the same seeded draws, brute-force ranks inside each gallery, averaged
    img, gene = small
    rng = np.random.default_rng(7)
    ref = []
    for _ in range(3):
        rows = np.sort(rng.choice(len(img), 500, replace=False))
        ref.append(np.mean(_brute_ranks(img[rows], gene[rows]) <= 5))
    m = fixed_gallery_retrieval(img, gene, size=500, draws=3, ks=(1, 5), seed=7)
    assert m["r5_img2gene_gallery500"] == pytest.approx(np.mean(ref))
    assert set(m) == {f"{s}_{d}_gallery500" for s in ("r1", "r5", "mean_rank")
                      for d in ("img2gene", "gene2img")}  # fmt: skip


def test_fixed_gallery_refuses_too_few_pairs():
    with pytest.raises(ValueError, match="needs 1000 held-out pairs, there are 300"):
        fixed_gallery_retrieval(*_pair(300), size=1000)


def test_recall_by_donor_ranks_over_the_whole_gallery():
    img, gene = _pair(60, noise=0.8)
    donors = np.repeat(["a", "b", "c"], 20)
    ranks = retrieval_ranks(img, gene)
    rows = recall_by_donor(ranks, donors, ks=(1, 5))
    table = {(m, d): (v, n) for m, d, v, n in rows}
    brute = _brute_ranks(img, gene)  # whole 60-pair gallery, not the donor's 20
    for i, d in enumerate("abc"):
        assert table[("r5_img2gene", d)] == (np.mean(brute[20 * i : 20 * i + 20] <= 5), 20)
    assert len(rows) == 2 * 3 * 2
