"""Expression variants: normalisation, held-out audit flags, inductive fits, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.config import ExpressionPreprocess
from hescape.preprocess import apply_expression_variant, measure_variant, normalize_log1p
from hescape.preprocess.spec import get_method, method_names


def test_config_schema_is_generated_from_the_registry():
    literal = ExpressionPreprocess.model_fields["method"].annotation.__args__
    assert sorted(literal) == method_names()
    for name in method_names():
        spec = get_method(name)
        if spec.options is not None:  # each method's options nested under its own name
            assert ExpressionPreprocess.model_fields[name].annotation is spec.options


def test_normalize_log1p_definition(toy):
    x = normalize_log1p(toy, target_sum=100)
    counts = toy.X
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 100)
    np.testing.assert_allclose(x, expected, rtol=1e-5)
    assert x.dtype == np.float32
    toy.X[0] = 0
    assert np.all(normalize_log1p(toy)[0] == 0)  # empty spot: zeros, not NaN


@pytest.mark.parametrize("block_cells", [2**22, 50])  # one block; blocks of 4 rows (12 genes)
def test_normalize_log1p_sparse_counts_equal_dense(toy, monkeypatch, block_cells):
    """Sparse counts (the stored form) give exactly the dense path's values, whether the rows
    are normalised in one block or several: log1p runs on the stored entries only and each
    block is written into the float32 result."""
    from scipy import sparse

    from hescape.preprocess import expression

    monkeypatch.setattr(expression, "ROWS_PER_BLOCK_CELLS", block_cells)
    toy.X[0] = 0
    dense = normalize_log1p(toy)
    toy.X = sparse.csr_matrix(toy.X)
    out = normalize_log1p(toy)
    assert out.dtype == np.float32 and isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, dense)


def test_none_and_pca_flags(toy):
    none = apply_expression_variant(toy, ExpressionPreprocess(), batch_key="donor")
    assert none.method == "none" and not none.saw_heldout and none.X.shape == (60, 12)
    assert none.feature_names == list(toy.var_names)
    mask = toy.obs["donor"].to_numpy() != "d2"
    pca = apply_expression_variant(toy, ExpressionPreprocess(method="pca", pca={"n_pcs": 4}),
                                   batch_key="donor", train_mask=mask)
    assert pca.X.shape == (60, 4) and not pca.saw_heldout
    unaudited = apply_expression_variant(toy, ExpressionPreprocess(method="pca", pca={"n_pcs": 4}),
                                         batch_key="donor")
    assert unaudited.saw_heldout  # no mask: cannot tell, so flagged


@pytest.mark.parametrize("kw", [{"method": "pca", "pca": {"n_pcs": 4}},
                                {"method": "harmony", "harmony": {"n_pcs": 4}}])
def test_inductive_training_rows_ignore_heldout(toy, kw):
    """Changing held-out expression must not change the training rows' representation."""
    cfg = ExpressionPreprocess(**kw)
    mask = toy.obs["donor"].to_numpy() != "d2"
    a = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask)
    other = toy.copy()
    other.X[~mask] = np.random.default_rng(1).poisson(9.0, size=(int((~mask).sum()), 12))
    b = apply_expression_variant(other, cfg, batch_key="donor", train_mask=mask)
    np.testing.assert_allclose(a.X[mask], b.X[mask], atol=1e-5)
    assert not a.saw_heldout


@pytest.mark.parametrize("method", ["harmony", "combat"])
def test_transductive_flagged(toy, method):
    mask = toy.obs["donor"].to_numpy() != "d2"
    cfg = ExpressionPreprocess.model_validate({"method": method, method: {"mode": "transductive"}})
    out = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask)
    assert out.saw_heldout and np.isfinite(out.X).all()


def test_harmony_records_convergence(toy):
    out = apply_expression_variant(toy, ExpressionPreprocess(method="harmony", harmony={"n_pcs": 4}),
                                   batch_key="donor")
    assert isinstance(out.info["converged"], bool) and out.info["iterations"] >= 1


# ------------------------------------------------------------------------ bad input
def test_missing_batch_key_names_columns(toy):
    with pytest.raises(ValueError, match=r"'sample' is not an obs column.*donor, state"):
        apply_expression_variant(toy, ExpressionPreprocess(method="harmony"), batch_key="sample")


def test_nan_in_batch_key(toy):
    toy.obs["donor"] = toy.obs["donor"].astype(object)
    toy.obs.iloc[5, toy.obs.columns.get_loc("donor")] = np.nan
    with pytest.raises(ValueError, match=r"1 missing values \(first at row 5"):
        apply_expression_variant(toy, ExpressionPreprocess(method="combat"), batch_key="donor")


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).needs_batches])
def test_single_spot_batch(toy, method):
    toy.obs["donor"] = toy.obs["donor"].astype(str)
    toy.obs.iloc[0, toy.obs.columns.get_loc("donor")] = "lonely"
    with pytest.raises(ValueError, match=r"\['lonely'\] have a single spot"):
        apply_expression_variant(toy, ExpressionPreprocess(method=method), batch_key="donor")


def test_scvi_non_integer_counts(toy, monkeypatch):
    toy.X = toy.X + 0.5

    def never(*args, **kwargs):
        raise AssertionError("scVI started training on non-integer counts")

    # the spec is frozen; swap its run for this test only (the check must run before it)
    monkeypatch.setitem(vars(get_method("scvi")), "run", never)
    with pytest.raises(ValueError, match="allow_non_integer"):
        apply_expression_variant(toy, ExpressionPreprocess(method="scvi"), batch_key="donor")


def test_negative_counts_rejected(toy):
    toy.X[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        apply_expression_variant(toy, ExpressionPreprocess(), batch_key="donor")


def test_measure_variant_prefix_and_ignored_labels(toy):
    out = apply_expression_variant(toy, ExpressionPreprocess(), batch_key="donor")
    toy.obs["state"] = toy.obs["state"].astype(str)
    toy.obs.iloc[:10, toy.obs.columns.get_loc("state")] = "NA"
    m = measure_variant(out, toy, batch_key="donor", label_key="state", ignore_labels=["NA"])
    assert {"pre/ilisi", "pre/kbet", "pre/ari_kmeans", "pre/silhouette_label", "pre/n_batches"} <= set(m)
    assert m["pre/n_batches"] == 3
    assert m["pre/subsample_n"] == 50
