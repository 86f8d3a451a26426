"""Factor effects: intervals over donors and seeds, no verdict without replicates, pairing on
a grid, controlled vs marginal comparisons, what would resolve an effect."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hescape.study.report.effects import (
    NEEDS_REPLICATES,
    NOT_DISTINGUISHABLE,
    Components,
    EffectSettings,
    Trial,
    compare,
    difference_intervals,
    donor_matrix,
    factor_effects,
    needs_text,
    plan_variance,
    reference_level,
    resolving_design,
)
from hescape.study.results import check_per_donor

METRIC = "r5_img2gene"


def _table(values, metric=METRIC, n=None) -> pd.DataFrame:
    n = [100] * len(values) if n is None else n
    return check_per_donor(pd.DataFrame({"metric": metric, "donor": [f"d{i}" for i in
                                                                      range(len(values))],
                                         "value": values, "n": n}), "test")


def _row(tid: str, params: dict, seed: int = 0, **extra) -> dict:
    return {"trial_id": tid, "sweep_params": params, "seed": str(seed), "status": "FINISHED",
            "metrics": {}, **extra}


def _controlled(level_values, ref_values, settings=EffectSettings()):
    """Level vs reference, every trial sharing the other factors: seeds are the replicates."""
    tables = {f"b{i}": _table(v) for i, v in enumerate(level_values)}
    tables.update({f"a{i}": _table(v) for i, v in enumerate(ref_values)})
    vals, wts = donor_matrix(tables, METRIC)
    level = [Trial(f"b{i}", "cb", f"x|seed={i}") for i in range(len(level_values))]
    ref = [Trial(f"a{i}", "ca", f"x|seed={i}") for i in range(len(ref_values))]
    return compare(level, ref, vals, wts, settings)


def test_known_difference_excludes_zero_and_says_what_it_spans():
    rng = np.random.default_rng(1)
    donor = rng.normal(0.3, 0.1, 10)  # donors differ in difficulty, the same for both levels
    runs = [[donor + shift + rng.normal(0, 0.01, 10) + rng.normal(0, 0.005)
             for _ in range(3)] for shift in (0.1, 0.0)]
    eff = _controlled(*runs)
    assert eff.delta == pytest.approx(0.1, abs=0.02)
    assert 0 < eff.low < eff.delta < eff.high
    assert eff.verdict == "higher than reference" and eff.n_donors == 10
    assert eff.design == "controlled: 3 vs 3 seeds; spans donors, seeds"
    assert eff.comparison == "controlled" and eff.n_seeds == 3 and eff.needs == ""


def _one_seed_study(rng, donors=12, seed_sd=1.0):
    """TPE-like: two trials, the same seed, differing only in the factor (no true effect);
    each training run shifts every donor's value by its own seed effect."""
    donor = rng.normal(0, 1, donors)
    rows, tables = [], {}
    for i, lr in enumerate((1e-4, 1e-3)):
        tid = f"t{i}"
        rows.append(_row(tid, {"lr": lr, "enc": "mlp"}, seed=0))
        tables[tid] = _table(donor + rng.normal(0, seed_sd) + rng.normal(0, 0.3, donors))
    return rows, tables


def test_one_trial_per_level_with_seed_noise_never_claims():
    """The old paired one-seed path resampled donors only and called ~half of these null
    studies distinguishable; one run per level cannot measure seed variation: no verdict."""
    rng = np.random.default_rng(7)
    verdicts, needs = set(), set()
    for _ in range(30):
        rows, tables = _one_seed_study(rng)
        out = factor_effects(rows, tables, metrics=[METRIC], base={"lr": 1e-4})
        verdicts |= set(out["verdict"])
        needs |= set(out["needs"])
        assert out["ci_low"].isna().all() and out["delta"].notna().all()
    assert verdicts == {NEEDS_REPLICATES}
    assert len(needs) == 1 and ">= 3 seeds" in needs.pop()


