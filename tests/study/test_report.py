"""Study report tables: ablation levels (binned when continuous), leaderboard, baselines."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.study.report import ablation, baseline_comparison, leaderboard


def _row(i: int, params: dict, metrics: dict, status: str = "FINISHED") -> dict:
    return {"trial_id": f"t{i}", "status": status, "phase": "search", "config_id": str(params),
            "seed": 0, "saw_heldout": False, "sweep_params": params, "metrics": metrics,
            "run_id": f"r{i}", "error": ""}


def test_continuous_factor_is_binned_and_categorical_kept():
    temps = [0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.15, 0.17, 0.19]
    rows = [_row(i, {"loss.init_temperature": t, "loss.name": "clip" if i % 2 else "siglip"},
                 {"val/r5": t * 10}) for i, t in enumerate(temps)]
    rows.append(_row(99, {"loss.init_temperature": 0.5, "loss.name": "clip"}, {"val/r5": 9.0},
                     status="KILLED"))  # unfinished trials are not aggregated
    tables = ablation(rows, ["val/r5"])
    temp = tables["loss.init_temperature"]
    assert len(temp) == 3 and temp[("val/r5", "count")].sum() == len(temps)
    assert list(temp.index)[0].startswith("[0.03,") and list(temp.index)[-1].endswith("0.19]")
    means = temp[("val/r5", "mean")].to_numpy()
    assert np.all(np.diff(means) > 0)  # bins ordered by value
    name = tables["loss.name"]
    assert set(name.index) == {"clip", "siglip"}
    assert name.loc["clip", ("val/r5", "count")] == 4


def test_conditional_factor_absent_is_base_level():
    rows = [_row(0, {"model.adversary.enabled": False}, {"m": 1.0}),
            _row(1, {"model.adversary.enabled": True, "model.adversary.weight": 0.5}, {"m": 2.0}),
            _row(2, {"model.adversary.enabled": True, "model.adversary.weight": 1.0}, {"m": 3.0})]
    table = ablation(rows, ["m"])["model.adversary.weight"]
    assert list(table.index) == ["(base)", "0.5", "1"]


def test_leaderboard_sorted_by_objective_with_key_metrics():
    rows = [_row(i, {}, {"val/r5_img2gene": v, "test/mutation_auroc_pooled": 0.6})
            for i, v in enumerate([0.1, 0.3, 0.2])]
    board = leaderboard(rows, "val/r5_img2gene", "max")
    assert board["trial"].tolist() == ["t1", "t2", "t0"]
    assert board["test/mutation_auroc_pooled"].tolist() == [0.6] * 3


def test_baseline_comparison_aggregates_finished_trials():
    def metrics(label_acc: float) -> dict:
        return {"test/label_balanced_accuracy": label_acc,
                "test/gene_label_balanced_accuracy": 0.7,
                "test/baseline_frozen_label_balanced_accuracy": 0.5,
                "test/baseline_pca_label_balanced_accuracy": 0.8,
                "test/probe_pearson_mean": 0.2, "test/baseline_frozen_probe_pearson_mean": 0.3}

    rows = [_row(0, {}, metrics(0.6)), _row(1, {}, metrics(0.8)),
            _row(2, {}, metrics(0.0), status="FAILED")]
    table = baseline_comparison(rows)
    assert table.loc["label bal. acc.", "contrastive img"] == "0.700 ± 0.141"
    assert table.loc["label bal. acc.", "frozen img"] == "0.500 ± 0.000"
    assert table.loc["expression pearson", "frozen img"] == "0.300 ± 0.000"
    assert table.loc["expression pearson", "pca expr"] == ""
    assert baseline_comparison([_row(0, {}, {"test/label_balanced_accuracy": 0.5})]).empty


@pytest.mark.parametrize("status", ["KILLED", "FAILED"])
def test_no_finished_trials_gives_empty_tables(status):
    rows = [_row(0, {"a": 1}, {"m": 1.0}, status=status)]
    assert ablation(rows, ["m"]) == {} and baseline_comparison(rows).empty
