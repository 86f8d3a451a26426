"""A study submitted with `ray job submit` to a real local cluster; a trial spanning two nodes."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.reliability.ray_nodes import (
    BIN,
    cli_env,
    free_port,
    node_ports,
    start_cluster,
    start_node,
    stop_nodes,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    """`ray start --head` on 127.0.0.1 with its own temp dir; stopped afterwards by PID."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: unix socket path limit
    port, dash = free_port(), free_port()
    # every port free-picked: a fixed default (agent 52365, client 10001) held by another Ray
    # on this machine leaves the job agent down and `ray job submit` waiting forever
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", *node_ports()]
    try:
        out = start_node(cmd, temp_dir, cli_env())
        assert out.returncode == 0, out.stderr[-3000:]
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}",
               "temp_dir": temp_dir}
    finally:
        stop_nodes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_study(ray_head, tmp_path):
    storage = tmp_path / "runs"
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={ray_head['dashboard']}",
           "--working-dir", str(ROOT), "--",
           "python", "study/run.py", "experiments/tiny.yaml", f"--set=storage_dir={storage}",
           "--set=sweep.params.loss.name.values=[clip]"]
    for _ in range(90):  # the job agent comes up a few seconds after `ray start`
        out = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                             timeout=420)
        if "No available agent" not in out.stderr + out.stdout:
            break
        time.sleep(2)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "succeeded" in out.stdout.lower()
    assert (storage / "tiny" / "report" / "report.md").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FINISHED", "FINISHED"]  # parent + one trial


def test_two_worker_trial_spans_two_nodes(tmp_path):
    """Two 1-CPU nodes on this machine; a 2-worker (1 CPU each) trial must use both."""
    import ray

    from hescape.config import load_config
    from hescape.study.driver import run_study

    cluster = start_cluster(1, [1])
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = load_config(ROOT / "experiments/tiny.yaml", [
            f"storage_dir={tmp_path}", "train.num_workers=2", "train.in_process=false",
            "sweep.params.loss.name.values=[clip]",
        ])
        result = run_study(cfg, source="tiny.yaml", progress=False)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(result.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                  "tags.`hescape.role` = 'trial'")
        # 2 workers x 1 CPU on two 1-CPU nodes: the trial can only have run across both
        assert [r.info.status for r in runs] == ["FINISHED"]
        assert "test/r5_img2gene" in runs[0].data.metrics
    finally:
        ray.shutdown()
        cluster.shutdown()


def _ray_job(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _submit(ray_head, storage: Path, job_id: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["submit", f"--address={ray_head['dashboard']}", f"--submission-id={job_id}",
           "--no-wait", "--runtime-env", "infra/runtime_env.yaml", "--working-dir", str(ROOT),
           "--", "python", "study/run.py", "experiments/tiny.yaml",
           f"--set=storage_dir={storage}", "--set=sweep.params.loss.name.values=[clip]",
           # long enough that the tiny trial is still training when `ray job stop` lands
           # (600 steps finished before the stop on a quiet machine)
           "--set=train.max_steps=3000", "--set=train.eval_every=50", *extra]
    for _ in range(90):  # the job agent comes up a few seconds after `ray start`
        out = _ray_job(*cmd, timeout=300)
        if "No available agent" not in out.stderr + out.stdout:
            return out
        time.sleep(2)
    return out


def _wait_for(ray_head, job_id: str, predicate, timeout: float) -> str:
    """The job's log once ``predicate(log, status)`` holds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    log = status = ""
    while time.monotonic() < deadline:
        status = _ray_job("status", f"--address={ray_head['dashboard']}", job_id).stdout
        log = _ray_job("logs", f"--address={ray_head['dashboard']}", job_id).stdout
        if predicate(log, status):
            return log
        time.sleep(3)
    raise AssertionError(f"timed out; status: {status[-500:]}\nlog:\n{log[-3000:]}")


CRASH_MARKS = ("SIGABRT", "Aborted at", "*** ", "Check failure stack trace", "C++ stack")


@pytest.mark.parametrize("workers", [
    pytest.param([], id="in-process-trial"),
    pytest.param(["--set=train.num_workers=2", "--set=train.in_process=false"],
                 id="ray-train-workers"),
])
def test_ray_job_stop_ends_the_study_cleanly_and_resume_finishes_it(ray_head, tmp_path, workers):
    """`ray job stop` mid-training: the job reads STOPPED, its log holds the driver's own
    message and no crash dump (no SIGABRT, no C++ stack), and the same submission with
    ``--resume`` completes the study; for a trial trained in-process and one trained by a
    Ray Train worker group (two torch.distributed workers)."""
    storage = tmp_path / "runs"
    out = _submit(ray_head, storage, "study-stop", *workers)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    _wait_for(ray_head, "study-stop", lambda log, _: "step 50:" in log, timeout=600)
    stop = _ray_job("stop", f"--address={ray_head['dashboard']}", "study-stop", timeout=180)
    assert stop.returncode == 0, (stop.stdout[-2000:], stop.stderr[-2000:])
    _wait_for(ray_head, "study-stop", lambda _, status: "was stopped" in status, timeout=120)
    time.sleep(5)  # anything a dying worker would still write to the job log
    log = _ray_job("logs", f"--address={ray_head['dashboard']}", "study-stop").stdout
    crash = [line for line in log.splitlines() if any(m in line for m in CRASH_MARKS)]
    assert not crash, "crash dump in the job log:\n" + "\n".join(crash[:20])
    assert "interrupted: run again with --resume" in log, log[-3000:]

    out = _submit(ray_head, storage, "study-resume", *workers, "--resume")
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    done = ("succeeded", "failed", "was stopped")
    log = _wait_for(ray_head, "study-resume",
                    lambda _, status: any(s in status.lower() for s in done), timeout=900)
    status = _ray_job("status", f"--address={ray_head['dashboard']}", "study-resume").stdout
    assert "succeeded" in status.lower(), (status, log[-3000:])
    assert (storage / "tiny" / "report" / "report.md").exists()
