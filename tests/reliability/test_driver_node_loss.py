"""The study driver's node dies under `ray job submit`.

A two-node cluster started with the CLI on this machine (``ray start --head`` and ``ray start
--address``, each with its own ``--temp-dir``, token auth), the second node carrying a custom
resource ``hescape_driver`` that only it has. The study is submitted with
``--entrypoint-resources '{"hescape_driver": 1}'``, so Ray places the job's driver on that
node. Once a trial holds at step 3 (``HESCAPE_FAULT_HOLD_AT``), every process of that node is
SIGKILLed (the machine is gone). The job must end FAILED with a message that says so, and the
same study submitted again with ``--resume`` (the driver now on the head) must complete it:
the same two trials, one FINISHED MLflow run each.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.reliability.ray_nodes import (
    BIN,
    cli_env,
    free_port,
    kill_node,
    node_ports,
    pids_under,
    start_node,
    stop_nodes,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
DRIVER_RESOURCE = "hescape_driver"


@pytest.fixture
def two_node_cluster():
    """A CLI-started head (1 CPU) and a second node (1 CPU + the driver resource), each with
    its own temp dir; every process of both stopped afterwards by PID."""
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: unix socket path limit
    node_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    port, dash = free_port(), free_port()
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--temp-dir={head_tmp}", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}", *node_ports()]
    node = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
            f"--resources={json.dumps({DRIVER_RESOURCE: 1})}", "--node-ip-address=127.0.0.1",
            f"--temp-dir={node_tmp}", "--disable-usage-stats", *node_ports()]
    try:
        for cmd, temp_dir in ((head, head_tmp), (node, node_tmp)):
            out = start_node(cmd, temp_dir, cli_env())
            assert out.returncode == 0, (cmd, out.stderr[-3000:])
        yield {"dashboard": f"http://127.0.0.1:{dash}", "node_tmp": node_tmp}
    finally:
        stop_nodes(head_tmp, node_tmp)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node_tmp, ignore_errors=True)


def _ray_job(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def _runtime_env(tmp_path: Path, extra_env: dict[str, str]) -> Path:
    """infra/runtime_env.yaml with the fault switches added (they reach the job's driver and
    every trial process it starts)."""
    env = yaml.safe_load((ROOT / "infra/runtime_env.yaml").read_text())
    env["working_dir"] = str(ROOT)
    env["env_vars"] = {**env.get("env_vars", {}), **extra_env}
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


def _submit(cluster, job_id: str, runtime_env: Path, storage: Path, *, options=(),
            study_args=()) -> subprocess.CompletedProcess:
    cmd = ["submit", f"--address={cluster['dashboard']}", f"--submission-id={job_id}",
           "--no-wait", "--runtime-env", str(runtime_env), *options, "--",
           "python", "study/run.py", "experiments/tiny.yaml", f"--set=storage_dir={storage}",
           "--set=train.max_steps=9", "--set=train.eval_every=3", *study_args]
    for _ in range(90):  # the job agent comes up a few seconds after `ray start`
        out = _ray_job(*cmd, timeout=300)
        if "No available agent" not in out.stderr + out.stdout:
            return out
        time.sleep(2)
    return out


def _status(cluster, job_id: str) -> str:
    return _ray_job("status", f"--address={cluster['dashboard']}", job_id).stdout


def _wait_status(cluster, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _status(cluster, job_id)
        if any(s in status.lower() for s in ("succeeded", "failed", "was stopped")):
            return status
        time.sleep(3)
    log = _ray_job("logs", f"--address={cluster['dashboard']}", job_id).stdout
    raise AssertionError(f"job {job_id} did not end; status: {status[-800:]}\nlog:\n{log[-3000:]}")


def test_driver_node_lost_job_fails_clearly_and_resume_completes(two_node_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from hescape.train import faults

    cluster, storage = two_node_cluster, tmp_path / "runs"
    marker = tmp_path / "held"
    env = _runtime_env(tmp_path, {faults.HOLD_AT: "report:3", faults.MARKER: str(marker),
                                  faults.HOLD_S: "300"})
    out = _submit(cluster, "study-a", env, storage,
                  options=[f"--entrypoint-resources={json.dumps({DRIVER_RESOURCE: 1})}"])
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    deadline = time.monotonic() + 300
    while not marker.is_file() and time.monotonic() < deadline:  # mid-study: a trial holds
        time.sleep(1)
    assert marker.is_file(), _ray_job("logs", f"--address={cluster['dashboard']}",
                                      "study-a").stdout[-3000:]
    # the driver runs on the second node: the only one with the custom resource
    node_pids = set(pids_under(cluster["node_tmp"]))
    assert node_pids
    import psutil

    drivers = [p for p in psutil.process_iter(["pid", "cmdline"])
               if "study/run.py" in " ".join(p.info["cmdline"] or [])]
    assert drivers, "no study driver process found"
    ancestry = {a.pid for d in drivers for a in d.parents()}
    assert ancestry & node_pids, "the job's driver is not a child of the second node's raylet"
    assert kill_node(cluster["node_tmp"])

    status = _wait_status(cluster, "study-a", timeout=300)
    assert "failed" in status.lower(), status
    # Ray's own words name the cause: the job's supervisor (the driver's parent) lost its node
    assert "Job supervisor actor died" in status and "node has died" in status, status
    print("status after the node loss:\n" + status)

    log = _ray_job("logs", f"--address={cluster['dashboard']}", "study-a").stdout

    # the same study again, with --resume; the driver anywhere (its old node is gone)
    out = _submit(cluster, "study-b", env, storage, study_args=["--resume"])
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    status = _wait_status(cluster, "study-b", timeout=420)
    log = _ray_job("logs", f"--address={cluster['dashboard']}", "study-b").stdout
    assert "succeeded" in status.lower(), (status, log[-3000:])
    assert (storage / "tiny" / "report" / "report.md").exists()
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`hescape.role` = 'trial'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags["ray.trial_id"] for r in runs}) == 2  # the same 2 trials, 1 run each
    parents = client.search_runs([exp.experiment_id], "tags.`hescape.role` = 'parent'")
    assert [p.info.status for p in parents] == ["FINISHED"]
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")]
        assert sorted(steps) == [3, 6, 9], steps
