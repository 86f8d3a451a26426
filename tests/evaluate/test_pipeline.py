"""evaluate_embeddings end to end on synthetic data: every key, every artifact."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

from hescape.config import EvalConfig
from hescape.evaluate.pipeline import evaluate_embeddings, joint_embedding

CFG = EvalConfig(inbatch_repeats=2, mixing_subsample=100, probe_top_genes=10)


def _run(d, tmp_path, **over):
    kw = dict(
        img=d["img"],
        gene=d["gene"],
        obs=d["obs"],
        train_idx=d["train_idx"],
        test_idx=d["test_idx"],
        expr_log=d["expr_log"],
        gene_names=d["gene_names"],
        cfg=CFG,
        label_key="state",
        mutation_key="mutation",
        out_dir=tmp_path,
        baseline_features=d["frozen"],
        progress=False,
    )
    kw.update(over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few-donor warning of the mutation probe
        return evaluate_embeddings(**kw)


def test_pipeline_produces_all_keys_and_artifacts(synthetic, tmp_path):
    metrics, arts = _run(synthetic, tmp_path)
    expected = [
        "r1_img2gene", "r5_gene2img", "r10_img2gene", "mean_rank_img2gene", "median_rank_gene2img",
        "r5_img2gene_within_donor", "inbatch64_r5_img2gene", "inbatch64_r5_gene2img",
        "probe_pearson_mean", "probe_pearson_median", "probe_pearson_mean_donor_d4",
        "bleep_pearson_mean", "label_balanced_accuracy", "label_macro_f1",
        "mutation_auroc_mean", "mutation_auroc_sd", "mutation_n_donors", "mutation_few_donors",
        "gene_label_balanced_accuracy", "joint_mutation_auroc_pooled",
        "img_ilisi", "img_kbet", "gene_ilisi", "joint_silhouette_batch", "gene_nmi", "joint_ari",
        "baseline_frozen_probe_pearson_mean", "baseline_frozen_label_balanced_accuracy",
        "baseline_frozen_ilisi", "baseline_pca_label_balanced_accuracy", "baseline_pca_mutation_auroc_pooled",
    ]  # fmt: skip
    missing = [k for k in expected if f"test/{k}" not in metrics]
    assert not missing, missing
    assert all(k.startswith("test/") and "@" not in k for k in metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["test/mutation_n_donors"] == 6 and metrics["test/mutation_few_donors"] == 0.0
    assert metrics["test/r1_img2gene"] > 1 / 80  # aligned towers beat chance
    assert metrics["test/probe_pearson_mean"] > 0.3
    for key in ("embeddings", "per_gene_pearson", "comparison", "recall_curve", "pearson_hist",
                "comparison_plot", "pca_joint_by_donor", "pca_img_by_state"):  # fmt: skip
        assert key in arts and arts[key].stat().st_size > 0, key
    emb = ad.read_h5ad(arts["embeddings"])
    assert emb.n_obs == 80 and set(emb.obsm) == {"img", "gene", "joint"}
    assert emb.obsm["joint"].shape[1] == 16 and list(emb.obs["donor"].unique()) == ["d4", "d5"]
    table = (tmp_path / "comparison.csv").read_text()
    assert "contrastive_img" in table and "frozen_img" in table and "pca_expr" in table


def test_image_only_dataset(synthetic, tmp_path):
    cfg = CFG.model_copy(update={"plots": False})
    metrics, arts = _run(synthetic, tmp_path, gene=None, expr_log=None, gene_names=None, cfg=cfg)
    assert "test/mutation_auroc_pooled" in metrics and "test/img_ilisi" in metrics
    assert "test/baseline_frozen_mutation_auroc_pooled" in metrics
    assert not any("img2gene" in k or "probe_pearson" in k for k in metrics)
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


def test_missing_labels_are_left_out_not_fatal(synthetic, tmp_path):
    obs = synthetic["obs"].copy()
    obs["state"] = obs["state"].astype(object)
    obs.iloc[synthetic["test_idx"][:10], obs.columns.get_loc("state")] = None
    cfg = CFG.model_copy(update={"plots": False, "baselines": False})
    metrics, _ = _run(synthetic, tmp_path, obs=obs, cfg=cfg)
    assert metrics["test/img_subsample_n"] == 70 and "test/img_nmi" in metrics
    assert metrics["test/label_n_test"] == 70
