"""Factor effects: donor-level bootstrap CIs, pairing by seed / other factors, too few donors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hescape.study.effects import (
    NOT_DISTINGUISHABLE,
    BootstrapSettings,
    Trial,
    check_per_donor,
    compare,
    donor_matrix,
    expansion,
    factor_effects,
    reference_level,
    t_quantile,
)

METRIC = "r5_img2gene"


def _table(values, metric=METRIC, n=None) -> pd.DataFrame:
    n = [100] * len(values) if n is None else n
    return check_per_donor(pd.DataFrame({"metric": metric, "donor": [f"d{i}" for i in
                                                                      range(len(values))],
                                         "value": values, "n": n}), "test")


def _row(tid: str, params: dict, seed: int = 0) -> dict:
    return {"trial_id": tid, "sweep_params": params, "seed": str(seed), "status": "FINISHED",
            "metrics": {}}


def _two_levels(a_values, b_values, settings=BootstrapSettings()):
    tables = {"a": _table(a_values), "b": _table(b_values)}
    vals, wts = donor_matrix(tables, METRIC)
    level, ref = [Trial("b", "cb", "x|seed=0")], [Trial("a", "ca", "y|seed=0")]
    return compare(level, ref, vals, wts, settings)


def test_known_difference_excludes_zero():
    rng = np.random.default_rng(1)
    donor = rng.normal(0.3, 0.1, 10)  # donors differ in difficulty, the same for both levels
    eff = _two_levels(donor + rng.normal(0, 0.01, 10), donor + 0.1 + rng.normal(0, 0.01, 10))
    assert eff.delta == pytest.approx(0.1, abs=0.02)
    assert 0 < eff.low < eff.delta < eff.high
    assert eff.verdict == "higher than reference" and eff.n_donors == 10
    assert "both sides are 1 trial: seed variation not in the CI" in eff.design


def test_pure_noise_is_not_distinguishable_at_about_the_nominal_rate():
    rng = np.random.default_rng(2)
    settings = BootstrapSettings(n_boot=500)
    verdicts = [_two_levels(rng.normal(0.3, 0.05, 12), rng.normal(0.3, 0.05, 12),
                            settings).verdict for _ in range(40)]
    assert verdicts.count(NOT_DISTINGUISHABLE) >= 34  # 95% CI: ~38 of 40 expected


def test_few_donors_keep_false_claims_near_the_nominal_rate():
    """Pure noise on 4 donors: the plain percentile bootstrap calls ~18% of studies
    distinguishable; the small-sample expansion keeps it near 5%."""
    rng = np.random.default_rng(6)
    settings = BootstrapSettings(n_boot=300)
    verdicts = [_two_levels(rng.normal(0.3, 0.05, 4), rng.normal(0.3, 0.05, 4),
                            settings).verdict for _ in range(80)]
    assert len(verdicts) - verdicts.count(NOT_DISTINGUISHABLE) <= 8


def test_t_quantiles_and_expansion():
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=0.025)
    widths = [expansion(n, 0.95) for n in (3, 6, 12, 100)]
    assert widths == sorted(widths, reverse=True) and 1 < widths[-1] < 1.02
    with pytest.raises(ValueError, match="min_donors must be >= 2"):
        BootstrapSettings(min_donors=1)


def test_pairing_by_seed_narrows_the_ci_when_seed_effects_are_shared():
    rng = np.random.default_rng(3)
    donors, seeds = 8, 5
    seed_shift = rng.normal(0, 0.08, seeds)  # a seed moves both levels alike
    donor = rng.normal(0.3, 0.02, donors)
    tables, trials = {}, {"a": [], "b": []}
    for level, effect in (("a", 0.0), ("b", 0.04)):
        for s in range(seeds):
            key = f"{level}{s}"
            tables[key] = _table(donor + effect + seed_shift[s] + rng.normal(0, 0.005, donors))
            trials[level].append(Trial(key, f"config-{level}", f"other|seed={s}"))
    vals, wts = donor_matrix(tables, METRIC)
    paired = compare(trials["b"], trials["a"], vals, wts, BootstrapSettings())
    unpaired = compare(trials["b"], trials["a"], vals, wts, BootstrapSettings(pairing="none"))
    assert paired.design.startswith("paired, 5 block(s)")
    assert unpaired.design.startswith("unpaired") and "seeds resampled" in unpaired.design
    assert paired.delta == pytest.approx(unpaired.delta)
    assert (paired.high - paired.low) < 0.5 * (unpaired.high - unpaired.low)
    assert paired.verdict == "higher than reference"
    assert unpaired.verdict == NOT_DISTINGUISHABLE


def test_too_few_donors_gives_no_ci():
    eff = _two_levels([0.1, 0.2], [0.3, 0.4])
    assert eff.delta == pytest.approx(0.2)
    assert np.isnan(eff.low) and np.isnan(eff.high)
    assert eff.verdict == "no CI: 2 held-out donor(s) (< 3)"
    ok = _two_levels([0.1, 0.2], [0.3, 0.4], BootstrapSettings(min_donors=2))
    assert np.isfinite(ok.low)


def test_recall_weighted_by_spots_pearson_by_donor():
    a = {"r5_img2gene": [0.1, 0.5], "probe_pearson_mean": [0.1, 0.5]}
    tables = {"a": pd.concat([_table(v, m, n=[300, 100]) for m, v in a.items()]),
              "b": pd.concat([_table([0.0, 0.0], m, n=[300, 100]) for m in a])}
    trials = [Trial("a", "ca", "x"), Trial("b", "cb", "y")]
    settings = BootstrapSettings(min_donors=2)
    recall = compare(trials[:1], trials[1:], *donor_matrix(tables, "r5_img2gene"), settings)
    pearson = compare(trials[:1], trials[1:], *donor_matrix(tables, "probe_pearson_mean"),
                      settings)
    assert recall.delta == pytest.approx((0.1 * 300 + 0.5 * 100) / 400)  # the whole-set figure
    assert pearson.delta == pytest.approx(0.3)  # the mean over donors


def test_malformed_per_donor_table_names_the_file():
    with pytest.raises(ValueError, match=r"trials/t1/eval/per_donor.csv.*\['n'\]"):
        check_per_donor(pd.DataFrame({"metric": [], "donor": [], "value": []}),
                        "trials/t1/eval/per_donor.csv")


def test_factor_effects_on_a_grid_match_the_other_factor_and_use_the_base_reference():
    """method x encoder x 3 seeds: the encoder's large effect cancels in the matched blocks."""
    rng = np.random.default_rng(4)
    rows, tables = [], {}
    method_effect = {"none": 0.0, "harmony": 0.05, "combat": 0.0}
    for method in ("combat", "harmony", "none"):
        for enc, enc_effect in (("mlp", 0.0), ("transformer", 0.2)):
            for seed in range(3):
                tid = f"{method}-{enc}-{seed}"
                rows.append(_row(tid, {"method": method, "enc": enc, "train.seed": seed}, seed))
                tables[tid] = _table(0.3 + method_effect[method] + enc_effect + 0.01 * seed
                                     + rng.normal(0, 0.005, 6))
    out = factor_effects(rows, tables, metrics=[METRIC], base={"method": "none", "enc": "mlp"})
    method = out[out["factor"] == "method"].set_index("level")
    assert set(method["reference"]) == {"none"} and set(method.index) == {"combat", "harmony"}
    assert method.loc["harmony", "delta"] == pytest.approx(0.05, abs=0.01)
    assert method.loc["harmony", "verdict"] == "higher than reference"
    assert method.loc["combat", "verdict"] == NOT_DISTINGUISHABLE
    assert method.loc["harmony", "design"].startswith("paired, 6 block(s)")
    assert method.loc["harmony", "trials"] == "6 vs 6"
    enc = out[out["factor"] == "enc"].iloc[0]
    assert (enc["level"], enc["reference"]) == ("transformer", "mlp")
    assert "train.seed" not in set(out["factor"])


