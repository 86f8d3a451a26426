"""A trial whose loss turns non-finite fails alone: FAILED in MLflow with the reason, the other
trial FINISHED, the study completes and its parent run is FINISHED."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _study(tmp_path: Path, *extra: str, env: dict[str, str] | None = None):
    """The tiny study with two trials, lr 0.001 and 1e30 (its loss turns non-finite), run as
    a user runs it; (its output, the MLflow client, the parent run id, the runs by lr)."""
    from mlflow.tracking import MlflowClient

    from hescape.study.lineage import LineageRef, child_runs, find_parent

    args = [sys.executable, str(ROOT / "study/run.py"), str(ROOT / "experiments/tiny.yaml"),
            f"--set=storage_dir={tmp_path}", "--set=sweep.params.loss.name.values=[clip]",
            "--set=sweep.params.train.lr={type: choice, values: [0.001, 1.0e30]}",
            "--set=train.max_steps=12", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    parent = find_parent(client, exp.experiment_id, "tiny")
    runs = child_runs(LineageRef(uri, exp.experiment_id, parent, "tiny"))
    by_lr = {float(r.data.params["train.lr"]): r for r in runs}
    assert sorted(by_lr) == [0.001, 1.0e30] and len(runs) == 2  # one run per trial
    return out, client, parent, by_lr


def test_nan_trial_fails_and_study_continues(tmp_path):
    out, client, parent, by_lr = _study(tmp_path, "--set=sweep.max_concurrent=1")
    bad, good = by_lr[1.0e30], by_lr[0.001]
    assert bad.info.status == "FAILED"
    assert "non-finite loss at step" in bad.data.tags["hescape.error"]
    assert bad.data.metrics.get("step", 0) < 12  # stopped early, budget not wasted
    assert good.info.status == "FINISHED" and "test/r5_img2gene" in good.data.metrics
    assert client.get_run(parent).info.status == "FINISHED"
    # the console: one line per trial event, the failure with its reason, no Tune tables
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[search ")]
    assert any("failed: " in ln and "non-finite loss at step" in ln for ln in lines), lines
    assert any("finished at step 12: val/r5_img2gene" in ln for ln in lines), lines
    assert len({ln.split("]")[0] for ln in lines if "started: " in ln}) == 2  # (+ 1 retry)
    assert "Trial status" not in out.stdout and "== Status ==" not in out.stdout


def test_a_trial_failing_beside_a_running_one_fails_alone(tmp_path):
    """Packed trials on the CPU: two trials of one study run at once (1 CPU each on a
    2-CPU local Ray; ``train.gpus_per_trial`` < 1 packs them on one GPU the same way,
    GPU-only), one raises (non-finite loss) while the other trains: the other FINISHED with
    its evaluation, the failed one FAILED with the reason."""
    out, client, parent, by_lr = _study(
        tmp_path, "--set=sweep.max_concurrent=2", "--set=train.cpus_per_worker=1",
        env={"RAY_ADDRESS": "local"})  # a Ray of its own: 2 CPUs here, 2 trials at once
    bad, good = by_lr[1.0e30], by_lr[0.001]
    # they ran side by side: each started before the other ended
    assert bad.info.start_time < good.info.end_time and good.info.start_time < bad.info.end_time
    assert bad.info.status == "FAILED"
    assert "non-finite loss at step" in bad.data.tags["hescape.error"]
    assert good.info.status == "FINISHED" and "test/r5_img2gene" in good.data.metrics
    steps = [m.step for m in client.get_metric_history(good.info.run_id, "val/loss")]
    assert max(steps) == 12 and len(steps) == len(set(steps))
    assert client.get_run(parent).info.status == "FINISHED"
