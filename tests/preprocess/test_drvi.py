"""DRVI (drvi-py) as a preprocessing method: batch-conditioned latent, inductive by default.

Unit tests run tiny models (a few epochs, narrow layers) on the toy set; the generic method
matrix (test_methods.py) covers output kind, protocol, batch needs, option nesting and the
cache key. The real-data acceptance on STARmap (3 sections as batches) is slow: DRVI at its
default settings (128 latent dims, 128-128 layers, scvi-tools' epoch rule with early
stopping) trains for minutes on a 400-cell subsample on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from hescape.config import ConfigError, ExpressionPreprocess, validate_config
from hescape.preprocess import apply_expression_variant, measure_variant
from hescape.preprocess.spec import get_method, method_names

pytest.importorskip("drvi")

TINY = {"n_latent": 4, "n_hidden": 16, "n_layers": 1}


def _cfg(**options) -> ExpressionPreprocess:
    return ExpressionPreprocess(method="drvi", drvi={**TINY, **options})


def _mask(adata) -> np.ndarray:
    return adata.obs["donor"].to_numpy() != "d2"


def _rule(n_cells: int) -> int:
    """scvi-tools' get_max_epochs_heuristic, written out."""
    return max(min(round(20000 / n_cells * 400), 400), 1)


def test_registered_with_drvi_recommended_defaults():
    assert "drvi" in method_names()
    spec = get_method("drvi")
    opts = ExpressionPreprocess(method="drvi").drvi
    # DRVI's tutorials and HESCAPE's drvi_pretrain: 128 latent dims, 128-128 layers
    assert (opts.n_latent, opts.n_layers, opts.n_hidden) == (128, 2, 128)
    assert opts.encode_covariates and opts.covariate_key is None  # = data.batch_key
    assert opts.max_epochs is None and opts.early_stopping and opts.mode == "inductive"
    assert spec.needs_batches and spec.kind(opts) == "features"
    assert set(spec.protocols) == {"inductive", "transductive"}


def test_scarches_maps_heldout_donors_and_output_is_a_signed_latent(toy):
    mask = _mask(toy)
    out = apply_expression_variant(toy, _cfg(max_epochs=3, early_stopping=False),
                                   batch_key="donor", train_mask=mask, progress=False)
    assert out.kind == "features" and not out.saw_heldout
    assert out.X.shape == (toy.n_obs, 4) and np.isfinite(out.X).all()
    assert (out.X < 0).any() and (out.X > 0).any()  # signed: no expression encoder takes it
    assert out.feature_names == ["drvi_1", "drvi_2", "drvi_3", "drvi_4"]
    info = out.info
    assert info["heldout_mapping"] == "scarches" and info["protocol"] == "inductive"
    assert info["query_epochs_run"] == 3  # the query (new donor's weights) was trained
    assert info["drvi_version"] and info["n_covariate_train"] == 2
    assert not np.allclose(out.X[~mask], 0.0)


def test_covariate_blind_encoder_maps_each_heldout_cell_on_its_own(toy):
    """encode_covariates false (DRVI's default architecture, HESCAPE's run): nothing trains on
    held-out donors, so a held-out cell's latent does not depend on the other held-out cells."""
    mask = _mask(toy)
    cfg = _cfg(max_epochs=3, early_stopping=False, encode_covariates=False)
    a = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask, progress=False)
    assert a.info["heldout_mapping"] == "encoder" and "query_epochs_run" not in a.info
    other = toy.copy()
    held = np.flatnonzero(~mask)
    other.X[held[1:]] = np.random.default_rng(3).poisson(9.0, size=(len(held) - 1, 12))
    b = apply_expression_variant(other, cfg, batch_key="donor", train_mask=mask,
                                 progress=False)
    np.testing.assert_allclose(a.X[mask], b.X[mask], atol=1e-5)
    np.testing.assert_allclose(a.X[held[0]], b.X[held[0]], atol=1e-5)


