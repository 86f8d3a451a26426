"""Cheap validation objectives (issue 21.2): computed only when a study names them, on the
validation donors only, bounded in rows, and each measuring what its name says."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.train.val_objectives import (
    MIXING_MAX_ROWS,
    NAMES,
    requested,
    validation_ilisi,
    validation_ridge,
)
from tests.train.conftest import tiny_config

OBJECTIVES = [{"metric": "val/r5_img2gene", "mode": "max"},
              {"metric": "val/gene/ilisi", "mode": "max"},
              {"metric": "val/joint/ilisi", "mode": "max"},
              {"metric": "val/img/ridge_donor_cv_pearson", "mode": "max"}]


@pytest.fixture(scope="module")
def three_val_donors(tmp_path_factory):
    from hescape.config import SimulateConfig, SplitConfig
    from hescape.data.simulate import simulate

    return simulate(tmp_path_factory.mktemp("data") / "d",
                    SimulateConfig(n_donors=7, spots_per_donor=60, n_genes=40, n_states=3,
                                   patch_size=16, seed=0),
                    split=SplitConfig(val_fraction=0.43, test_fraction=0.15, seed=0),
                    progress=False)


def test_named_objectives_are_reported_at_every_evaluation(tmp_path, three_val_donors):
    from hescape.train import fit

    cfg = tiny_config(tmp_path / "runs", three_val_donors, max_steps=20, eval_every=10,
                      extra={"sweep": {"scheduler": "moasha", "objectives": OBJECTIVES}})
    assert set(requested(cfg)) == {"val/joint/ilisi", "val/gene/ilisi",
                                   "val/img/ridge_donor_cv_pearson"}
    seen = []
    fit(cfg, run_dir=tmp_path / "run", verbose=False,
        report_callback=lambda m, c: seen.append(m))
    assert [m["step"] for m in seen] == [10, 20]
    for m in seen:
        assert 0.0 <= m["val/gene/ilisi"] <= 1.0 and 0.0 <= m["val/joint/ilisi"] <= 1.0
        assert -1.0 <= m["val/img/ridge_donor_cv_pearson"] <= 1.0
        assert "val/img/ilisi" not in m  # only the named ones


def test_unnamed_objectives_cost_nothing(tmp_path, three_val_donors):
    from hescape.train import fit

    cfg = tiny_config(tmp_path / "runs", three_val_donors, max_steps=10, eval_every=10)
    assert requested(cfg) == ()
    seen = []
    fit(cfg, run_dir=tmp_path / "run", verbose=False, report_callback=lambda m, c: seen.append(m))
    assert not set(NAMES) & set(seen[0])


def test_one_validation_donor_is_refused_with_the_fix(tmp_path, tiny_data):
    from hescape.train import fit

    cfg = tiny_config(tmp_path / "runs", tiny_data, max_steps=10, eval_every=10,
                      extra={"sweep": {"scheduler": "moasha", "objectives": OBJECTIVES[:2]}})
    with pytest.raises(ValueError, match=r"val/gene/ilisi.*>= 2 validation donors.*val_fraction"):
        fit(cfg, run_dir=tmp_path / "run", verbose=False)


def test_ilisi_reads_mixing_and_caps_rows():
    rng = np.random.default_rng(0)
    donors = np.repeat(["a", "b", "c"], 500)
    mixed = rng.normal(size=(1500, 16))
    apart = mixed + 8.0 * np.repeat(np.eye(3, 16), 500, axis=0)  # one cluster per donor
    high, low = validation_ilisi(mixed, donors), validation_ilisi(apart, donors)
    assert high > 0.7 and low < 0.05
    from hescape.metrics.mixing import mixing_metrics  # the capped subsample, scib's protocol

    ref = mixing_metrics(mixed, donors, subsample=MIXING_MAX_ROWS, seed=0)
    assert MIXING_MAX_ROWS - 3 <= ref["subsample_n"] <= MIXING_MAX_ROWS  # per-donor rounding
    assert high == pytest.approx(ref["ilisi"])


def test_ridge_is_donor_grouped_and_reads_expression():
    rng = np.random.default_rng(1)
    donors = np.repeat(["a", "b", "c", "d"], 150)
    signal = rng.normal(size=(600, 8))
    expr = signal @ rng.normal(size=(8, 20)) + 0.5 * rng.normal(size=(600, 20))
    genes = [f"g{i}" for i in range(20)]
    good = validation_ridge(np.c_[signal, rng.normal(size=(600, 8))], expr, donors, genes,
                            pca=256, alpha=1.0)
    noise = validation_ridge(rng.normal(size=(600, 16)), expr, donors, genes, pca=256, alpha=1.0)
    assert good > 0.8 and abs(noise) < 0.1
    # an embedding that only knows the donor predicts a constant within each held-out donor:
    # no within-donor correlation to score (NaN), however well it separates donors
    onehot = (donors[:, None] == np.array(["a", "b", "c", "d"])).astype(float)
    shifted = expr + 5.0 * onehot @ rng.normal(size=(4, 20))
    assert np.isnan(validation_ridge(onehot, shifted, donors, genes, pca=256, alpha=1.0))
