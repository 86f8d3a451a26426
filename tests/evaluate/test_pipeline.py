"""evaluate_embeddings end to end on synthetic data: every key, every artifact."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from hescape.config import EvalConfig
from hescape.evaluate.pipeline import evaluate_embeddings, joint_embedding
from hescape.evaluate.probe_spec import EvalData

CFG = EvalConfig(inbatch_repeats=2, mixing_subsample=100, probe_top_genes=10)


def _data(d, **over):
    kw = dict(
        img=d["img"],
        gene=d["gene"],
        obs=d["obs"],
        train_idx=d["train_idx"],
        test_idx=d["test_idx"],
        expr_log=d["expr_log"],
        counts=d["counts"],
        gene_names=d["gene_names"],
        cfg=CFG,
        label_key="state",
        mutation_key="mutation",
        baselines={"frozen": d["frozen"]},
    )
    kw.update(over)
    return EvalData(**kw)


def _run(d, tmp_path, **over):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # underpowered mutation probe, HEST NaN
        return evaluate_embeddings(_data(d, **over), out_dir=tmp_path, progress=False)


def test_pipeline_produces_all_keys_and_artifacts(synthetic, tmp_path):
    metrics, arts = _run(synthetic, tmp_path)
    expected = [
        "r1_img2gene", "r5_gene2img", "r10_img2gene", "mean_rank_img2gene", "median_rank_gene2img",
        "r5_img2gene_within_donor", "inbatch64_r5_img2gene", "inbatch64_r5_gene2img",
        "r5_img2gene_gallery1000", "bleep_pearson_mean",
        "img/ridge_per_donor_pearson_mean", "img/ridge_per_donor_pearson_median",
        "img/ridge_per_donor_pca_dim", "img/hest_pearson_mean", "img/hest_pca_dim",
        "img/label_balanced_accuracy", "img/label_macro_f1", "img/knn_label_balanced_accuracy",
        "img/mutation_auroc", "img/mutation_auroc_pvalue", "img/mutation_n_donors",
        "img/mutation_underpowered", "gene/label_balanced_accuracy", "joint/mutation_auroc",
        "img/ilisi", "img/kbet", "gene/ilisi", "joint/silhouette_batch", "gene/nmi_kmeans", "joint/ari_kmeans",
        "baseline_frozen/ridge_per_donor_pearson_mean", "baseline_frozen/label_balanced_accuracy",
        "baseline_frozen/ilisi", "baseline_pca/label_balanced_accuracy",
        "baseline_pca/mutation_auroc",
    ]  # fmt: skip
    missing = [k for k in expected if f"test/{k}" not in metrics]
    assert not missing, missing
    assert all(k.startswith("test/") and "@" not in k for k in metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    # expression is not predicted from expression-derived features
    assert not any(k.startswith(("test/gene/", "test/joint/", "test/baseline_pca/"))
                   and ("ridge_per_donor" in k or "hest" in k) for k in metrics)  # fmt: skip
    # 6 donors (3 mut / 3 wt) < 10 per class: no mutation figure, and it says why
    assert metrics["test/img/mutation_n_donors"] == 6
    assert metrics["test/img/mutation_underpowered"] == 1.0
    assert np.isnan(metrics["test/img/mutation_auroc"])
    assert metrics["test/r1_img2gene"] > 1 / 80  # aligned towers beat chance
    assert metrics["test/img/ridge_per_donor_pearson_mean"] > 0.3
    for key in ("embeddings", "per_gene_pearson", "comparison", "recall_curve", "pearson_hist",
                "comparison_plot", "pca_joint_by_donor", "pca_img_by_state", "per_donor",
                "probe_notes"):  # fmt: skip
        assert key in arts and arts[key].stat().st_size > 0, key
    emb = ad.read_h5ad(arts["embeddings"])
    assert emb.n_obs == 80 and set(emb.obsm) == {"img", "gene", "joint"}
    assert emb.obsm["joint"].shape[1] == 16 and list(emb.obs["donor"].unique()) == ["d4", "d5"]
    table = (tmp_path / "comparison.csv").read_text()
    assert "contrastive_img" in table and "frozen_img" in table and "pca_expr" in table


def test_image_only_dataset(synthetic, tmp_path):
    cfg = CFG.model_copy(update={"plots": False})
    metrics, arts = _run(synthetic, tmp_path, gene=None, expr_log=None, counts=None,
                         gene_names=None, cfg=cfg)  # fmt: skip
    assert "test/img/mutation_auroc" in metrics and "test/img/ilisi" in metrics
    assert "test/baseline_frozen/mutation_auroc" in metrics
    assert not any("img2gene" in k or "pearson" in k for k in metrics)
    assert set(arts) >= {"embeddings"} and not any(p.suffix == ".png" for p in arts.values())


def test_joint_embedding_is_normalised_concat():
    rng = np.random.default_rng(0)
    img, gene = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    j = joint_embedding(img, gene)
    assert j.shape == (5, 6)
    np.testing.assert_allclose(np.linalg.norm(j, axis=1), 1, rtol=1e-5)


def test_clear_errors(synthetic, tmp_path):
    with pytest.raises(ValueError, match="obs has"):
        _run(synthetic, tmp_path, img=synthetic["img"][:10])
    with pytest.raises(ValueError, match="indices outside"):
        _run(synthetic, tmp_path, test_idx=[10_000])
    with pytest.raises(ValueError, match="lacks column 'slide_x'"):
        _run(synthetic, tmp_path, batch_key="slide_x")
    with pytest.raises(ValueError, match=r"counts \(240, 29\) must be N x G"):
        _run(synthetic, tmp_path, counts=synthetic["counts"][:, :29])
    with pytest.raises(ValueError, match="baseline 'frozen': 10 rows"):
        _run(synthetic, tmp_path, baselines={"frozen": synthetic["frozen"][:10]})


def test_missing_labels_are_left_out_not_fatal(synthetic, tmp_path):
    obs = synthetic["obs"].copy()
    obs["state"] = obs["state"].astype(object)
    obs.iloc[synthetic["test_idx"][:10], obs.columns.get_loc("state")] = None
    cfg = CFG.model_copy(update={"plots": False, "baselines": False})
    metrics, _ = _run(synthetic, tmp_path, obs=obs, cfg=cfg)
    assert metrics["test/img/subsample_n"] == 70 and "test/img/nmi_kmeans" in metrics
    assert metrics["test/img/label_n_test"] == 70


def test_per_donor_table_and_probe_notes(synthetic, tmp_path):
    import json

    import pandas as pd

    cfg = CFG.model_copy(update={"plots": False})
    metrics, arts = _run(synthetic, tmp_path, cfg=cfg)
    per = pd.read_csv(arts["per_donor"])
    assert list(per.columns) == ["metric", "donor", "value", "n"]
    for metric in ("r1_img2gene", "r5_img2gene", "r10_gene2img", "bleep_pearson_mean",
                   "img/ridge_per_donor_pearson_mean",
                   "baseline_frozen/ridge_per_donor_pearson_mean"):  # fmt: skip
        part = per[per["metric"] == metric]
        assert sorted(part["donor"]) == ["d4", "d5"] and set(part["n"]) == {40}, metric
    # per-donor values decompose the headlines: whole-set recall = spot-weighted mean,
    # per-donor Pearson figures = mean over donors
    r5 = per[per["metric"] == "r5_img2gene"]
    assert np.average(r5["value"], weights=r5["n"]) == pytest.approx(metrics["test/r5_img2gene"])
    ridge = per[per["metric"] == "img/ridge_per_donor_pearson_mean"]["value"].mean()
    assert ridge == pytest.approx(metrics["test/img/ridge_per_donor_pearson_mean"])
    notes = json.loads(arts["probe_notes"].read_text())
    assert "fewer than 10 donors per class" in notes["img/mutation"]
    assert "8 dimensions" in notes["img/hest"] and np.isnan(metrics["test/img/hest_pearson_mean"])
    assert "retrieval_gallery" in notes and np.isnan(metrics["test/r5_img2gene_gallery1000"])
