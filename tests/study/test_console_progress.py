"""The driver's console: one concise line per trial event (issue 14), from Tune's callback
hooks, on real Tune ``Trial`` objects. A study's own console output is checked end to end in
``tests/reliability/test_failed_trial.py`` (a failed trial) and the study tests."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("ray.tune")


def _trial(number: int, trial_id: str, config: dict):
    from ray.tune.experiment import Trial

    return Trial("run_trial", config=config, trial_id=trial_id, stub=True,
                 experiment_tag=f"{number}_loss_name=clip")


def _progress():
    from hescape.study.callbacks import ConsoleProgress

    out = io.StringIO()
    return ConsoleProgress("search", ["val/r5_img2gene"], total=12, out=out), out


def _result(kind: str, step: int, value: float, **extra) -> dict:
    return {"report_kind": kind, "step": step, "val/r5_img2gene": value, "val/loss": 3.2,
            "train/loss": 3.1, **extra}


def test_one_line_per_event_finished_trial():
    progress, out = _progress()
    trial = _trial(3, "1a2b3c4d", {"loss.name": "clip", "train.lr": 0.0020123})
    progress.on_trial_start(0, [], trial)
    for step, value in ((50, 0.0812), (100, 0.0933)):
        result = _result("train", step, value)
        progress.on_trial_result(0, [], trial, result)
        trial.update_last_result(result)
    final = _result("final", 100, 0.0933, **{"test/r5_img2gene": 0.0456, "done": 1.0})
    progress.on_trial_result(0, [], trial, final)  # the closing report: no step line
    trial.update_last_result(final)
    progress.on_trial_complete(0, [], trial)
    assert out.getvalue().splitlines() == [
        "[search 3/12 1a2b3c4d] started: loss.name=clip train.lr=0.002012",
        "[search 3/12 1a2b3c4d] step 50: val/r5_img2gene 0.0812",
        "[search 3/12 1a2b3c4d] step 100: val/r5_img2gene 0.0933",
        "[search 3/12 1a2b3c4d] finished at step 100: val/r5_img2gene 0.0933, "
        "test/r5_img2gene 0.0456",
    ]


def test_asha_stop_resume_and_failure_lines(tmp_path):
    from hescape.study.callbacks import _error_line

    progress, out = _progress()
    trial = _trial(5, "5e6f7a8b", {"point": {"loss.name": "siglip"}})  # grid points nest
    progress.on_trial_start(0, [], trial)
    resumed = _result("resumed", 50, 0.05)
    progress.on_trial_result(0, [], trial, resumed)
    trial.update_last_result(resumed)
    stopped = _result("train", 100, 0.04, done=True)  # Tune marks the result ASHA stopped on
    progress.on_trial_result(0, [], trial, stopped)
    trial.update_last_result(stopped)
    progress.on_trial_complete(0, [], trial)
    progress.on_trial_error(0, [], _trial(6, "9c0d1e2f", {}))
    assert out.getvalue().splitlines() == [
        "[search 5/12 5e6f7a8b] started: loss.name=siglip",
        "[search 5/12 5e6f7a8b] resumed at step 50: val/r5_img2gene 0.05",
        "[search 5/12 5e6f7a8b] stopped by ASHA at step 100: val/r5_img2gene 0.04",
        "[search 6/12 9c0d1e2f] failed: see the Tune error file",
    ]
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\n"
                     "TrainingError: non-finite loss at step 3\n\n")
    assert _error_line(str(error)) == "TrainingError: non-finite loss at step 3"


def test_grid_trials_number_1_to_n_of_the_phase():
    """A grid of 4 trials printed [search 0/8]..[3/8] (Tune's 0-based grid tags and the
    unused num_samples); it reads 1/4..4/4 (issue 24.5)."""
    from hescape.study.callbacks import ConsoleProgress

    out = io.StringIO()
    progress = ConsoleProgress("search", ["val/r5_img2gene"], total=4, out=out, first_tag=0)
    for i in range(4):
        progress.on_trial_start(0, [], _trial(i, f"t{i}", {"point": {"loss.name": "clip"}}))
    assert [ln.split("]")[0] for ln in out.getvalue().splitlines()] == [
        f"[search {i}/4 t{i - 1}" for i in range(1, 5)]


def test_grid_phase_total_is_its_point_count(tmp_path):
    from hescape.config import load_config
    from hescape.study.tuner import _run_config

    cfg = load_config("experiments/tiny.yaml", ["sweep.num_samples=8"])
    shared = type("S", (), {"base": cfg.model_dump(), "study_dir": str(tmp_path),
                            "lineage": None, "verbose": False})()
    progress = next(c for c in _run_config(cfg, shared, "search").callbacks
                    if type(c).__name__ == "ConsoleProgress")
    assert (progress.total, progress.first_tag) == (2, 0)  # 2 losses, not num_samples=8


_WARN = """
import sys, warnings
from hescape.study.console import warn_once
warn_once(sys.argv[1])
for i in range(3):
    warnings.warn(f"mutation probe underpowered: {i} donors", UserWarning)
    warnings.warn_explicit("umap n_jobs overridden", UserWarning, "umap.py", 10 + i)