def test_false_claim_rate_and_power_with_known_seed_noise():
    """Seed SD = residual SD, 8 donors, 3 seeds per level: the interval claims a null effect
    at about the nominal 5%; a donors-only interval (seeds ignored) claims far more often."""
    rng = np.random.default_rng(11)
    runs, donors, seeds = 600, 8, 3

    def studies(effect):
        a = rng.normal(0, 1, (runs, 1, donors))
        x = [effect * lv + a + rng.normal(0, 0.35, (runs, 1, donors))
             + rng.normal(0, 1, (runs, seeds, 1)) + rng.normal(0, 1, (runs, seeds, donors))
             for lv in (0, 1)]
        return [(1.0, x[1]), (-1.0, x[0])], np.ones((runs, donors))

    groups, w = studies(0.0)
    iv = difference_intervals(groups, w, EffectSettings(), rng)
    fcr = np.mean(np.abs(iv.delta) > iv.half)
    assert 0.02 <= fcr <= 0.09  # binomial 99.9% band around 5% at 600 runs
    per_donor = groups[0][1].mean(1) - groups[1][1].mean(1)  # seeds ignored: donor t interval
    donor_se = per_donor.std(axis=1, ddof=1) / np.sqrt(donors)
    assert np.mean(np.abs(per_donor.mean(1)) > 2.365 * donor_se) > 0.25
    groups, w = studies(2.0)
    iv = difference_intervals(groups, w, EffectSettings(), rng)
    assert np.mean(np.abs(iv.delta) > iv.half) > 0.4  # power at 2 residual SDs


def test_grid_with_one_seed_needs_three_blocks():
    """A grid over lr x enc with one seed: 2 matched blocks give 1 df for seed variation (no
    verdict); 3 blocks give a verdict whose spread carries seeds and the other factor."""
    rng = np.random.default_rng(3)

    def grid(encs):
        rows, tables = [], {}
        for lr, shift in ((1e-4, 0.0), (1e-3, 0.3)):
            for j, enc in enumerate(encs):
                tid = f"{lr}-{enc}"
                rows.append(_row(tid, {"lr": lr, "enc": enc}, seed=0))
                tables[tid] = _table(0.3 + shift + 0.2 * j + rng.normal(0, 0.01)
                                     + rng.normal(0, 0.01, 8))
        return factor_effects(rows, tables, metrics=[METRIC], base={"lr": 1e-4})

    two = grid(["mlp", "transformer"]).set_index("factor").loc["lr"]
    assert two["verdict"] == NEEDS_REPLICATES and "2 matched blocks give 1 degree" in two["needs"]
    three = grid(["mlp", "transformer", "cnn"]).set_index("factor").loc["lr"]
    assert three["verdict"] == "higher than reference"
    assert three["design"] == "paired: 3 blocks matched on seed + other factors; spans donors, " \
                              "seeds, other factors"


def test_pairing_on_a_grid_cancels_the_other_factor():
    rng = np.random.default_rng(3)
    donors, seeds = 8, 3
    donor = rng.normal(0.3, 0.02, donors)
    tables, trials = {}, {"a": [], "b": []}
    for level, effect in (("a", 0.0), ("b", 0.04)):
        for enc, enc_effect in (("mlp", 0.0), ("vit", 0.3)):  # a large effect of the other one
            for s in range(seeds):
                key = f"{level}{enc}{s}"
                tables[key] = _table(donor + effect + enc_effect + rng.normal(0, 0.005)
                                     + rng.normal(0, 0.005, donors))
                trials[level].append(Trial(key, f"{level}-{enc}", f"{enc}|seed={s}"))
    vals, wts = donor_matrix(tables, METRIC)
    paired = compare(trials["b"], trials["a"], vals, wts, EffectSettings())
    marginal = compare(trials["b"], trials["a"], vals, wts, EffectSettings(pairing="none"))
    assert paired.design.startswith("paired: 6 blocks") and paired.comparison == "controlled"
    assert marginal.design.startswith("marginal: 2 vs 2 configs")
    assert marginal.comparison == "marginal"
    assert paired.delta == pytest.approx(marginal.delta)
    assert (paired.high - paired.low) < 0.2 * (marginal.high - marginal.low)
    assert paired.verdict == "higher than reference"
    assert marginal.verdict == NOT_DISTINGUISHABLE and "runs per level" in marginal.needs


