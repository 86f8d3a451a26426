"""A node that joins a running study (``ray start --address``, as a user adds a machine)
gets the trials that wait for room, on a real multi-node Ray cluster on this machine (see
``test_node_loss.py`` for the cluster and the hold hook)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability import test_node_loss as nl

pytestmark = pytest.mark.slow


def test_node_that_joins_mid_study_gets_the_pending_trial(tmp_path):
    """One 1-CPU worker node, two trials, ``sweep.max_concurrent=2``: the second trial waits
    PENDING while the first holds its node; a node joined then with ``ray start --address``
    (as a user adds a machine) runs it: its MLflow run names the new node."""
    import shutil
    import tempfile

    import ray

    from tests.reliability.ray_nodes import BIN, cli_env, node_ports, start_node, stop_nodes

    env = nl._hold_env(tmp_path, "report:3")
    marker, release = Path(env["HESCAPE_FAULT_MARKER"]), Path(env["HESCAPE_FAULT_RELEASE"])
    join_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket path limit

    def watcher(cluster, seen):
        from mlflow.tracking import MlflowClient

        try:
            held_node, _, _ = nl._read_marker(marker)
            seen["held"] = held_node
            before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            out = start_node(
                [str(BIN / "ray"), "start", f"--address={cluster.address}", "--num-cpus=1",
                 f"--temp-dir={join_tmp}", "--disable-usage-stats", *node_ports()],
                join_tmp, cli_env(token=False))
            assert out.returncode == 0, out.stderr[-2000:]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "joined" not in seen:
                new = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
                if new:
                    seen["joined"] = new.pop()
                time.sleep(0.5)
            client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
            exp = client.get_experiment_by_name("tiny")
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:  # the pending trial starts (on the new node)
                runs = client.search_runs([exp.experiment_id], "tags.`hescape.role` = 'trial'")
                if len(runs) == 2 and all("hescape.node_id" in r.data.tags for r in runs):
                    break
                time.sleep(1)
        finally:
            release.touch()

    try:
        _, seen, client, runs = nl._study(tmp_path, env, 1, watcher, "sweep.max_concurrent=2")
    finally:
        stop_nodes(join_tmp)
        shutil.rmtree(join_tmp, ignore_errors=True)
    assert "error" not in seen, seen
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    by_node = sorted(r.data.tags["hescape.node_id"] for r in runs)
    assert by_node == sorted([seen["held"], seen["joined"]])  # one trial on each node
    for r in runs:
        assert len(r.data.tags["hescape.nodes"].split(",")) == 1  # never retried
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")]
        assert sorted(steps) == [3, 6, 9], steps
