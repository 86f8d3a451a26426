"""The confirm phase's plan (best configuration, factor levels, conditional parameters,
skipped pairs, points) and the fold merge of donor cross-validation."""

from __future__ import annotations

import pandas as pd
import pytest

from hescape.config import StudyConfig
from hescape.study import confirm
from hescape.study.folds import merge_folds
from hescape.study.space import FOLD_KEY, SEED_KEY


def _cfg(**sweep) -> StudyConfig:
    params = {
        "preprocess.expression.method": {"type": "choice", "values": ["none", "combat"]},
        "loss.init_temperature": {"type": "loguniform", "low": 0.03, "high": 0.2},
        "model.adversary.enabled": {"type": "choice", "values": [False, True]},
        "model.adversary.weight": {"type": "uniform", "low": 0.1, "high": 1.0,
                                   "when": {"model.adversary.enabled": [True]}},
    }
    return StudyConfig.model_validate({"sweep": {"searcher": "tpe", "params": params, **sweep}})


def _row(i, params, value, *, status="FINISHED", phase="search", seed=0):
    return {"trial_id": f"t{i}", "status": status, "phase": phase, "seed": str(seed),
            "sweep_params": {**params, SEED_KEY: seed}, "metrics": {"val/r5_img2gene": value}}


BEST = {"preprocess.expression.method": "combat", "loss.init_temperature": 0.05,
        "model.adversary.enabled": False}


def _rows():
    return [
        _row(0, BEST, 0.30), _row(1, BEST, 0.26, seed=1, phase="seeds"),  # mean 0.28
        _row(2, {**BEST, "preprocess.expression.method": "none"}, 0.29),
        _row(3, {**BEST, "model.adversary.enabled": True, "model.adversary.weight": 0.7}, 0.2),
        _row(4, {**BEST, "model.adversary.enabled": True, "model.adversary.weight": 0.3}, 0.25),
        _row(5, {**BEST, "loss.init_temperature": 0.1}, 0.9, status="KILLED"),  # stopped
    ]


def test_best_configuration_is_the_best_seed_mean_of_finished_trials():
    best, score, n = confirm.best_configuration(_rows(), "val/r5_img2gene", "max")
    assert best == {"preprocess.expression.method": "none", "loss.init_temperature": 0.05,
                    "model.adversary.enabled": False}  # 0.29 > mean(0.30, 0.26)
    assert score == pytest.approx(0.29) and n == 1
    assert confirm.best_configuration(_rows(), "val/r5_img2gene", "min")[0] == {
        **BEST, "model.adversary.enabled": True, "model.adversary.weight": 0.7}


def test_plan_levels_conditionals_and_points():
    cfg = _cfg(confirm={"seeds": 3})
    plan = confirm.make_plan(cfg, _rows())
    f = plan["factors"]
    method = [lv["level"] for lv in f["preprocess.expression.method"]["levels"]]
    assert method == ["none", "combat"]
    temps = [lv["level"] for lv in f["loss.init_temperature"]["levels"]]
    assert temps == pytest.approx([0.03, 0.05, 0.2])  # range ends + the searched best
    adv = {lv["level"]: lv["params"] for lv in f["model.adversary.enabled"]["levels"]}
    # switched on, the conditional weight comes from the best search trial with it on
    assert adv[True]["model.adversary.weight"] == 0.3
    assert "model.adversary.weight" not in adv[False]
    # the weight's condition does not hold in the best configuration: not confirmed
    assert "skipped" in f["model.adversary.weight"]
    for entry in f.values():
        for lv in entry.get("levels", []):  # every level differs from the best in one factor
            diff = {k for k in {*lv["params"], *plan["best"]}
                    if lv["params"].get(k) != plan["best"].get(k)}
            assert diff <= {*f, "model.adversary.weight"} and len(diff - {
                "model.adversary.weight"}) <= 1
    points = confirm.plan_points(cfg, plan)
    configs = {tuple(sorted((k, str(v)) for k, v in p.items() if k != SEED_KEY))
               for p in points}
    assert len(configs) == 1 + 1 + 2 + 1  # best + method + 2 temperatures + adversary on
    assert len(points) == len(configs) * 3
    assert sorted({p[SEED_KEY] for p in points}) == [0, 1, 2]
    folded = confirm.plan_points(cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"donor_folds": 4})}), plan)
    assert len(folded) == 4 * len(points) and {p[FOLD_KEY] for p in folded} == {0, 1, 2, 3}