"""


def test_each_distinct_warning_once_per_study_across_processes(tmp_path):
    """Two trial processes warn the same things: the console shows each warning site once,
    the study's log file keeps every occurrence."""
    import subprocess
    import sys

    from hescape.study.console import warnings_log

    err = ""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-W", "always", "-c", _WARN, str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        err += proc.stderr
    shown = [ln for ln in err.splitlines() if ln.startswith("[warning]")]
    # one site for the f-string warning, three explicit sites (lines 10, 11, 12)
    assert len(shown) == 4, err
    assert sum("mutation probe underpowered" in ln for ln in shown) == 1
    logged = warnings_log(tmp_path).read_text().splitlines()
    assert len(logged) == 12  # 2 processes x 3 rounds x 2 warnings


def test_step_lines_for_long_silent_work():
    from hescape.study.console import step

    out = io.StringIO()
    with step("shared preprocessing", out=out):
        pass
    first, last = out.getvalue().splitlines()
    assert first == "[study] shared preprocessing ..."
    assert last.startswith("[study] shared preprocessing: done in ")


@pytest.mark.parametrize(("scheduler", "name"), [("asha", "ASHA"), ("moasha", "MO-ASHA")])
def test_a_stopped_trial_names_the_scheduler_in_use(tmp_path, scheduler, name):
    """MO-ASHA's stops read "stopped by MO-ASHA" on the console and in the child run's
    ``hescape.stopped_by`` tag (a real sqlite MLflow store), not "ASHA"; the run ends FINISHED
    with the outcome "stopped early", so the dashboard does not show it as a failure."""
    from mlflow.tracking import MlflowClient

    from hescape.study import lineage
    from hescape.study.callbacks import ConsoleProgress, MlflowCloser

    out = io.StringIO()
    progress = ConsoleProgress("search", ["val/r5_img2gene"], total=12, out=out,
                               scheduler=scheduler)
    ref = lineage.open_parent(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "s", resume=False,
                              tags={})
    trial = _trial(5, "5e6f7a8b", {})
    run_id = lineage.open_child(ref, trial.trial_id, existing=None, name="t", tags={})
    trial.update_last_result(_result("train", 100, 0.04, done=True))
    progress.on_trial_complete(0, [], trial)
    MlflowCloser(ref, scheduler).on_trial_complete(0, [], trial)
    assert out.getvalue().splitlines() == [
        f"[search 5/12 5e6f7a8b] stopped by {name} at step 100: val/r5_img2gene 0.04"]
    run = MlflowClient(ref.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["hescape.outcome"] == "stopped early"
    assert run.data.tags["hescape.stopped_by"] == f"{name} at step 100"
    assert "hescape.error" not in run.data.tags
    from hescape.study.results import trial_table

    (row,) = trial_table(ref)
    assert row["status"] == "KILLED" and row["outcome"] == "stopped early"  # not evaluated
