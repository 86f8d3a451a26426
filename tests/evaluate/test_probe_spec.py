"""The probe registry: declared names match emitted keys, one key rule, one-function probes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from synthetic_data import make_synthetic

from hescape.config import EvalConfig
from hescape.evaluate.baselines import comparison_table
from hescape.evaluate.pipeline import evaluate_embeddings
from hescape.evaluate.probe_spec import (
    PROBES,
    EvalData,
    ProbeResult,
    headline_keys,
    metric_key,
    metric_names,
    metric_pattern,
    parse_key,
    probe_specs,
    register_probe,
)

CFG = EvalConfig(inbatch_repeats=2, mixing_subsample=100, probe_top_genes=10, plots=False,
                 fixed_gallery=50)  # fmt: skip


def _data(**over):
    d = make_synthetic()
    kw = dict(img=d["img"], gene=d["gene"], obs=d["obs"], train_idx=d["train_idx"],
              test_idx=d["test_idx"], expr_log=d["expr_log"], counts=d["counts"],
              gene_names=d["gene_names"], cfg=CFG, label_key="state", mutation_key="mutation",
              baselines={"frozen": d["frozen"]})  # fmt: skip
    kw.update(over)
    return EvalData(**kw)


def _evaluate(data, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return evaluate_embeddings(data, out_dir=tmp_path, progress=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return _evaluate(_data(), tmp_path_factory.mktemp("spec"))


def test_every_emitted_key_is_declared_by_its_probe(full_run):
    metrics, _ = full_run
    specs = probe_specs()
    declared = {s.name: [metric_pattern(t) for t in s.metrics] for s in specs}
    scope = {s.name: s.scope for s in specs}
    owners: dict[str, set[str]] = {}
    for key in metrics:
        split, features, metric = parse_key(key)
        assert split == "test"
        owner = [n for n, pats in declared.items() if any(p.match(metric) for p in pats)]
        assert len(owner) == 1, f"{key}: declared by {owner or 'no probe'}"
        assert (scope[owner[0]] == "pair") == (features is None), key
        owners.setdefault(owner[0], set()).add(metric)
    assert set(owners) == set(declared)  # every registered probe ran on this data
    assert owners["retrieval_gallery"] == set(metric_names(CFG)["retrieval_gallery"])


def test_key_rule_round_trips():
    assert metric_key("test", "r5_img2gene") == "test/r5_img2gene"
    assert metric_key("val", "ilisi", "baseline_frozen") == "val/baseline_frozen/ilisi"
    assert parse_key("test/baseline_frozen/ilisi") == ("test", "baseline_frozen", "ilisi")
    assert parse_key("test/r5_img2gene") == ("test", None, "r5_img2gene")
    with pytest.raises(ValueError, match="not an evaluation key"):
        parse_key("r5_img2gene")


def test_headline_keys_are_emitted(full_run):
    metrics, _ = full_run
    keys = headline_keys(cfg=CFG.model_copy(update={"inbatch_size": 64}))
    missing = [k for k in keys if k not in metrics]
    assert not missing, missing


def test_registration_is_checked():
    with pytest.raises(ValueError, match="unknown obs roles"):
        register_probe(name="x_bad_role", metrics=("x",), obs=("tissue",))
    with pytest.raises(ValueError, match="undeclared metrics"):
        register_probe(name="x_bad_task", metrics=("x",), tasks={"X": "y"})


def test_a_new_probe_is_one_registered_function(tmp_path):
    name = "test_mean_norm"

    @register_probe(name=name, metrics=("mean_norm",), tasks={"mean feature norm": "mean_norm"})
    def mean_norm(feats: np.ndarray, data: EvalData) -> ProbeResult:
        return ProbeResult(metrics={"mean_norm": float(np.linalg.norm(feats[data.test_idx],
                                                                       axis=1).mean())})  # fmt: skip

    try:
        metrics, arts = _evaluate(_data(), tmp_path)
        table = comparison_table({k.removeprefix("test/"): v for k, v in metrics.items()})
    finally:
        PROBES.remove(name)  # keep the registry as the other tests expect it
    for fs in ("img", "gene", "joint", "baseline_frozen", "baseline_pca"):
        assert f"test/{fs}/mean_norm" in metrics, fs
    assert metrics["test/img/mean_norm"] == pytest.approx(1.0)  # embeddings are unit-norm
    assert table.loc["mean feature norm", "contrastive_img"] == pytest.approx(1.0)
    assert (arts["comparison"].read_text().count("mean feature norm")) == 1
    assert name not in PROBES


def test_probe_protocol_selects_the_expression_probe(tmp_path):
    hest_only, _ = _evaluate(_data(cfg=CFG.model_copy(update={"probe_protocol": "hest"})),
                             tmp_path / "h")  # fmt: skip
    assert "test/img/hest_pearson_mean" in hest_only
    assert not any("ridge_per_donor" in k for k in hest_only)
    donor_only, arts = _evaluate(
        _data(cfg=CFG.model_copy(update={"probe_protocol": "per_donor"})), tmp_path / "d"
    )
    assert "test/img/ridge_per_donor_pearson_mean" in donor_only
    assert not any("hest" in k for k in donor_only)
