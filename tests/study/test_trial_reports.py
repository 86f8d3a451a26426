"""What a trial reports to Tune, restored or not (issue 15).

``run_trial`` runs for real (in-process training, evaluation, a real MLflow sqlite store,
real checkpoints on disk); only Tune's session functions are replaced by a recorder, since
the subject here is the trial's side of the contract: every report carries the objective,
the scheduler's metric and its time attribute (``step``) — Tune's strict metric check
aborts the whole study otherwise. The five cases of the issue, plus a restore past an
early stop; each restored case is built from the fresh trial's own directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hescape.study.tune_reports import FINAL, REPORT_KIND, RESUMED, TRAIN, MissingMetricError

MAX_STEPS, EVAL_EVERY = 6, 3


class Recorder:
    """Stands in for ``ray.tune.report`` / ``get_context`` / ``get_checkpoint``."""

    def __init__(self) -> None:
        self.reports: list[dict] = []
        self.trial_id = ""

    def report(self, metrics: dict, *, checkpoint=None) -> None:  # noqa: ARG002
        self.reports.append(dict(metrics))

    def get_context(self):
        return self

    def get_trial_id(self) -> str:
        return self.trial_id

    def get_checkpoint(self):
        return None


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny TPE + ASHA study config, its MLflow parent run and the trial runner."""
    import ray.tune

    from hescape.config import StudyConfig
    from hescape.data import tiny_dataset
    from hescape.study import lineage
    from hescape.study.trial import SharedContext
    from hescape.study.tune_reports import required_metrics

    root = tmp_path_factory.mktemp("reports")
    data = tiny_dataset(root / "data", seed=0)
    cfg = StudyConfig.model_validate({
        "name": "reports", "storage_dir": str(root / "store"), "data": {"path": str(data)},
        "model": {"image": {"name": "tiny_cnn", "pretrained": False, "mode": "finetune"},
                  "gene": {"name": "mlp", "hidden_dim": 32, "n_layers": 1}, "embed_dim": 16},
        "train": {"batch_size": 32, "max_steps": MAX_STEPS, "eval_every": EVAL_EVERY,
                  "warmup_steps": 1, "keep_checkpoints": 5},
        "eval": {"probe_pca": 8, "mixing_subsample": 200, "inbatch_repeats": 2,
                 "inbatch_size": 16, "plots": False, "baselines": False},
        "sweep": {"searcher": "tpe", "scheduler": "asha", "num_samples": 2,
                  "params": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3}}},
    })
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ref = lineage.open_parent(uri, "reports", "reports", resume=False, tags={})
    shared = SharedContext(cfg.model_dump(), ref, str(root / "study"), "fp",
                           {"train": [], "val": [], "test": []}, "abc")
    recorder = Recorder()
    patch = pytest.MonkeyPatch()
    for name in ("report", "get_context", "get_checkpoint"):
        patch.setattr(ray.tune, name, getattr(recorder, name))

    def run(trial_id: str) -> list[dict]:
        from hescape.study.trial import run_trial

        recorder.trial_id, recorder.reports = trial_id, []
        run_trial({"train.lr": 2e-3}, shared)
        return recorder.reports

    yield cfg, ref, Path(shared.study_dir) / "trials", run, required_metrics(cfg)
    patch.undo()


def _kinds(reports: list[dict]) -> list[tuple[str, int]]:
    return [(r[REPORT_KIND], int(r["step"])) for r in reports]


def _assert_complete(reports: list[dict], required: list[str]) -> None:
    assert reports and "val/r5_img2gene" in required and "step" in required
    for r in reports:
        missing = [k for k in required if k not in r]
        assert not missing, (r.get(REPORT_KIND), missing)
    assert reports[-1][REPORT_KIND] == FINAL and reports[-1]["done"] == 1.0
    assert "test/r5_img2gene" in reports[-1]


def _copy_trial(trials: Path, src: str, dst: str, *, drop: tuple[str, ...]) -> None:
    shutil.copytree(trials / src, trials / dst)
    for rel in drop:
        shutil.rmtree(trials / dst / rel)


@pytest.fixture(scope="module")
def fresh(study):
    cfg, ref, trials, run, required = study
    reports = run("fresh")
    return reports


