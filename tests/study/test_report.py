"""Study report: tables, protocol strata, factor effects, mutation power, preprocessing
warnings, the HTML document. Synthetic ``trial_table`` rows; no Ray."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from hescape.config import StudyConfig
from hescape.study.report.build import (
    NO_PER_DONOR,
    ablation,
    baseline_comparison,
    build_report,
    leaderboard,
)
from hescape.study.report.effects import BootstrapSettings
from hescape.study.results import check_per_donor

SPLIT = {"train": ["d0", "d1", "d2"], "val": ["d3"], "test": ["d4", "d5", "d6", "d7"]}


def _row(i: int, params: dict, metrics: dict, status: str = "FINISHED", *,
         saw_heldout: bool = False, seed: int = 0, **extra) -> dict:
    return {"trial_id": f"t{i}", "status": status, "phase": "search", "config_id": str(params),
            "seed": str(seed), "saw_heldout": str(saw_heldout).lower(), "sweep_params": params,
            "metrics": metrics, "run_id": f"r{i}", "error": "", "split": SPLIT,
            "preprocess": params.get("preprocess.expression.method", "none"), **extra}


def _cfg(**params) -> StudyConfig:
    sweep = {"searcher": "grid", "scheduler": "none",
             "objectives": [{"metric": "val/r5_img2gene", "mode": "max"}],
             "params": {k: {"type": "choice", "values": v} for k, v in params.items()}}
    return StudyConfig.model_validate({"name": "unit", "sweep": sweep})


def _per_donor(values, donors=("d4", "d5", "d6", "d7")) -> pd.DataFrame:
    frame = pd.DataFrame({"metric": "r5_img2gene", "donor": list(donors)[:len(values)],
                          "value": values, "n": 100})
    return check_per_donor(frame, "unit")


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


def test_leaderboard_sorted_with_batches_beside_mixing_and_pca_beside_probes():
    rows = [_row(i, {}, {"val/r5_img2gene": v, "test/gene/ilisi": 0.4, "test/gene/n_batches": 3.0,
                         "test/img/hest_pearson_mean": 0.1, "test/img/hest_pca_dim": 256.0})
            for i, v in enumerate([0.1, 0.3, 0.2])]
    board = leaderboard(rows, "val/r5_img2gene", "max",
                        ["test/img/hest_pearson_mean", "test/gene/ilisi", "test/img/mutation_auroc"])
    assert board["trial"].tolist() == ["t1", "t2", "t0"]
    cols = list(board.columns)
    assert cols[cols.index("test/gene/ilisi") + 1] == "test/gene/n_batches"
    assert cols[cols.index("test/img/hest_pearson_mean") + 1] == "test/img/hest_pca_dim"
    assert "test/img/mutation_auroc" not in cols  # no trial logged it: no empty column


def _probe_metrics(label_acc: float, *, underpowered: bool) -> dict:
    m = {"test/img/label_balanced_accuracy": label_acc,
         "test/gene/label_balanced_accuracy": 0.7,
         "test/baseline_frozen/label_balanced_accuracy": 0.5,
         "test/baseline_pca/label_balanced_accuracy": 0.8,
         "test/gene/ilisi": 0.6, "test/gene/n_batches": 4.0, "test/baseline_frozen/ilisi": 0.2,
         "test/img/mutation_underpowered": float(underpowered),
         "test/img/mutation_n_donors_min_class": 3.0 if underpowered else 12.0,
         "test/img/mutation_n_encoder_donors": 3.0}
    if not underpowered:
        m.update({"test/img/mutation_auroc": 0.8125, "test/img/mutation_auroc_ci_low": 0.7,
                  "test/img/mutation_auroc_ci_high": 0.9, "test/img/mutation_auroc_pvalue": 0.01,
                  "test/baseline_frozen/mutation_auroc": 0.6})
    return m


TASKS = {"label bal. acc.": "label_balanced_accuracy", "batch mixing iLISI": "ilisi",
         "mutation AUROC": "mutation_auroc"}


def test_baseline_comparison_aggregates_finished_trials():
    rows = [_row(0, {}, _probe_metrics(0.6, underpowered=False)),
            _row(1, {}, _probe_metrics(0.8, underpowered=False)),
            _row(2, {}, _probe_metrics(0.0, underpowered=False), status="FAILED")]
    table = baseline_comparison(rows, TASKS)
    assert list(table.columns) == ["contrastive img", "contrastive gene", "frozen img",
                                   "pca expr"]
    assert table.loc["label bal. acc.", "contrastive img"] == "0.700 ± 0.141"
    assert table.loc["label bal. acc.", "frozen img"] == "0.500"  # the same in every trial
    assert table.loc["batch mixing iLISI (batches 4)", "contrastive gene"] == "0.600"
    assert table.loc["mutation AUROC", "contrastive img"] == "0.812"
    assert baseline_comparison([_row(0, {}, {"test/img/label_balanced_accuracy": 0.5})],
                               TASKS).empty
    no_baseline = {k: v for k, v in _probe_metrics(0.6, underpowered=False).items()
                   if "/baseline_" not in k}
    assert baseline_comparison([_row(0, {}, no_baseline)], TASKS).empty  # nothing to compare


def test_baseline_comparison_drops_underpowered_mutation_rows():
    rows = [_row(0, {}, {**_probe_metrics(0.6, underpowered=True),
                         "test/baseline_frozen/mutation_auroc": 0.0})]  # a stale figure
    table = baseline_comparison(rows, TASKS)
    assert "mutation AUROC" not in table.index and "label bal. acc." in table.index


@pytest.mark.parametrize("status", ["KILLED", "FAILED"])
def test_no_finished_trials_gives_empty_tables(status):
    rows = [_row(0, {"a": 1}, {"m": 1.0}, status=status)]
    assert ablation(rows, ["m"]) == {} and baseline_comparison(rows, TASKS).empty


# ------------------------------------------------------------------------- the document
def _mixed_study():
    """none/harmony inductive, combat transductive; 2 seeds; harmony +0.1 on every donor."""
    rows, per_donor, i = [], {}, 0
    rng = np.random.default_rng(0)
    for method, shift in (("none", 0.0), ("harmony", 0.1), ("combat", 0.3)):
        for seed in range(2):
            base = 0.2 + shift + rng.normal(0, 0.005, 4)
            rows.append(_row(i, {"preprocess.expression.method": method, "train.seed": seed},
                             {"val/r5_img2gene": 0.5 + shift, "test/r5_img2gene": base.mean()},
                             saw_heldout=method == "combat", seed=seed))
            per_donor[f"t{i}"] = _per_donor(base)
            i += 1
    return _cfg(**{"preprocess.expression.method": ["none", "harmony", "combat"]}), rows, per_donor


def _section(md: str, title: str) -> str:
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


def test_report_splits_every_table_by_saw_heldout(tmp_path):
    cfg, rows, per_donor = _mixed_study()
    doc, frames = build_report(cfg, rows, out=tmp_path, per_donor=per_donor)
    md = doc.markdown()
    assert "fitted with the held-out donors' expression" in md  # the protocol sentence
    assert "mixes inductive and transductive preprocessing" in md
    inductive = _section(md, "## Leaderboard: inductive trials")
    transductive = _section(md, "## Leaderboard: transductive trials")
    assert {"t0", "t1", "t2", "t3"} <= set(re.findall(r"\bt\d\b", inductive))
    assert not {"t4", "t5"} & set(re.findall(r"\bt\d\b", inductive))
    assert set(re.findall(r"\| (t\d) ", transductive)) == {"t4", "t5"}
    assert "### `preprocess.expression.method`: transductive trials" in md
    effects = frames["effects"]
    assert set(effects["protocol"]) == {"inductive"}  # combat has no transductive reference
    harmony = effects.set_index("level").loc["harmony"]
    assert harmony["reference"] == "none" and harmony["verdict"] == "higher than reference"
    assert harmony["delta"] == pytest.approx(0.1, abs=0.01)
    assert "combat" not in set(effects["level"])  # never compared across protocols
    assert set(frames["leaderboard"]["protocol"]) == {"inductive", "transductive"}


def test_effects_say_that_asha_stopped_trials_are_left_out(tmp_path):
    cfg, rows, per_donor = _mixed_study()
    rows.append(_row(9, {"preprocess.expression.method": "none"}, {}, status="KILLED"))
    effects = _section(build_report(cfg, rows, out=tmp_path, per_donor=per_donor)[0].markdown(),
                       "## Factor effects")
    assert "1 trial(s) were stopped early" in effects


def test_effects_say_what_the_interval_spans_and_what_to_run(tmp_path):
    """2 seeds per level: a controlled verdict over donors and seeds; one run per level:
    no verdict, and the report says what to run."""
    cfg, rows, per_donor = _mixed_study()
    section = _section(build_report(cfg, rows, out=tmp_path, per_donor=per_donor)[0].markdown(),
                       "## Factor effects")
    assert "controlled: 2 vs 2 seeds; spans donors, seeds" in section
    assert "needs replicates" not in section.split("|---")[-1]  # every row has a verdict
    single = [r for r in rows if r["seed"] == "0"]
    doc, frames = build_report(cfg, single, out=tmp_path, per_donor=per_donor)
    section = _section(doc.markdown(), "## Factor effects")
    assert set(frames["effects"]["verdict"]) == {"needs replicates"}
    assert "needs replicates: run each level with >= 3 seeds" in section
    assert "have no verdict (needs replicates)" in section and "sweep.confirm.seeds" in section
    assert "[+" not in section.split("|---")[-1]  # no interval printed


def test_single_protocol_is_named_once(tmp_path):
    cfg, rows, per_donor = _mixed_study()
    doc, _ = build_report(cfg, rows[:4], out=tmp_path, per_donor=per_donor)
    md = doc.markdown()
    assert "All trials are inductive." in md and "## Leaderboard\n" in md
    assert "mixes inductive and transductive" not in md


def test_without_per_donor_tables_the_report_says_cis_are_unavailable(tmp_path):
    cfg, rows, _ = _mixed_study()
    doc, frames = build_report(cfg, rows, out=tmp_path, per_donor={})
    assert NO_PER_DONOR in doc.markdown() and frames["effects"].empty
    assert "[+" not in _section(doc.markdown(), "## Factor effects")


def test_too_few_held_out_donors_print_no_ci(tmp_path):
    cfg, rows, _ = _mixed_study()
    per_donor = {r["trial_id"]: _per_donor([0.1, 0.2]) for r in rows}
    doc, frames = build_report(cfg, rows, out=tmp_path, per_donor=per_donor,
                               settings=BootstrapSettings(min_donors=3))
    assert set(frames["effects"]["verdict"]) == {"no CI: 2 held-out donor(s) (< 3)"}
    assert "(no CI)" in doc.markdown()


def test_underpowered_mutation_probe_drops_the_claim(tmp_path):
    cfg = _cfg(**{"loss.name": ["clip", "siglip"]})
    rows = [_row(i, {"loss.name": n}, {"val/r5_img2gene": 0.1,
                                       **_probe_metrics(0.6, underpowered=True)})
            for i, n in enumerate(["clip", "siglip"])]
    md = build_report(cfg, rows, out=tmp_path)[0].markdown()
    need = getattr(cfg.eval, "mutation_min_donors_per_class", None)
    assert f"underpowered: 3 donor(s) per class (needs >= {need}" in md
    assert "HESCAPE reported" not in md and "| mutation AUROC" not in md
    mutation = _section(md, "## Mutation probe")
    assert "The encoder trained on donors d0, d1, d2" in mutation
    assert "3 of the probe's donors" in mutation


def test_powered_mutation_probe_shows_auroc_ci_and_p(tmp_path):
    cfg = _cfg(**{"loss.name": ["clip", "siglip"]})
    rows = [_row(i, {"loss.name": n}, {"val/r5_img2gene": 0.1,
                                       **_probe_metrics(0.6, underpowered=False)})
            for i, n in enumerate(["clip", "siglip"])]
    md = build_report(cfg, rows, out=tmp_path)[0].markdown()
    assert "0.812 [0.700, 0.900] p=0.01" in _section(md, "## Mutation probe")
    assert "HESCAPE reported" in md and "underpowered:" not in md


def test_scvi_epoch_cap_and_harmony_warnings(tmp_path):
    cfg, rows, per_donor = _mixed_study()
    rows[2]["preprocess_converged"] = "false"
    rows[2]["preprocess_info"] = {"converged": False}
    work = {"variants": [
        {"method": "scvi", "saw_heldout": False, "cache_key": "abc123", "n_batches": 3,
         "measured_on": ["d4", "d5"], "metrics": {"pre/ilisi": 0.3},
         "info": {"epochs_run": 60, "max_epochs": 60, "early_stopped": False,
                  "stopped_on_cap": True}},
        {"method": "scvi", "saw_heldout": False, "cache_key": "def456", "n_batches": 3,
         "measured_on": {"part": "test", "donors": ["d4", "d5"], "n_rows": 60},
         "metrics": {"pre/ilisi": 0.5},
         "info": {"epochs_run": 140, "max_epochs": 400, "early_stopped": True,
                  "stopped_on_cap": False}}]}
    md = build_report(cfg, rows, out=tmp_path, shared_work=work, per_donor=per_donor)[0].markdown()
    warnings = [line for line in md.splitlines() if line.startswith("> **Warning:**")]
    cap = [w for w in warnings if "epoch cap" in w]
    assert len(cap) == 1 and "`abc123`" in cap[0] and "60 of 60 epochs" in cap[0]
    assert any("`t2`" in w and "did not converge" in w for w in warnings)
    variants = _section(md, "## Preprocessing variants before training")
    assert "stopped on cap (60/60 ep)" in variants and "early-stopped (140 ep)" in variants
    assert "n_batches" in variants and "test: d4, d5, 60 rows" in variants
    rows[3]["metrics"]["test/gene/knn_capped"] = 1.0
    capped = build_report(cfg, rows, out=tmp_path, per_donor=per_donor)[0].markdown()
    assert "Trials `t3`: mixing figures measured on fewer than 91 rows" in capped
    clean = build_report(cfg, _mixed_study()[1], out=tmp_path, shared_work={"variants": []},
                         per_donor=per_donor)[0].markdown()
    assert "epoch cap" not in clean and "did not converge" not in clean


# ------------------------------------------------------------------------- the answer first
DONORS8 = tuple(f"d{i}" for i in range(4, 12))


def _confirmed_study():
    """TPE search (one seed per configuration) + confirm phase (3 seeds): harmony +0.08 over
    none on every donor, loss.name no effect; donor and seed noise."""
    from hescape.study import confirm

    params = {"preprocess.expression.method": {"type": "choice", "values": ["none", "harmony"]},
              "loss.name": {"type": "choice", "values": ["clip", "siglip"]}}
    cfg = StudyConfig.model_validate({"name": "unit", "sweep": {
        "searcher": "tpe", "scheduler": "none", "params": params,
        "objectives": [{"metric": "val/r5_img2gene", "mode": "max"}]}})
    rng = np.random.default_rng(3)
    donor = rng.normal(0, 0.03, len(DONORS8))
    rows, per_donor = [], {}

    def add(phase, p, seed):
        i = len(rows)
        shift = 0.08 * (p["preprocess.expression.method"] == "harmony")
        values = 0.3 + shift + donor + rng.normal(0, 0.01) + rng.normal(0, 0.004, len(donor))
        rows.append(_row(i, {**p, "train.seed": seed}, {"val/r5_img2gene": 0.5 + shift},
                         seed=seed, phase=phase))
        per_donor[f"t{i}"] = _per_donor(values, DONORS8)

    for m, loss in (("none", "clip"), ("harmony", "siglip"), ("harmony", "clip")):
        add("search", {"preprocess.expression.method": m, "loss.name": loss}, 0)
    plan = confirm.make_plan(cfg, rows)
    for point in confirm.plan_points(cfg, plan):
        seed = point.pop("train.seed")
        add("confirm", point, seed)
    return cfg, rows, per_donor, plan


def test_the_report_answers_first_from_the_confirm_phase(tmp_path):
    cfg, rows, per_donor, plan = _confirmed_study()
    doc, frames = build_report(cfg, rows, out=tmp_path, per_donor=per_donor, plan=plan)
    md = doc.markdown()
    first = md.index("\n## ")
    assert md[first:].startswith("\n## The answer"), "the answer is the first section"
    answer = _section(md, "## The answer")
    assert "|" not in answer  # words, before any table
    method = next(line for line in answer.splitlines() if "`preprocess.expression.method`" in line)
    assert "**matters**" in method and "controlled, replicated (confirm phase" in method
    assert "3 seeds per level" in method and "(objective)" in method
    assert "none vs harmony" in method  # the reference is the searched best's level
    loss = next(line for line in answer.splitlines() if "`loss.name`" in line)
    assert "**matters**" not in loss  # no planted effect: no claim
    effects = frames["effects"]
    confirm_rows = effects[effects["comparison"] == "controlled"]
    hm = confirm_rows[confirm_rows["factor"] == "preprocess.expression.method"].iloc[0]
    assert hm["reference"] == "harmony" and hm["trials"] == "3 vs 3"  # its own sub-experiment
    assert hm["delta"] == pytest.approx(-0.08, abs=0.02)
    assert hm["verdict"] == "lower than reference"
    marginal = effects[effects["comparison"] == "marginal"]
    assert len(marginal) and set(marginal["verdict"]) == {"needs replicates"}  # kept, labelled
    assert "### Effects, controlled, replicated comparisons" in md
    assert "### Effects, marginal comparisons of the search (not controlled)" in md


def test_the_answer_gives_no_verdict_from_one_seed(tmp_path):
    cfg, rows, per_donor = _mixed_study()
    single = [r for r in rows if r["seed"] == "0"]
    md = build_report(cfg, single, out=tmp_path, per_donor=per_donor)[0].markdown()
    answer = _section(md, "## The answer")
    assert "**no verdict**" in answer and "**matters**" not in answer
    assert "training-seed variation is unmeasured" in answer and "sweep.confirm" in answer
    two_seeds = build_report(cfg, rows, out=tmp_path, per_donor=per_donor)[0].markdown()
    assert "**matters**" in _section(two_seeds, "## The answer")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_html_is_a_self_contained_document(tmp_path):
    cfg, rows, per_donor = _mixed_study()
    doc, _ = build_report(cfg, rows, out=tmp_path, per_donor=per_donor)
    md, page = doc.markdown(), doc.html()
    parser = _Tags()
    parser.feed(page)
    n_tables = len(re.findall(r"^\|[:\-|]+\|$", md, flags=re.M))  # markdown separator rows
    assert page.startswith("<!doctype html>") and parser.tags.count("table") == n_tables > 3
    assert parser.tags.count("h2") == md.count("\n## ")
    assert parser.images and all(s.startswith("data:image/png;base64,") for s in parser.images)
    assert len(parser.images) == md.count("![")  # every plot of the markdown, embedded
    assert parser.tags.count("pre") == 1  # the config only; the report is not a <pre> dump
    assert "<em>transductive</em>" in page and "**" not in page


def test_write_report_reads_per_donor_tables_and_logs_to_the_parent(tmp_path):
    """trial_table -> per-donor tables (trial dir, else the child run's artifact) -> effects
    -> report/ artifacts on the parent run, against a real MLflow sqlite store."""
    from hescape.study import lineage
    from hescape.study.report.build import write_report

    ref = lineage.open_parent(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", "unit",
                              resume=False, tags={})
    client = lineage.MlflowClient(ref.tracking_uri)
    study_dir = tmp_path / "study"
    for i, (method, shift) in enumerate([("none", 0.0), ("harmony", 0.1)]):
        tags = {"hescape.sweep_params": f'{{"preprocess.expression.method": "{method}"}}',
                "hescape.preprocess_saw_heldout": "false", "hescape.seed": "0",
                "hescape.split": "train=d0,d1;val=d3;test=d4,d5,d6,d7",
                "hescape.preprocess_converged": "true"}
        run_id = lineage.open_child(ref, f"t{i}", existing=None, name=f"t{i}", tags=tags)
        client.log_metric(run_id, "val/r5_img2gene", 0.5 + shift)
        client.log_metric(run_id, "test/r5_img2gene", 0.2 + shift)
        table = pd.DataFrame({"metric": "r5_img2gene", "donor": ["d4", "d5", "d6", "d7"],
                              "value": 0.2 + shift + np.array([0.0, 0.01, 0.02, 0.03]),
                              "n": [50, 60, 70, 80]})
        path = study_dir / "trials" / f"t{i}" / "eval" / "per_donor.csv"
        path.parent.mkdir(parents=True)
        table.to_csv(path, index=False)
        if i == 1:  # only in the child run's artifacts
            client.log_artifact(run_id, str(path), artifact_path="eval")
            path.unlink()
        lineage.finish_run(ref, run_id, "FINISHED")
    work = {"variants": [{"method": "scvi", "saw_heldout": False, "cache_key": "k1",
                          "metrics": {}, "info": {"stopped_on_cap": True, "epochs_run": 60,
                                                  "max_epochs": 60}}]}
    lineage.log_json_artifact(ref, ref.parent_run_id, work, "shared_work.json")
    cfg = _cfg(**{"preprocess.expression.method": ["none", "harmony"]})
    out = write_report(ref, study_dir, cfg)  # a re-report: shared work from the parent run
    effects = pd.read_csv(out / "effects.csv")
    assert len(effects) == 1 and effects.loc[0, "level"] == "harmony"
    assert effects.loc[0, "delta"] == pytest.approx(0.1)
    logged = {a.path for a in client.list_artifacts(ref.parent_run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/effects.csv",
            "report/leaderboard.csv"} <= logged
    html = (out / "report.html").read_text()
    assert "The encoder" not in html
    assert effects.loc[0, "verdict"] == "needs replicates"  # one run per level: no verdict
    assert "needs replicates: run each level with &gt;= 3 seeds" in html
    assert "stopped on its epoch cap (60 of 60 epochs)" in html


def test_names_the_report_reads_are_declared_by_the_probe_registry():
    """The report's own names (mutation keys, companions, effect metrics) exist in the
    registry, so a rename there fails here rather than silently blanking the report."""
    from hescape.evaluate.probe_spec import metric_names
    from hescape.study.report.notes import FALLBACK_NAMES, companions, mixing_figures
    from hescape.study.report.tables import EFFECT_METRICS

    names = metric_names()
    declared = {m for ms in names.values() for m in ms}
    assert set(FALLBACK_NAMES["mutation"]) <= set(names["mutation"])
    assert mixing_figures() and mixing_figures() <= set(names["mixing"])
    for key in ("test/gene/ilisi", "test/img/hest_pearson_mean",
                "test/img/ridge_per_donor_pearson_mean"):
        assert {c.split("/")[-1] for c in companions(key, mixing_figures())} <= declared
    assert {m.split("/")[-1] for m in EFFECT_METRICS} <= declared


def test_a_conditional_factor_at_one_value_is_not_a_second_copy_of_its_condition(tmp_path):
    """``adversary.weight: [0.5]`` swept when the adversary is on: its comparison is the
    adversary's own, so the effects (and the answer) name the adversary only."""
    params = {"model.adversary.enabled": {"type": "choice", "values": [False, True]},
              "model.adversary.weight": {"type": "choice", "values": [0.5],
                                         "when": {"model.adversary.enabled": [True]}}}
    cfg = StudyConfig.model_validate({"name": "unit", "sweep": {
        "searcher": "grid", "scheduler": "none", "params": params,
        "objectives": [{"metric": "val/r5_img2gene", "mode": "max"}]}})
    rng = np.random.default_rng(1)
    rows, per_donor = [], {}
    for on in (False, True):
        for seed in range(3):
            p = {"model.adversary.enabled": on, **({"model.adversary.weight": 0.5} if on else {})}
            i = len(rows)
            rows.append(_row(i, {**p, "train.seed": seed}, {"val/r5_img2gene": 0.5}, seed=seed))
            per_donor[f"t{i}"] = _per_donor(0.3 + rng.normal(0, 0.01, 4))
    doc, frames = build_report(cfg, rows, out=tmp_path, per_donor=per_donor)
    assert set(frames["effects"]["factor"]) == {"model.adversary.enabled"}
    answer = _section(doc.markdown(), "## The answer")
    assert "`model.adversary.weight`" not in answer
    assert "levels differing in this factor only" in answer  # one factor: no blocks


def test_epoch_cap_warning_names_the_capped_methods_own_setting():
    from hescape.study.report.notes import _unconverged

    info = {"stopped_on_cap": True, "epochs_run": 400, "max_epochs": 400}
    assert "`preprocess.expression.drvi.max_epochs`" in _unconverged(info, "drvi")
    assert "`preprocess.expression.scvi.max_epochs`" in _unconverged(info, "scvi")
