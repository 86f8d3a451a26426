"""The torch similarity engine (GPU path of retrieval / BLEEP / kNN) against the numpy path.

Run on torch's CPU device here: the same rules (top-k best first with ties to the lower
index, ranks with ties against, gene2img down the columns), the same numbers on inputs
without float32-rounding ties. On a GPU only the products' rounding differs.
"""

from __future__ import annotations

import numpy as np
import pytest

from hescape.evaluate.similarity import TorchEngine, default_engine
from hescape.metrics.probes import retrieval_expression_probe
from hescape.metrics.retrieval import (
    cross_modal_retrieval,
    retrieval_ranks,
    top_k_rows,
    topk_blocked,
)

ENGINE = TorchEngine("cpu")


@pytest.mark.parametrize(("nq", "nc", "d", "k", "block"),
                         [(300, 5000, 16, 15, 128), (40, 30, 8, 15, 7), (90, 1200, 4, 10, 1024)])
def test_top_k_equals_numpy(nq, nc, d, k, block):
    rng = np.random.default_rng(nq)
    q, c = rng.normal(size=(nq, d)), rng.normal(size=(nc, d))
    c[10:20] = c[0]  # ten equal candidates: ties to the lower index
    q[5] = c[3]
    want, got = topk_blocked(q, c, k, block), topk_blocked(q, c, k, block, engine=ENGINE)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


@pytest.mark.parametrize("kind", ["integers", "rounded", "nan"])
def test_device_selection_rule_is_top_k_rows(kind):
    import torch

    rng = np.random.default_rng(1)
    if kind == "integers":  # mass ties at the bound: the row-by-row fallback
        s = rng.integers(0, 5, size=(20, 3000)).astype(np.float32)
    else:
        s = np.round(rng.normal(size=(20, 3000)), 1).astype(np.float32)
    if kind == "nan":
        s[2, 40], s[3, 7] = np.nan, np.inf
    want = top_k_rows(s, 15)
    got = ENGINE._top_k_rows(torch.from_numpy(s), 15)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_ranks_equal_numpy(block):
    rng = np.random.default_rng(block)
    img = rng.normal(size=(150, 12))
    gene = img + 0.8 * rng.normal(size=img.shape)
    img[3], gene[3] = img[4], gene[4]
    gene[9] = gene[10]
    want, got = retrieval_ranks(img, gene, block), retrieval_ranks(img, gene, block, engine=ENGINE)
    for direction in ("img2gene", "gene2img"):
        np.testing.assert_array_equal(got[direction], want[direction])
    flat = retrieval_ranks(np.ones((5, 3)), np.ones((5, 3)), 2, engine=ENGINE)
    assert (flat["img2gene"] == 5).all() and (flat["gene2img"] == 5).all()


def test_probes_through_the_engine_give_the_same_figures():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(240, 10))
    gene = img + 0.7 * rng.normal(size=img.shape)
    donors = np.repeat(["a", "b", "c"], 80)
    kw = dict(donors=donors, block_size=50, inbatch_size=32, inbatch_repeats=2)
    assert cross_modal_retrieval(img, gene, engine=ENGINE, **kw) == cross_modal_retrieval(
        img, gene, **kw)
    expr = np.abs(img @ rng.normal(size=(10, 20)))
    genes = [f"g{i}" for i in range(20)]
    args = (gene[:160], expr[:160], img[160:], expr[160:])
    kw = dict(test_donors=donors[160:], gene_names=genes, k=5, n_top=8, block_size=32)
    want, _ = retrieval_expression_probe(*args, **kw)
    got, _ = retrieval_expression_probe(*args, engine=ENGINE, **kw)
    assert got == want


def test_default_engine_is_the_gpu_or_numpy():
    import torch

    engine = default_engine()
    if torch.cuda.is_available():
        assert engine is not None and engine.device.type == "cuda"
    else:
        assert engine is None