def test_fresh_trial_reports_carry_the_objective(study, fresh):
    required = study[4]
    _assert_complete(fresh, required)
    assert _kinds(fresh) == [(TRAIN, 3), (TRAIN, 6), (FINAL, 6)]


def test_restore_mid_training_reports_where_it_stands_then_trains_on(study, fresh):
    cfg, ref, trials, run, required = study
    _copy_trial(trials, "fresh", "mid", drop=("train/checkpoint_0000006", "eval"))
    reports = run("mid")
    _assert_complete(reports, required)
    assert _kinds(reports) == [(RESUMED, 3), (TRAIN, 6), (FINAL, 6)]
    # resumed deterministically: the same validation figures as the uninterrupted trial
    assert reports[1]["val/r5_img2gene"] == pytest.approx(fresh[1]["val/r5_img2gene"])


def test_restore_at_the_final_step_goes_straight_to_evaluation(study, fresh):
    """The state of issue 15: checkpoint at max_steps, nothing evaluated. Its old final
    report carried only test metrics and aborted the study on ASHA's metric check."""
    cfg, ref, trials, run, required = study
    _copy_trial(trials, "fresh", "last", drop=("eval",))
    reports = run("last")
    _assert_complete(reports, required)
    assert _kinds(reports) == [(RESUMED, 6), (FINAL, 6)]
    assert reports[-1]["test/r5_img2gene"] == pytest.approx(fresh[-1]["test/r5_img2gene"])


def test_restore_past_early_stop_does_not_train_on(study):
    cfg, ref, trials, run, required = study
    _copy_trial(trials, "fresh", "stopped", drop=("train/checkpoint_0000006", "eval"))
    meta_path = trials / "stopped" / "train" / "checkpoint_0000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"]["early_stopped"] = 1.0
    meta_path.write_text(json.dumps(meta))
    reports = run("stopped")
    _assert_complete(reports, required)
    assert _kinds(reports) == [(RESUMED, 3), (FINAL, 3)]


def test_restore_after_evaluation_was_logged_does_not_evaluate_again(study, fresh, monkeypatch):
    from hescape.study import evaluation

    cfg, ref, trials, run, required = study
    _copy_trial(trials, "fresh", "logged", drop=())
    calls = []
    monkeypatch.setattr(evaluation, "evaluate_trial", lambda *a, **k: calls.append(a))
    reports = run("logged")
    _assert_complete(reports, required)
    assert _kinds(reports) == [(RESUMED, 6), (FINAL, 6)] and not calls
    assert reports[-1]["test/r5_img2gene"] == fresh[-1]["test/r5_img2gene"]


def test_trial_finished_in_mlflow_resends_its_result(study, fresh):
    from hescape.study import lineage

    cfg, ref, trials, run, required = study
    assert lineage.find_child(ref, "fresh").info.status == "FINISHED"
    reports = run("fresh")
    _assert_complete(reports, required)
    assert _kinds(reports) == [(FINAL, 6)]
    for key in ("val/r5_img2gene", "test/r5_img2gene", "step"):
        assert reports[0][key] == pytest.approx(fresh[-1][key])


def test_a_report_without_the_objective_fails_the_trial_not_the_study():
    from hescape.study.tune_reports import checked

    with pytest.raises(MissingMetricError, match=r"val/r5_img2gene"):
        checked({"step": 3.0, "test/r5_img2gene": 0.1}, ["val/r5_img2gene", "step"], kind=TRAIN)
    assert checked({"val/r5_img2gene": 0.1}, ["val/r5_img2gene"], kind=TRAIN)[REPORT_KIND] == TRAIN


def test_an_error_pickled_under_the_old_module_path_still_loads():
    """A study run before ``reporting`` became ``tune_reports`` holds Tune error files that
    pickled ``hescape.study.reporting.MissingMetricError``; a resume unpickles them."""
    import pickle

    new = pickle.dumps(MissingMetricError("val/loss missing"), protocol=0)
    assert b"hescape.study.tune_reports" in new
    old = new.replace(b"hescape.study.tune_reports", b"hescape.study.reporting")
    got = pickle.loads(old)
    assert isinstance(got, MissingMetricError) and str(got) == "val/loss missing"
