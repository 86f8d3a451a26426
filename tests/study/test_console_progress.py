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
