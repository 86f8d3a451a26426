"""Search space: define-by-run sampling, conditional params, grid, validation."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest

from hescape.config import ConfigError, StudyConfig, SweepConfig, load_config
from hescape.study.space import (
    SEED_KEY,
    SpaceWarning,
    apply_params,
    config_id,
    define_by_run,
    enumerate_sections,
    grid_points,
    protocols_of,
    validate_space,
    with_seeds,
)

ROOT = Path(__file__).resolve().parents[2]


def _sweep(params: dict, **kw) -> SweepConfig:
    return SweepConfig.model_validate({"params": params, **kw})


COND = {
    "preprocess.expression.method": {"type": "choice", "values": ["none", "scvi"]},
    "preprocess.expression.scvi.n_latent": {
        "type": "int", "low": 4, "high": 16, "when": {"preprocess.expression.method": ["scvi"]},
    },
    "loss.init_temperature": {"type": "loguniform", "low": 0.03, "high": 0.2},
}


def test_define_by_run_samples_conditionals_only_when_active():
    sweep = _sweep(COND)
    base = StudyConfig().model_dump()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"none": 0, "scvi": 0}
    for _ in range(30):
        trial = study.ask()
        define_by_run(sweep, base)(trial)
        method = trial.params["preprocess.expression.method"]
        seen[method] += 1
        has_latent = "preprocess.expression.scvi.n_latent" in trial.params
        assert has_latent == (method == "scvi")
        if has_latent:
            assert 4 <= trial.params["preprocess.expression.scvi.n_latent"] <= 16
        assert 0.03 <= trial.params["loss.init_temperature"] <= 0.2
        study.tell(trial, 0.0)
    assert seen["none"] and seen["scvi"]


def test_grid_respects_conditions_and_seeds():
    sweep = _sweep({
        "model.adversary.enabled": {"type": "choice", "values": [False, True]},
        "model.adversary.weight": {"type": "choice", "values": [0.1, 1.0],
                                   "when": {"model.adversary.enabled": [True]}},
        "loss.name": {"type": "choice", "values": ["clip", "siglip"]},
    }, searcher="grid")
    points = grid_points(sweep, StudyConfig().model_dump())
    # off x 2 losses + on x 2 weights x 2 losses
    assert len(points) == 6
    assert all(("model.adversary.weight" in p) == p["model.adversary.enabled"] for p in points)
    seeded = with_seeds(points, 3, base_seed=10)
    assert len(seeded) == 18
    assert {p[SEED_KEY] for p in seeded} == {10, 11, 12}
    assert config_id(seeded[0]) == config_id(seeded[1])


def test_apply_params_sets_nested_keys():
    base = StudyConfig().model_dump()
    out = apply_params(base, {"loss.name": "siglip", "train.seed": 3})
    cfg = StudyConfig.model_validate(out)
    assert cfg.loss.name == "siglip" and cfg.train.seed == 3
    assert base["loss"]["name"] == "clip"  # not mutated


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"loss.nmae": {"type": "choice", "values": ["clip"]}}, "loss.nmae: not a config key"),
        ({"loss.name": {"type": "choice", "values": ["clip", "infonce"]}}, "loss.name"),
        ({"model.gene.name": {"type": "choice", "values": ["mlp", "mpl"]}}, "mpl"),
        ({"loss.init_temperature": {"type": "uniform", "low": 0.5, "high": 5.0}},
         "init_temperature"),
        ({"a": {"type": "choice", "values": [1], "when": {"nope.key": [1]}}}, "not a config key"),
    ],
)
def test_validate_space_rejects_bad_spaces(params, needle):
    cfg = StudyConfig.model_validate({"sweep": {"params": params}})
    with pytest.raises(ConfigError) as err:
        validate_space(cfg, "study.yaml")
    assert needle in str(err.value)
    assert "study.yaml" in str(err.value)


def test_condition_must_reference_an_earlier_param():
    cfg = StudyConfig.model_validate({"sweep": {"params": {
        "model.adversary.weight": {"type": "uniform", "low": 0.1, "high": 1.0,
                                   "when": {"model.adversary.enabled": [True]}},
        "model.adversary.enabled": {"type": "choice", "values": [False, True]},
    }}})
    with pytest.raises(ConfigError, match="must be declared before"):
        validate_space(cfg)


def test_empty_choice_and_reversed_range_fail_at_load():
    with pytest.raises(ValueError, match="non-empty"):
        SweepConfig.model_validate({"params": {"loss.name": {"type": "choice", "values": []}}})
    with pytest.raises(ValueError, match="empty range"):
        SweepConfig.model_validate({"params": {"train.lr": {"type": "uniform", "low": 1, "high": 0}}})


def test_enumerate_sections_finds_every_preprocessing_variant():
    sweep = _sweep({
        "preprocess.expression.method": {"type": "choice", "values": ["none", "harmony", "scvi"]},
        "preprocess.expression.scvi.n_latent": {"type": "choice", "values": [8, 16],
                                                "when": {"preprocess.expression.method": ["scvi"]}},
        "loss.name": {"type": "choice", "values": ["clip", "siglip"]},
    })
    sections = enumerate_sections(sweep, StudyConfig().model_dump(), "preprocess.expression")
    assert [s["method"] for s in sections] == ["none", "harmony", "scvi", "scvi"]
    assert {s["scvi"]["n_latent"] for s in sections if s["method"] == "scvi"} == {8, 16}
    cont = _sweep({"preprocess.expression.harmony.theta": {"type": "uniform", "low": 1, "high": 3}})
    assert enumerate_sections(cont, StudyConfig().model_dump(), "preprocess.expression") is None


@pytest.mark.parametrize("name", ["demo", "batch_correction_ablation", "hescape_reproduction", "tiny"])
def test_shipped_experiments_validate(name):
    cfg = load_config(ROOT / "experiments" / f"{name}.yaml")
    validate_space(cfg, name)
    assert cfg.name == name
    assert cfg.sweep is not None


def test_unknown_key_and_override_errors_name_the_key(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("base: %s\ntrain: {max_stpes: 3}\n" % (ROOT / "experiments/base.yaml"))
    with pytest.raises(ConfigError, match=r"train.max_stpes: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(ROOT / "experiments/tiny.yaml", ["train.max_steps"])
    cfg = load_config(ROOT / "experiments/tiny.yaml", ["train.max_steps=9", "loss.name=siglip"])
    assert cfg.train.max_steps == 9 and cfg.loss.name == "siglip"


def test_define_by_run_space_pickles():
    """Tune pickles the searcher state for resume; a closure would fail there."""
    import pickle

    fn = define_by_run(_sweep(COND), StudyConfig().model_dump())
    again = pickle.loads(pickle.dumps(fn))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    again(trial)
    assert "loss.init_temperature" in trial.params


# ------------------------------------ registries: encoder/preprocessing pairs, held-out protocol
PAIRS = {
    "preprocess.expression.method": {"type": "choice", "values": ["none", "harmony"]},
    "model.gene.name": {"type": "choice", "values": ["mlp", "transformer"]},
}


def _study(params, searcher="grid", **extra):
    return StudyConfig.model_validate({"sweep": {"params": params, "searcher": searcher,
                                                 "scheduler": "none"}, **extra})


def test_grid_skips_incompatible_pairs_with_a_note():
    cfg = _study(PAIRS)
    points = grid_points(cfg.sweep, cfg.model_dump())
    assert len(points) == 3  # transformer x harmony (signed PCs) is not trained
    assert {"preprocess.expression.method": "harmony", "model.gene.name": "transformer"} \
        not in points
    with pytest.warns(SpaceWarning, match="skips 1 point.*transformer x harmony"):
        validate_space(cfg, "study.yaml")


def test_a_grid_of_only_incompatible_pairs_is_refused_with_the_reason():
    only = {"preprocess.expression.method": {"type": "choice", "values": ["harmony", "combat"]},
            "model.gene.name": {"type": "choice", "values": ["transformer"]}}
    with pytest.raises(ConfigError, match="every grid point pairs.*transformer x combat"):
        validate_space(_study(only), "study.yaml")


def test_random_search_that_can_sample_an_incompatible_pair_is_refused():
    with pytest.raises(ConfigError, match="transformer x harmony.*Add a condition"):
        validate_space(_study(PAIRS, searcher="random"), "study.yaml")
    guarded = {**PAIRS, "model.gene.name": {**PAIRS["model.gene.name"],
                                            "when": {"preprocess.expression.method": ["none"]}}}
    validate_space(_study(guarded, searcher="random"), "study.yaml")  # the condition avoids it


def test_mixed_heldout_protocols_warn_at_validation():
    mixed = {"preprocess.expression.method": {"type": "choice", "values": ["none", "harmony"]},
             "preprocess.expression.harmony.mode": {
                 "type": "choice", "values": ["inductive", "transductive"],
                 "when": {"preprocess.expression.method": ["harmony"]}}}
    with pytest.warns(SpaceWarning, match="mixes held-out protocols.*transductive for harmony"):
        validate_space(_study(mixed), "study.yaml")
    same = {"preprocess.expression.method": {"type": "choice",
                                             "values": ["none", "harmony", "combat", "scvi"]}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpaceWarning)
        validate_space(_study(same), "study.yaml")  # all inductive by default: no warning
    assert protocols_of(_study(same).sweep, StudyConfig().model_dump()) == {
        "inductive": ["none", "harmony", "combat", "scvi"]}


def test_sweeping_an_old_flat_key_names_the_new_one():
    cfg = _study({"preprocess.expression.theta": {"type": "choice", "values": [1.0, 2.0]}})
    with pytest.raises(ConfigError, match="preprocess.expression.harmony.theta"):
        validate_space(cfg, "study.yaml")
