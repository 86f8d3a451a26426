"""What a trial's MLflow run shows: compact names with the swept levels, outcomes that keep
early stopping apart from failures, a metric set that fits on one screen, and the full
evaluation read back for the report."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from hescape.study import lineage, run_view
from hescape.study.results import trial_table
from hescape.study.tune_reports import cached_report

SPACE = {
    "preprocess.expression.method": {"type": "choice", "values": ["none", "harmony", "scvi"]},
    "loss.name": {"type": "choice", "values": ["clip", "siglip"]},
    "loss.init_temperature": {"type": "loguniform", "low": 0.03, "high": 0.2},
    "model.adversary.enabled": {"type": "choice", "values": [False, True]},
    "model.adversary.weight": {"type": "uniform", "low": 0.1, "high": 1.0,
                               "when": {"model.adversary.enabled": [True]}},
    "model.gene.name": {"type": "choice", "values": ["mlp"]},  # one level: not swept
}


def test_name_carries_every_swept_level_compactly_then_seed_fold_and_id():
    params = {"preprocess.expression.method": "harmony", "loss.name": "siglip",
              "loss.init_temperature": 0.0712345, "model.adversary.enabled": True,
              "model.adversary.weight": 0.51, "model.gene.name": "mlp", "train.seed": 2}
    name = run_view.run_name("4c0536fe", params, run_view.swept_keys(SPACE), seed=2, fold=1)
    assert name == "harmony siglip T=0.0712 adv=on adv.w=0.51 s2 f1 · 4c0536fe"
    # the method and the loss come first, where the runs table cuts a long name
    assert name.index("harmony") < name.index("T=")


def test_swept_keys_drop_single_value_choices_and_keep_continuous_ones():
    assert run_view.swept_keys(SPACE) == [
        "preprocess.expression.method", "loss.name", "loss.init_temperature",
        "model.adversary.enabled", "model.adversary.weight"]
    assert run_view.swept_keys({}) == []


def test_a_conditional_level_absent_from_a_trial_is_left_out():
    params = {"preprocess.expression.method": "none", "loss.name": "clip",
              "loss.init_temperature": 0.05, "model.adversary.enabled": False}
    name = run_view.run_name("t1", params, run_view.swept_keys(SPACE), seed=0)
    assert name == "none clip T=0.05 adv=off s0 · t1"


def test_mlflow_metrics_keep_curves_headlines_and_what_selection_reads():
    metrics = {"step": 150.0, "epoch": 3.0, "train/loss": 1.0, "train/steps_per_s": 9.0,
               "val/r5_img2gene": 0.2, "val/median_rank_img2gene": 30.0,
               "val/mean_rank_img2gene": 40.0, "test/r5_img2gene": 0.1,
               "test/r5_img2gene_within_donor": 0.3, "test/joint/ilisi": 0.5,
               "test/joint/subsample_seed": 0.0, "test/bleep_n_donors": 3.0,
               "test/gene/mutation_n_folds": 5.0, "test/gene/label_macro_f1": 0.4}
    shown = run_view.mlflow_metrics(metrics, required=["val/mean_rank_img2gene"])
    assert set(shown) == {"step", "epoch", "train/loss", "val/r5_img2gene",
                          "val/mean_rank_img2gene", "test/r5_img2gene",
                          "test/r5_img2gene_within_donor", "test/joint/ilisi",
                          "test/gene/label_macro_f1"}


@pytest.mark.parametrize(("status", "tags", "outcome", "row"), [
    ("FINISHED", {"hescape.outcome": "stopped early"}, "stopped early", "KILLED"),
    ("FINISHED", {"hescape.outcome": "completed"}, "completed", "FINISHED"),
    ("FINISHED", {}, "completed", "FINISHED"),  # a run logged before the tag existed
    ("KILLED", {}, "interrupted", "KILLED"),
    ("FAILED", {}, "failed", "FAILED"),
])
def test_outcome_and_report_status(status, tags, outcome, row):
    assert run_view.outcome(status, tags) == outcome
    assert run_view.row_status(status, tags) == row


def test_report_rows_read_the_full_evaluation_and_close_orphans_say_interrupted(tmp_path):
    """On a real sqlite store: the child shows the subset; ``trial_table(study_dir=...)``
    gives the report the whole ``eval/metrics.json`` (local file, else the artifact); a
    resumed study's cached report has it too; orphans close as interrupted."""
    ref = lineage.open_parent(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "s", resume=False,
                              tags={})
    full = {"test/r5_img2gene": 0.25, "test/gene/knn_capped": 1.0, "test/bleep_k": 10.0,
            "test/gene/kbet": float("nan")}  # evaluation writes NaN; MLflow never had it
    runs = {}
    for trial_id in ("a", "b"):
        run_id = lineage.open_child(ref, trial_id, existing=None, name=trial_id, tags={})
        client = MlflowClient(ref.tracking_uri)
        client.log_metric(run_id, "test/r5_img2gene", 0.25)
        runs[trial_id] = run_id
    local = tmp_path / "study" / "trials" / "a" / "eval"
    local.mkdir(parents=True)
    (local / "metrics.json").write_text(json.dumps(full))
    art = tmp_path / "art" / "metrics.json"
    art.parent.mkdir()
    art.write_text(json.dumps({**full, "test/bleep_k": 7.0}))
    lineage.log_artifacts(ref, runs["b"], {"metrics": art}, subdir="eval")
    for trial_id in ("a", "b"):
        lineage.finish_run(ref, runs[trial_id], "FINISHED",
                           tags=run_view.outcome_tags(run_view.COMPLETED))
    orphan = lineage.open_child(ref, "c", existing=None, name="c", tags={})
    assert lineage.close_orphans(ref, reason="driver stopped") == 1

    rows = {r["trial_id"]: r for r in trial_table(ref, study_dir=tmp_path / "study")}
    assert rows["a"]["metrics"]["test/gene/knn_capped"] == 1.0  # from the trial directory
    assert rows["b"]["metrics"]["test/bleep_k"] == 7.0  # from the run's artifact
    assert "test/gene/kbet" not in rows["a"]["metrics"]
    assert rows["c"]["outcome"] == "interrupted" and rows["c"]["status"] == "KILLED"
    assert "test/bleep_k" not in {r["trial_id"]: r for r in trial_table(ref)}["a"]["metrics"]
    run = MlflowClient(ref.tracking_uri).get_run(runs["a"])
    assert cached_report(run, tmp_path / "study" / "trials" / "a")["test/bleep_k"] == 10.0
    assert MlflowClient(ref.tracking_uri).get_run(orphan).data.tags["hescape.outcome"] == \
        "interrupted"


def test_dashboard_link_sorts_by_the_objective():
    page = lineage.dashboard_page("3", "val/r5_img2gene")
    assert page == ("#/experiments/3/runs?workflowType=machine_learning"
                    "&orderByKey=metrics.%60val%2Fr5_img2gene%60&orderByAsc=false"
                    "&searchFilter=tags.%60hescape.role%60%20%3D%20%27trial%27")
    assert lineage.dashboard_page("3") == "#/experiments/3?workflowType=machine_learning"


def test_child_params_are_the_core_set_and_what_differs_from_the_study():
    base = {"model.image.name": "uni", "model.gene.name": "mlp", "train.lr": 0.001,
            "train.seed": 0, "loss.name": "clip", "eval.probe_pca": 50, "train.eval_every": 50}
    flat = {**base, "loss.name": "siglip", "train.seed": 2}
    shown = run_view.child_params(flat, base)
    assert shown == {"model.image.name": "uni", "model.gene.name": "mlp", "train.lr": 0.001,
                     "train.seed": 2, "loss.name": "siglip"}