def test_scarches_query_trains_on_the_heldout_cells(toy):
    """With the encoder seeing the covariate, the new donor's weights are fitted on its cells:
    changing the other held-out cells moves a held-out cell's latent (not the training rows)."""
    mask = _mask(toy)
    cfg = _cfg(max_epochs=5, early_stopping=False)
    a = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask, progress=False)
    other = toy.copy()
    held = np.flatnonzero(~mask)
    other.X[held[1:]] = np.random.default_rng(3).poisson(9.0, size=(len(held) - 1, 12))
    b = apply_expression_variant(other, cfg, batch_key="donor", train_mask=mask,
                                 progress=False)
    np.testing.assert_allclose(a.X[mask], b.X[mask], atol=1e-5)
    assert not np.allclose(a.X[held[0]], b.X[held[0]], atol=1e-5)


def test_early_stopping_records_epochs_warmup_and_convergence(toy):
    """Patience 1 on a tiny set: the held-out ELBO stops training long before the cap."""
    mask = _mask(toy)
    out = apply_expression_variant(toy, _cfg(early_stopping_patience=1), batch_key="donor",
                                   train_mask=mask, progress=False)
    info = out.info
    assert info["max_epochs"] == _rule(int(mask.sum()))  # the rule on the reference cells
    assert info["query_max_epochs"] == _rule(int((~mask).sum()))
    assert info["n_epochs_kl_warmup"] == min(info["max_epochs"], 400)
    assert info["early_stopped"] and not info["stopped_on_cap"]
    assert 1 <= info["epochs_run"] < info["max_epochs"]
    assert info["converged"] is (not info["query_stopped_on_cap"])
    assert np.isfinite(info["elbo_validation"])
    assert np.isfinite(info["elbo_validation_tail_change"])


def test_a_run_that_hits_its_cap_is_flagged(toy):
    out = apply_expression_variant(toy, _cfg(max_epochs=3), batch_key="donor",
                                   train_mask=_mask(toy), progress=False)
    assert out.info["epochs_run"] == 3 and out.info["max_epochs"] == 3
    assert out.info["n_epochs_kl_warmup"] == 3  # DRVI's tutorial: warm up over the whole run
    assert out.info["stopped_on_cap"] and not out.info["early_stopped"]
    assert out.info["converged"] is False


def test_transductive_is_flagged_and_maps_nothing(toy):
    out = apply_expression_variant(toy, _cfg(max_epochs=2, mode="transductive"),
                                   batch_key="donor", train_mask=_mask(toy), progress=False)
    assert out.saw_heldout and out.info["protocol"] == "transductive"
    assert "heldout_mapping" not in out.info and "query_epochs_run" not in out.info


def test_covariate_can_be_another_obs_column(toy):
    """Conditioned on the slide while the study's batch key is the donor."""
    adata = toy.copy()
    adata.obs["slide"] = [f"{d}_s{i % 2}" for i, d in enumerate(adata.obs["donor"])]
    out = apply_expression_variant(adata, _cfg(max_epochs=2, covariate_key="slide"),
                                   batch_key="donor", train_mask=_mask(adata), progress=False)
    assert out.info["covariate_key"] == "slide" and out.info["n_covariate_train"] == 4
    assert out.info["batch_key"] == "donor" and out.info["heldout_mapping"] == "scarches"


def test_bad_covariate_column_fails_before_fitting(toy):
    with pytest.raises(ValueError, match=r"drvi\.covariate_key='sample' is not an obs column"):
        apply_expression_variant(toy, _cfg(covariate_key="sample"), batch_key="donor",
                                 train_mask=_mask(toy))
    adata = toy.copy()
    adata.obs["slide"] = "one_slide"
    with pytest.raises(ValueError, match="training rows hold 1 category"):
        apply_expression_variant(adata, _cfg(covariate_key="slide"), batch_key="donor",
                                 train_mask=_mask(adata))


def test_non_integer_counts_are_refused_with_the_fix(toy):
    adata = toy.copy()
    adata.X = adata.X * 0.5
    with pytest.raises(ValueError, match=r"preprocess\.expression\.drvi\.allow_non_integer"):
        apply_expression_variant(adata, _cfg(), batch_key="donor", train_mask=_mask(adata))


@pytest.mark.parametrize(("section", "key"), [
    ({"n_latent": 1}, "n_latent"),
    ({"validation_fraction": 0.7}, "validation_fraction"),
    ({"mode": "semi"}, "mode"),
    ({"latent": 8}, "latent"),
    ({"covariate_key": ""}, "covariate_key"),
])
def test_bad_options_name_their_key(section, key):
    with pytest.raises(ConfigError, match=rf"preprocess\.expression\.drvi\.{key}"):
        validate_config({"preprocess": {"expression": {"method": "drvi", "drvi": section}}})