def test_too_few_donors_gives_no_ci():
    eff = _controlled([[0.1, 0.2]] * 2, [[0.3, 0.4]] * 2)
    assert eff.delta == pytest.approx(-0.2)
    assert np.isnan(eff.low) and np.isnan(eff.high)
    assert eff.verdict == "no CI: 2 held-out donor(s) (< 3)" and "donor_folds" in eff.needs
    ok = _controlled([[0.1, 0.2], [0.12, 0.21]], [[0.3, 0.4], [0.31, 0.42]],
                     EffectSettings(min_donors=2))
    assert np.isfinite(ok.low)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="min_donors must be >= 2"):
        EffectSettings(min_donors=1)
    with pytest.raises(ValueError, match="min_replicate_df must be >= 1"):
        EffectSettings(min_replicate_df=0)
    with pytest.raises(ValueError, match="replicate_bound must be in"):
        EffectSettings(replicate_bound=1.0)


def test_interval_widens_with_seed_spread_and_is_deterministic():
    rng = np.random.default_rng(5)
    base = rng.normal(0, 1, 6)
    noise = rng.normal(0, 0.1, (3, 6))
    calm = [(1.0, (base + 0.2 + noise)[None]), (-1.0, (base + noise[::-1])[None])]
    shifts = np.array([[-0.3], [0.0], [0.3]])
    wild = [(1.0, (base + 0.2 + noise + shifts)[None]), (-1.0, (base + noise[::-1])[None])]
    w = np.ones((1, 6))
    a, b = difference_intervals(calm, w), difference_intervals(wild, w)
    assert a.delta == pytest.approx(b.delta) and b.half[0] > 2 * a.half[0]
    assert b.replicate[0] > 10 * a.replicate[0]
    assert difference_intervals(wild, w).half[0] == b.half[0]  # seeded draws


def test_recall_weighted_by_spots_pearson_by_donor():
    a = {"r5_img2gene": [0.1, 0.5], "probe_pearson_mean": [0.1, 0.5]}
    tables = {"a": pd.concat([_table(v, m, n=[300, 100]) for m, v in a.items()]),
              "b": pd.concat([_table([0.0, 0.0], m, n=[300, 100]) for m in a])}
    trials = [Trial("a", "ca", "x"), Trial("b", "cb", "y")]
    settings = EffectSettings(min_donors=2)
    recall = compare(trials[:1], trials[1:], *donor_matrix(tables, "r5_img2gene"), settings)
    pearson = compare(trials[:1], trials[1:], *donor_matrix(tables, "probe_pearson_mean"),
                      settings)
    assert recall.delta == pytest.approx((0.1 * 300 + 0.5 * 100) / 400)  # the whole-set figure
    assert pearson.delta == pytest.approx(0.3)  # the mean over donors
    assert recall.verdict == NEEDS_REPLICATES


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
                                     + rng.normal(0, 0.003) + rng.normal(0, 0.005, 6))
    out = factor_effects(rows, tables, metrics=[METRIC], base={"method": "none", "enc": "mlp"})
    method = out[out["factor"] == "method"].set_index("level")
    assert set(method["reference"]) == {"none"} and set(method.index) == {"combat", "harmony"}
    assert method.loc["harmony", "delta"] == pytest.approx(0.05, abs=0.01)
    assert method.loc["harmony", "verdict"] == "higher than reference"
    assert method.loc["combat", "verdict"] == NOT_DISTINGUISHABLE
    assert "seeds per configuration (sweep.seeds)" in method.loc["combat", "needs"]
    assert method.loc["harmony", "design"].startswith("paired: 6 blocks")
    assert method.loc["harmony", "trials"] == "6 vs 6"
    assert method.loc["harmony", "n_seeds"] == 3 and method.loc["harmony", "df"] > 1
    enc = out[out["factor"] == "enc"].iloc[0]
    assert (enc["level"], enc["reference"]) == ("transformer", "mlp")
    assert "train.seed" not in set(out["factor"])


