"""Study-level preprocessing: pre/ metrics measured like the test metrics, info on the runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hescape.config import StudyConfig
from hescape.data import load_paired, tiny_dataset
from hescape.preprocess import measure_variant
from hescape.study.shared import precompute
from hescape.study.trial import _converged_tag, _info_tag


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    return load_paired(tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds"))


def test_variants_are_measured_on_the_test_donors_with_their_batch_count(paired, tmp_path):
    cfg = StudyConfig.model_validate({
        "storage_dir": str(tmp_path), "data": {"path": str(paired.path)},
        "preprocess": {"expression": {"pca": {"n_pcs": 4}}},
        "sweep": {"searcher": "grid", "scheduler": "none", "params": {
            "preprocess.expression.method": {"type": "choice", "values": ["none", "pca"]}}}})
    work = precompute(cfg, paired, progress=False)
    test_rows = paired.indices("test")
    donors = paired.adata.obs["donor"].astype(str).to_numpy()
    for variant in work["variants"]:
        assert variant["measured_on"] == {"part": "test", "donors": list(paired.split["test"]),
                                          "n_rows": int(len(test_rows))}
        assert variant["n_batches"] == len(set(donors[test_rows]))
        assert variant["info"]["protocol"] == "inductive" and "kind" in variant
        json.dumps(variant)  # lands in shared_work.json and the parent run
    # the figures are those of the test rows, not of every donor
    from hescape.preprocess import prepare

    prepared = prepare(paired, cfg.preprocess.expression, batch_key="donor",
                       cache_dir=tmp_path / "cache" / "preprocess", progress=False)
    on_test = measure_variant(prepared, paired.adata, batch_key="donor",
                              label_key=cfg.data.label_key, rows=test_rows)
    np.testing.assert_equal(work["variants"][0]["metrics"], on_test)  # (NaN: 1 test donor)
    everyone = measure_variant(prepared, paired.adata, batch_key="donor",
                               label_key=cfg.data.label_key)
    assert everyone["pre/n_batches"] > on_test["pre/n_batches"]


def test_trial_tags_carry_convergence_and_compact_info():
    assert _converged_tag({"converged": False, "epochs_run": 400}) == "false"
    assert _converged_tag({"converged": True}) == "true"
    assert _converged_tag({"n_genes": 10}) == "n/a"
    info = {"epochs_run": 123, "stopped_on_cap": False, "log": ["long"], "options": {"a": 1},
            "mode": "inductive", "explained": np.float32(0.5).item()}
    tag = json.loads(_info_tag(info))
    assert tag == {"epochs_run": 123, "stopped_on_cap": False, "mode": "inductive",
                   "explained": 0.5}
