"""TrainedModel: one trained-model path (load, check, embed), study-constant baselines, and a
trial that loads its dataset once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import hescape.data as data_pkg
from hescape.data import contract, load_paired
from hescape.train import fit
from hescape.train.trained import TrainedModel, embed_split


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_data):
    from tests.train.conftest import tiny_config

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root / "runs", tiny_data, max_steps=10, eval_every=10,
                      extra={"eval": {"plots": False, "inbatch_repeats": 2}})
    result = fit(cfg, run_dir=root / "run", verbose=False)
    return cfg, result


def test_embed_split_is_the_trained_model_path(trained_run, tiny_data):
    _, result = trained_run
    paired = load_paired(tiny_data)
    trained = TrainedModel.load(result.best_checkpoint)
    inputs = trained.inputs(paired)
    assert inputs.feature_source.startswith("cache:")  # frozen backbone on its own dataset
    rows = paired.indices("val")
    emb = trained.embed(inputs, rows)
    split = embed_split(result.best_checkpoint, paired, "val")
    np.testing.assert_array_equal(split["index"], rows)
    np.testing.assert_array_equal(split["img"], emb.img)
    np.testing.assert_array_equal(split["gene"], emb.gene)
    norms = np.linalg.norm(emb.img, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_features_of_another_dataset_are_refused_or_not_used(trained_run, tmp_path):
    from hescape.data import tiny_dataset

    _, result = trained_run
    trained = TrainedModel.load(result.best_checkpoint)
    other = load_paired(tiny_dataset(tmp_path / "other", seed=3, spots_per_donor=120,
                                     n_states=4))
    feats, why = trained.cached_features(other)  # the run's cache belongs to its own dataset
    assert feats is None and why == "another dataset"
    with pytest.raises(ValueError, match="another dataset"):
        trained.cached_features(other, trained.meta["features_path"])
    inputs = trained.inputs(other)
    assert inputs.feature_source == "patches"  # encoded, not the wrong cache


def test_a_features_file_of_the_wrong_shape_is_refused(trained_run, tiny_data, tmp_path):
    _, result = trained_run
    trained = TrainedModel.load(result.best_checkpoint)
    paired = load_paired(tiny_data)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((paired.adata.n_obs, trained.backbone_dim + 1), np.float32))
    with pytest.raises(ValueError, match="n_obs x backbone width"):
        trained.inputs(paired, features=wrong)


def test_prepared_expression_of_another_panel_is_refused(trained_run, tiny_data):
    from hescape.preprocess.expression import PreparedExpression

    _, result = trained_run
    trained = TrainedModel.load(result.best_checkpoint)
    paired = load_paired(tiny_data)
    n = paired.adata.n_obs
    bad = PreparedExpression(X=np.zeros((n, 3), np.float32), feature_names=["a", "b", "c"],
                             saw_heldout=False, method="none", info={}, cache_key="x",
                             kind="expression")
    with pytest.raises(ValueError, match="different gene panel or preprocessing"):
        trained.inputs(paired, prepared=bad)


def test_study_baselines_equal_what_a_trial_evaluation_gave_them(trained_run, tiny_data,
                                                                 tmp_path):
    """Baselines evaluated once (no trained model) give exactly the per-trial figures."""
    from hescape.evaluate.checkpoint_eval import evaluate_baselines, evaluate_trained

    cfg, result = trained_run
    paired = load_paired(tiny_data)
    trained = TrainedModel.load(result.best_checkpoint)
    with_baselines, _ = evaluate_trained(trained, paired, out_dir=tmp_path / "trial",
                                         progress=False)
    without, _ = evaluate_trained(trained, paired, out_dir=tmp_path / "lean", baselines=False,
                                  progress=False)
    study, _ = evaluate_baselines(cfg, paired, out_dir=tmp_path / "study",
                                  features=trained.meta["features_path"], progress=False)
    base_keys = {k for k in with_baselines if "/baseline_" in k}
    assert base_keys and {k for k in without if "/baseline_" in k} == set()
    assert set(study) == base_keys
    for key in base_keys:
        assert study[key] == pytest.approx(with_baselines[key], nan_ok=True, rel=1e-9), key
    for key, value in without.items():  # the trial's own figures do not change
        assert with_baselines[key] == pytest.approx(value, nan_ok=True, rel=1e-9), key


def test_a_trial_loads_its_dataset_once(trained_run, tiny_data, tmp_path, monkeypatch):
    """trial_inputs -> fit -> evaluation: one load_paired for the whole trial, and the frozen
    encoder is never rebuilt to name the feature cache the driver already computed."""
    from hescape.study.evaluation import evaluate_trial
    from hescape.study.shared import feature_paths, precompute, prepared_paths
    from hescape.study.trial import SharedContext, trial_inputs
    from hescape.train import features as features_mod
    from hescape.train.inputs import train_inputs
    from tests.train.conftest import tiny_config

    cfg = tiny_config(tmp_path / "runs", tiny_data, max_steps=10, eval_every=10,
                      extra={"eval": {"plots": False, "inbatch_repeats": 2}})
    work = precompute(cfg, load_paired(tiny_data), progress=False)
    shared = SharedContext(cfg.model_dump(), None, str(tmp_path), "fp", {}, "commit",
                           data_path=str(tiny_data), prepared=prepared_paths(cfg, work),
                           features=feature_paths(work))
    loads, builds = [], []
    real_load, real_build = contract.load_paired, features_mod.frozen_image_encoder

    def counting_load(*a, **k):
        loads.append(1)
        return real_load(*a, **k)

    monkeypatch.setattr(contract, "load_paired", counting_load)
    monkeypatch.setattr(data_pkg, "load_paired", counting_load)
    monkeypatch.setattr(features_mod, "frozen_image_encoder",
                        lambda c: builds.append(1) or real_build(c))
    inputs = trial_inputs(cfg, shared)
    assert inputs.features_path == work["features"][0]["path"]
    loaded = train_inputs(cfg, inputs.paired, inputs.prepared, inputs.features_path)
    result = fit(cfg, run_dir=tmp_path / "run", verbose=False,
                 prepared_path=inputs.prepared_path, inputs=loaded)
    metrics, _ = evaluate_trial(cfg, result, out_dir=tmp_path / "eval", paired=inputs.paired,
                                prepared=inputs.prepared, features=inputs.features_path,
                                baselines=False)
    assert loads == [1]
    # no encoder built to name (or compute) the feature cache the driver already computed
    # (the training loop still builds its own trunk: it imported the builder directly)
    assert builds == []
    assert np.isfinite(metrics["test/r5_img2gene"])


def test_baselines_study_module_skips_what_is_done_and_attaches(trained_run, tiny_data,
                                                               tmp_path):
    from hescape.study import baselines

    cfg, result = trained_run
    paired = load_paired(tiny_data)
    from hescape.train.features import feature_lookup_key

    feats = {feature_lookup_key(cfg): TrainedModel.load(result.best_checkpoint)
             .meta["features_path"]}
    found = baselines.evaluate_study_baselines([cfg, cfg], paired, tmp_path, features=feats,
                                               progress=False)
    kinds = sorted(v["kind"] for v in found.values())
    assert kinds == ["frozen", "pca"]
    stamp = {k: (tmp_path / "baselines" / k / "baseline.json").stat().st_mtime_ns for k in found}
    again = baselines.evaluate_study_baselines([cfg], paired, tmp_path, features=feats,
                                               progress=False)
    assert again.keys() == found.keys()
    assert all((tmp_path / "baselines" / k / "baseline.json").stat().st_mtime_ns == t
               for k, t in stamp.items())  # nothing recomputed
    rows = [{"trial_id": "a", "metrics": {"test/img/ilisi": 0.5},
             "baseline_key": baselines.frozen_key(cfg, paired.split)}]
    baselines.attach(rows, found)
    assert "test/baseline_frozen/knn_label_balanced_accuracy" in rows[0]["metrics"]
    assert "test/baseline_pca/knn_label_balanced_accuracy" in rows[0]["metrics"]
    assert "test/baseline_frozen/ilisi" not in rows[0]["metrics"]  # NaN (1 test donor): not attached
    shutil.rmtree(tmp_path / "baselines" / next(k for k in found if k.startswith("pca")))
    left = baselines.read(tmp_path)
    assert [v["kind"] for v in left.values()] == ["frozen"]
    json.dumps(baselines.parent_metrics(next(iter(left)), next(iter(left.values())), None))