def test_controlled_rows_use_each_factors_own_sub_experiment():
    """Confirm-phase rows: the best config (lr 1e-3, temp 0.07) re-run with each factor at
    each level, 3 seeds each; search rows (TPE, one seed) are a separate marginal analysis."""
    rng = np.random.default_rng(8)
    donor = rng.normal(0.3, 0.05, 6)
    rows, tables = [], {}
    configs = [{"lr": lr, "temp": 0.07} for lr in (1e-4, 1e-3, 1e-2)]
    configs += [{"lr": 1e-3, "temp": t} for t in (0.03, 0.2)]
    for i, params in enumerate(configs):
        for s in range(3):
            tid = f"c{i}s{s}"
            rows.append(_row(tid, {**params, "train.seed": s}, s, phase="confirm"))
            tables[tid] = _table(donor + (0.1 if params["lr"] == 1e-2 else 0.0)
                                 + rng.normal(0, 0.004) + rng.normal(0, 0.004, 6))
    for i, (lr, temp) in enumerate([(1e-4, 0.05), (1e-3, 0.1), (1e-2, 0.12), (1e-3, 0.15)]):
        rows.append(_row(f"s{i}", {"lr": lr, "temp": temp}, 0, design="marginal"))
        tables[f"s{i}"] = _table(donor + rng.normal(0, 0.01, 6))
    out = factor_effects(rows, tables, metrics=[METRIC], base={"lr": 1e-3, "temp": 0.07})
    controlled = out[out["comparison"] == "controlled"].set_index(["factor", "level"])
    high = controlled.loc[("lr", "0.01")]
    assert high["trials"] == "3 vs 3" and high["verdict"] == "higher than reference"
    assert high["design"] == "controlled: 3 vs 3 seeds; spans donors, seeds"
    assert controlled.loc[("temp", "0.2"), "trials"] == "3 vs 3"
    marginal = out[out["comparison"] == "marginal"]
    assert len(marginal) and set(marginal["verdict"]) <= {NEEDS_REPLICATES, NOT_DISTINGUISHABLE,
                                                          "higher than reference",
                                                          "lower than reference"}
    assert (marginal["design"].str.startswith("marginal")).all()
    only = factor_effects(rows, tables, metrics=[METRIC], base={"lr": 1e-3},
                          members={"lr": {"c0s0", "c0s1", "c2s0", "c2s1"}})
    lr = only[(only["factor"] == "lr") & (only["comparison"] == "controlled")]
    assert list(lr["trials"]) == ["2 vs 2"]  # lr 1e-4 vs 1e-2: the reference is absent


def test_planning_from_variance_components():
    comp = Components(donor=0.0, replicate=1.0, residual=0.0, w2=0.1, c=2 / 3, n_donors=10,
                      seeds=3, units=6, groups=2)
    assert plan_variance(comp, 3, 10)[0] == pytest.approx(2 / 3)
    assert plan_variance(comp, 6, 10)[0] == pytest.approx(1 / 3)
    small, large = resolving_design(comp, 1.2), resolving_design(comp, 2.0)
    assert small is not None and large is not None and large[0] < small[0]
    assert resolving_design(comp, 1e-4) is None
    assert needs_text(comp, 2.0).startswith(f"~{large[0]} seeds per level to resolve")
    assert "below what 20 seeds per level" in needs_text(comp, 1e-4)
    donors_only = Components(donor=1.0, replicate=0.0, residual=0.0, w2=0.25, c=2 / 3,
                             n_donors=4, seeds=3, units=6, groups=2)
    seeds, donors = resolving_design(donors_only, 0.8)
    assert donors > 4 and "held-out donors" in needs_text(donors_only, 0.8)


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
    trials = [Trial("t", "a", "x"), Trial("z", "b", "y")]
    for metric, headline in (("r5_img2gene", whole),
                             ("ridge_pearson_mean", metrics["ridge_pearson_mean"])):
        eff = compare(trials[:1], trials[1:], *donor_matrix(tables, metric))
        assert eff.delta == pytest.approx(headline)
