"""pca_regress: the method added as one module (plus this test) to prove the registry."""

from __future__ import annotations

import numpy as np

from hescape.config import ExpressionPreprocess, SimulateConfig, validate_config
from hescape.data import simulate_expression
from hescape.preprocess import apply_expression_variant, measure_variant
from hescape.preprocess.methods.pca_regress import regress_batches


def test_regress_batches_removes_known_offsets():
    rng = np.random.default_rng(0)
    batches = np.repeat(["a", "b", "c"], 50)
    offsets = {"a": 0.0, "b": 3.0, "c": -2.0}
    z = rng.normal(size=(150, 4)) + np.array([offsets[b] for b in batches])[:, None]
    train = batches != "c"
    out = regress_batches(z, batches, train)
    grand = z[train].mean(0)
    for b in "abc":  # every batch now sits on the training grand mean, "c" from its own cells
        np.testing.assert_allclose(out[batches == b].mean(0), grand, atol=1e-5)
    # within-batch structure is untouched
    np.testing.assert_allclose(out[batches == "c"] - out[batches == "c"].mean(0),
                               z[batches == "c"] - z[batches == "c"].mean(0), atol=1e-5)


def test_registered_with_config_section_and_raises_mixing():
    cfg = validate_config({"preprocess": {"expression": {"method": "pca_regress",
                                                         "pca_regress": {"n_pcs": 10}}}})
    adata, _ = simulate_expression(SimulateConfig(n_donors=4, spots_per_donor=150, n_genes=60,
                                                  n_states=3, donor_effect=1.0, seed=0))
    donors = adata.obs["donor"].astype(str).to_numpy()
    train = donors != sorted(set(donors))[-1]
    out = apply_expression_variant(adata, cfg.preprocess.expression, batch_key="donor",
                                   train_mask=train, progress=False)
    pca = apply_expression_variant(adata, ExpressionPreprocess(method="pca", pca={"n_pcs": 10}),
                                   batch_key="donor", train_mask=train, progress=False)
    assert out.X.shape == (adata.n_obs, 10) and out.kind == "features" and not out.saw_heldout
    m = measure_variant(out, adata, batch_key="donor", label_key="state")
    base = measure_variant(pca, adata, batch_key="donor", label_key="state")
    assert m["pre/ilisi"] > base["pre/ilisi"] + 0.05, (m, base)
