"""ComBat: scanpy's numbers when fitted on every row; an inductive mode that corrects held-out
donors from their own cells against the training reference."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.config import ExpressionPreprocess
from hescape.preprocess import apply_expression_variant, normalize_log1p
from hescape.preprocess.methods.combat import combat


def test_transductive_equals_scanpy_combat(starmap):
    """All rows fitted: the same numbers as sc.pp.combat (real STARmap, 3 sections)."""
    sc = pytest.importorskip("scanpy")
    from anndata import AnnData

    x = normalize_log1p(starmap).astype(np.float64)
    batches = starmap.obs["batch"].astype(str).to_numpy()
    tmp = AnnData(X=x.copy())
    tmp.obs["batch"] = batches
    expected = sc.pp.combat(tmp, key="batch", inplace=False)
    got, info = combat(x, batches, np.ones(len(x), dtype=bool))
    np.testing.assert_allclose(got, expected, atol=1e-8)
    assert info["heldout_batches_mapped"] == 0


def _shifted(seed: int = 0, n_per: int = 150, n_genes: int = 40):
    """Log-scale data: two balanced cell states, and per donor a gene-wise location shift
    and scale (the batch effect). Donors d4, d5 are held out."""
    rng = np.random.default_rng(seed)
    state_means = rng.normal(2.0, 1.0, size=(2, n_genes))
    rows, donors, states = [], [], []
    for d in range(6):
        shift = rng.normal(0.0, 1.0, n_genes)
        scale = rng.uniform(0.6, 1.6, n_genes)
        state = np.arange(n_per) % 2
        noise = rng.normal(0.0, 0.5, size=(n_per, n_genes)) * scale
        rows.append(state_means[state] + shift + noise)
        donors += [f"d{d}"] * n_per
        states.append(state)
    return np.vstack(rows), np.array(donors), np.concatenate(states)


def _offset(y, donors, states, train, donor):
    """Mean |donor mean - training mean| over genes, within each state, averaged."""
    gaps = [np.abs(y[(donors == donor) & (states == s)].mean(0)
                   - y[train & (states == s)].mean(0)).mean() for s in (0, 1)]
    return float(np.mean(gaps))


def test_inductive_removes_a_heldout_donors_shift():
    y, donors, states = _shifted()
    train = ~np.isin(donors, ["d4", "d5"])
    out, info = combat(y, donors, train)
    assert info["heldout_batches_mapped"] == 2
    for donor in ("d4", "d5"):
        before = _offset(y, donors, states, train, donor)
        after = _offset(out, donors, states, train, donor)
        assert after < 0.25 * before, (donor, before, after)
        # the state contrast (biology) survives within the held-out donor
        rows = donors == donor
        c_before = y[rows & (states == 1)].mean(0) - y[rows & (states == 0)].mean(0)
        c_after = out[rows & (states == 1)].mean(0) - out[rows & (states == 0)].mean(0)
        assert np.corrcoef(c_before, c_after)[0, 1] > 0.95


def test_heldout_donors_are_adjusted_independently_of_each_other():
    """Each held-out donor is adjusted from its own cells: changing d5 leaves d4 unchanged."""
    y, donors, _ = _shifted()
    train = ~np.isin(donors, ["d4", "d5"])
    a, _ = combat(y, donors, train)
    y2 = y.copy()
    y2[donors == "d5"] += 3.0
    b, _ = combat(y2, donors, train)
    np.testing.assert_allclose(a[donors != "d5"], b[donors != "d5"], atol=1e-10)


def test_inductive_through_the_entry_point(toy):
    mask = toy.obs["donor"].to_numpy() != "d2"
    out = apply_expression_variant(toy, ExpressionPreprocess(method="combat"), batch_key="donor",
                                   train_mask=mask, progress=False)
    assert out.kind == "features" and not out.saw_heldout
    assert out.info["fit_rows"] == "training" and out.info["heldout_batches_mapped"] == 1