def test_only_encoders_taking_signed_features_pair_with_drvi():
    from hescape.models import gene_input_problem

    cfg = validate_config({"preprocess": {"expression": {"method": "drvi"}}})
    section = cfg.preprocess.expression.model_dump()
    for name in ("mlp", "latent_mlp"):
        assert gene_input_problem(cfg.model.gene.model_copy(update={"name": name}),
                                  section) is None
    msg = gene_input_problem(cfg.model.gene.model_copy(update={"name": "transformer"}), section)
    assert msg and "method='drvi' outputs real-valued, possibly signed" in msg


# ----------------------------------------------------------------------------- real data
def _measure(adata, cfg, train_mask=None):
    out = apply_expression_variant(adata, cfg, batch_key="batch", train_mask=train_mask,
                                   progress=False)
    m = measure_variant(out, adata, batch_key="batch", label_key="cell_type",
                        ignore_labels=["NA"])
    return out, m


@pytest.fixture(scope="module")
def starmap_400(starmap):
    """The 400-cell subsample of test_preprocess_acceptance (seed 0)."""
    rows = np.sort(np.random.default_rng(0).choice(starmap.n_obs, 400, replace=False))
    return starmap[rows].copy()


@pytest.mark.slow
def test_starmap_400_cells_drvi_defaults_mix_sections_like_scvi(starmap_400):
    """DRVI at its default settings mixes the 3 STARmap sections more than no correction and
    about as well as scVI at its defaults (figures: docs/preprocessing.md)."""
    _, none = _measure(starmap_400, ExpressionPreprocess())
    _, scvi = _measure(starmap_400, ExpressionPreprocess(method="scvi"))
    out, drvi = _measure(starmap_400, ExpressionPreprocess(method="drvi"))
    assert drvi["pre/ilisi"] >= none["pre/ilisi"] + 0.05, (drvi, none)
    assert drvi["pre/ilisi"] >= scvi["pre/ilisi"] - 0.05, (drvi, scvi)
    assert drvi["pre/ari_kmeans"] >= 0.75 * none["pre/ari_kmeans"], (drvi, none)
    assert drvi["pre/silhouette_label"] >= 0.45, drvi
    assert out.X.shape == (400, 128) and out.info["max_epochs"] == 400
    assert 1 <= out.info["epochs_run"] <= 400 and "elbo_validation_tail_change" in out.info


@pytest.mark.slow
def test_starmap_heldout_section_mapped_by_scarches(starmap_400):
    """Inductive on real data: DRVI trained on two sections, the third (144 cells) mapped with
    scArches. The training sections mix better than without correction; with the mapped
    section, mixing over all cells is at least scVI's (scArches too). Measured: neither
    inductive model beats no correction over all cells here (docs/preprocessing.md)."""
    batches = starmap_400.obs["batch"].astype(str).to_numpy()
    mask = batches != sorted(set(batches))[-1]
    train_rows = np.flatnonzero(mask)
    kw = {"batch_key": "batch", "label_key": "cell_type", "ignore_labels": ["NA"]}
    _, none = _measure(starmap_400, ExpressionPreprocess(), train_mask=mask)
    _, scvi = _measure(starmap_400, ExpressionPreprocess(method="scvi"), train_mask=mask)
    out, drvi = _measure(starmap_400, ExpressionPreprocess(method="drvi"), train_mask=mask)
    assert out.info["heldout_mapping"] == "scarches" and not out.saw_heldout
    assert out.info["query_epochs_run"] >= 1
    none_train = measure_variant(_prepared(starmap_400, ExpressionPreprocess(), mask),
                                 starmap_400, rows=train_rows, **kw)
    drvi_train = measure_variant(out, starmap_400, rows=train_rows, **kw)
    assert drvi_train["pre/ilisi"] >= none_train["pre/ilisi"] + 0.05, (drvi_train, none_train)
    assert drvi["pre/ilisi"] >= scvi["pre/ilisi"] - 0.05, (drvi, scvi)
    assert drvi["pre/ari_kmeans"] >= 0.6 * none["pre/ari_kmeans"], (drvi, none)


def _prepared(adata, cfg, mask):
    return apply_expression_variant(adata, cfg, batch_key="batch", train_mask=mask,
                                    progress=False)