def test_reference_level_is_the_base_value_or_the_first_level():
    temps = [0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.15]
    assert reference_level(temps, 0.07) == "[0.07, 0.11)"  # its bin
    assert reference_level(temps, 0.15) == "[0.11, 0.15]"  # the last bin is closed
    assert reference_level(temps, 5.0) == "[0.03, 0.07)"  # outside: the first bin
    assert reference_level(["clip", "siglip"], "siglip") == "siglip"
    assert reference_level([None, 0.5, 1.0], None) == "(base)"
    assert reference_level(["b", "a"], None, has_base=False) == "a"


def test_point_estimates_reproduce_the_evaluations_headline_figures():
    """Per-donor rows from the real evaluation code: recall weighted by spots gives the
    whole-set Recall@k, the per-donor Pearson mean the probe's figure."""
    from hescape.metrics.pearson import pearson_by_donor, per_donor_means
    from hescape.metrics.retrieval import cross_modal_retrieval, recall_by_donor, retrieval_ranks

    rng = np.random.default_rng(5)
    donors = np.repeat(["d0", "d1", "d2", "d3"], [40, 80, 25, 55])
    img = rng.normal(size=(len(donors), 8))
    gene = img + rng.normal(0, 1.5, img.shape)
    whole = cross_modal_retrieval(img, gene, donors=donors, ks=[5])["r5_img2gene"]
    rows = pd.DataFrame(recall_by_donor(retrieval_ranks(img, gene), donors, [5]),
                        columns=["metric", "donor", "value", "n"])
    pred, true = rng.normal(size=(len(donors), 6)), rng.normal(size=(len(donors), 6))
    metrics, table = pearson_by_donor(pred, true, donors, [f"g{i}" for i in range(6)], "ridge")
    rows = pd.concat([rows, per_donor_means(table, "ridge_pearson_mean")])
    zero = rows.assign(value=0.0)
    tables = {"t": check_per_donor(rows, "t"), "z": check_per_donor(zero, "z")}
    trials, settings = [Trial("t", "a", "x"), Trial("z", "b", "y")], BootstrapSettings(n_boot=10)
    for metric, headline in (("r5_img2gene", whole),
                             ("ridge_pearson_mean", metrics["ridge_pearson_mean"])):
        eff = compare(trials[:1], trials[1:], *donor_matrix(tables, metric), settings)
        assert eff.delta == pytest.approx(headline)