def test_plan_skips_levels_an_encoder_cannot_take():
    cfg = StudyConfig.model_validate({"sweep": {"searcher": "grid", "confirm": {"enabled": True},
                                                "params": {
        "preprocess.expression.method": {"type": "choice", "values": ["none", "combat"]},
        "model.gene.name": {"type": "choice", "values": ["mlp", "transformer"]}}}})
    assert cfg.sweep.confirm_enabled
    rows = [_row(0, {"preprocess.expression.method": "combat", "model.gene.name": "mlp"}, 0.5),
            _row(1, {"preprocess.expression.method": "none", "model.gene.name": "mlp"}, 0.1)]
    plan = confirm.make_plan(cfg, rows)
    gene = plan["factors"]["model.gene.name"]
    # the transformer cannot take combat's signed features: not run, and said why
    assert gene["skipped"] == "fewer than 2 levels can run"
    assert [s["level"] for s in gene["skipped_levels"]] == ["transformer"]
    assert "transformer" in gene["skipped_levels"][0]["why"]
    assert len(plan["factors"]["preprocess.expression.method"]["levels"]) == 2
    grid = StudyConfig.model_validate({"sweep": {"searcher": "grid", "params": {
        "loss.name": {"type": "choice", "values": ["clip", "siglip"]}}}})
    assert not grid.sweep.confirm_enabled  # a grid is already controlled


def test_membership_rebuilds_each_factors_sub_experiment():
    cfg = _cfg()
    plan = confirm.make_plan(cfg, _rows())
    rows = []
    for i, p in enumerate(confirm.plan_points(cfg, plan)):
        rows.append({"trial_id": f"c{i}", "phase": "confirm", "status": "FINISHED",
                     "sweep_params": p, "metrics": {}})
    groups = confirm.membership(cfg, plan, rows)
    assert set(groups) == {"preprocess.expression.method", "loss.init_temperature",
                           "model.adversary.enabled"}
    assert len(groups["loss.init_temperature"]) == 3 * 3  # 3 levels x 3 seeds
    assert len(groups["preprocess.expression.method"]) == 2 * 3


def _fold_row(i, fold, seed, status="FINISHED", value=0.1):
    return {"trial_id": f"f{i}", "status": status, "phase": "confirm", "seed": str(seed),
            "sweep_params": {"loss.name": "clip", SEED_KEY: seed, FOLD_KEY: fold},
            "metrics": {"test/r5_img2gene": value, "val/r5_img2gene": value}}


def test_fold_trials_merge_into_one_replicate_per_configuration_and_seed():
    rows = [_fold_row(0, 0, 0, value=0.1), _fold_row(1, 1, 0, value=0.3),
            _fold_row(2, 2, 0, value=0.2), _fold_row(3, 0, 1), _fold_row(4, 1, 1),
            _fold_row(5, 2, 1, status="FAILED"), {"trial_id": "s", "status": "FINISHED",
                                                  "sweep_params": {"loss.name": "clip"},
                                                  "metrics": {}}]
    per_donor = {f"f{i}": pd.DataFrame({"metric": ["r5_img2gene"], "donor": [f"d{i}"],
                                        "value": [0.1], "n": [10]}) for i in range(6)}
    merged, tables, notes = merge_folds(rows, per_donor, 3)
    done = [r for r in merged if r.get("folds") == 3 and r["status"] == "FINISHED"]
    assert len(done) == 1 and done[0]["metrics"]["test/r5_img2gene"] == pytest.approx(0.2)
    assert FOLD_KEY not in done[0]["sweep_params"]
    assert sorted(tables[done[0]["trial_id"]]["donor"]) == ["d0", "d1", "d2"]
    incomplete = [r for r in merged if r.get("folds") == 3 and r["status"] != "FINISHED"]
    assert len(incomplete) == 1 and notes and "fold(s) [2]" in notes[0]
    assert not any(k.startswith("f") for k in tables if "+cv" not in k)
    assert any(r["trial_id"] == "s" for r in merged)  # a trial without folds passes through
