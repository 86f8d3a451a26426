"""A worker node lost mid-study, on a real multi-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: a head with no CPU, so every trial runs on a worker node,
and 1-CPU worker nodes). A node that joins a study: ``test_node_join.py``.

The moment is deterministic: ``HESCAPE_FAULT_HOLD_AT`` (``hescape.train.faults.maybe_hold``)
stops the first trial to reach the named instant, once, and writes its pid and Ray node id
to a marker file; the test then removes that node (``Cluster.remove_node``: every process of
the node SIGKILLed, as when a machine dies). Tune's ``FailureConfig(max_failures=
train.max_failures)`` retries the trial on a surviving node, under the same trial id; the
retry reattaches to its MLflow run and resumes from its last checkpoint on the shared
storage.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.ray_nodes import start_cluster

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS, EVAL_EVERY = 9, 3
pytestmark = pytest.mark.slow


def _hold_env(tmp_path: Path, hold: str) -> dict[str, str]:
    from hescape.train import faults

    return {faults.HOLD_AT: hold, faults.MARKER: str(tmp_path / "held"),
            faults.RELEASE: str(tmp_path / "release"), "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1", faults.HOLD_S: "240"}


def _read_marker(marker: Path, timeout: float = 300) -> tuple[str, str, str]:
    """(node id, point, step) of the held trial, once it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.is_file():
            parts = marker.read_text().split()
            if len(parts) == 4:
                return parts[1], parts[2], parts[3]
        time.sleep(0.2)
    raise TimeoutError(f"no trial held within {timeout:.0f} s ({marker} not written)")


def _watch(target, seen: dict) -> threading.Thread:
    def run():
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test's assertions
            seen["error"] = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _study(tmp_path: Path, env: dict[str, str], workers: int, watcher, *extra: str):
    """Run the tiny study (2 trials: clip, siglip) on a head (0 CPU) + ``workers`` 1-CPU
    nodes while ``watcher(cluster, seen)`` runs beside it; (result, seen, trial runs)."""
    import ray
    from mlflow.tracking import MlflowClient

    from hescape.config import load_config
    from hescape.study.driver import run_study

    cluster = start_cluster(0, [1] * workers)
    seen: dict = {}
    try:
        # the trial processes get the fault switches; this process (the driver) does not
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        cluster.wait_for_nodes()
        thread = _watch(lambda: watcher(cluster, seen), seen)
        cfg = load_config(ROOT / "experiments/tiny.yaml", [
            f"storage_dir={tmp_path / 'store'}", f"train.max_steps={MAX_STEPS}",
            f"train.eval_every={EVAL_EVERY}", "train.max_failures=1", *extra])
        result = run_study(cfg, source="tiny.yaml", progress=False)
        thread.join(timeout=60)
    finally:
        Path(env["HESCAPE_FAULT_RELEASE"]).touch()  # nothing may hold on past the test
        ray.shutdown()
        cluster.shutdown()
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`hescape.role` = 'trial'")
    return result, seen, client, runs


def _remove_held_node(env: dict[str, str]):
    def watcher(cluster, seen):
        node_id, point, step = _read_marker(Path(env["HESCAPE_FAULT_MARKER"]))
        node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
        cluster.remove_node(node, allow_graceful=False)  # SIGKILL: the machine is gone
        seen.update(node_id=node_id, point=point, step=step)
    return watcher


def _assert_study_survived(client, runs, removed: str) -> object:
    """Two trials, one FINISHED run each, none RUNNING; the held one reattached after the
    retry on another node; every run's val/loss history is 3, 6, 9, each step once."""
    assert len(runs) == 2, [r.data.tags.get("ray.trial_id") for r in runs]
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags["ray.trial_id"] for r in runs}) == 2  # one run per trial
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    held = [r for r in runs if removed in r.data.tags["hescape.nodes"].split(",")]
    assert len(held) == 1, [r.data.tags["hescape.nodes"] for r in runs]
    run = held[0]
    nodes = run.data.tags["hescape.nodes"].split(",")
    assert nodes[0] == removed and len(nodes) == 2 and nodes[1] != removed  # retried elsewhere
    assert run.data.tags["hescape.node_id"] == nodes[1]
    assert run.data.tags.get("hescape.reattached") == "true"
    assert "hescape.error" not in run.data.tags
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")]
        assert sorted(steps) == [3, 6, 9] and Counter(steps) == {3: 1, 6: 1, 9: 1}, steps
        tests = client.get_metric_history(r.info.run_id, "test/r5_img2gene")
        assert len(tests) == 1, tests  # evaluated and logged once
    return run


def test_node_lost_while_a_trial_trains_resumes_from_its_checkpoint(tmp_path, capsys):
    """The node of the first trial to report step 3 dies (right after that report reached
    MLflow and Tune): the trial resumes at step 3 on the surviving node, and trains 6, 9."""
    env = _hold_env(tmp_path, "report:3")
    result, seen, client, runs = _study(tmp_path, env, 2, _remove_held_node(env))
    assert "error" not in seen, seen
    assert seen["point"] == "report" and seen["step"] == "3"
    run = _assert_study_survived(client, runs, seen["node_id"])
    out = capsys.readouterr().out
    assert "resumed at step 3" in out, out[-3000:]  # from the checkpoint, not from step 0
    assert (result.study_dir / "report" / "report.md").exists()
    assert run.data.metrics["step"] == MAX_STEPS


def test_node_lost_while_a_trial_evaluates_evaluates_again_once(tmp_path, capsys):
    """The node dies with the evaluation computed but not logged: the retry finds training
    done (step 9), evaluates again on the surviving node and logs the evaluation once."""
    env = _hold_env(tmp_path, "evaluating")
    result, seen, client, runs = _study(tmp_path, env, 2, _remove_held_node(env))
    assert "error" not in seen, seen
    assert seen["point"] == "evaluating"
    _assert_study_survived(client, runs, seen["node_id"])
    out = capsys.readouterr().out
    assert f"resumed at step {MAX_STEPS}" in out, out[-3000:]  # no training again
    assert (result.study_dir / "report" / "report.md").exists()


def test_hold_hook_is_inert_unless_asked_holds_once_and_releases(tmp_path, monkeypatch):
    """The hold alone (no Ray): unset or another point is a no-op; the first matching call
    writes the marker and returns when the release file appears; later calls pass."""
    from hescape.train import faults

    for key in (faults.HOLD_AT, faults.MARKER, faults.RELEASE, faults.HOLD_S):
        monkeypatch.delenv(key, raising=False)
    faults.maybe_hold("report", step=3)  # unset: nothing
    monkeypatch.setenv(faults.HOLD_AT, "report:3")
    with pytest.raises(RuntimeError, match=faults.MARKER):
        faults.maybe_hold("report", step=3)
    marker, release = tmp_path / "held", tmp_path / "release"
    monkeypatch.setenv(faults.MARKER, str(marker))
    monkeypatch.setenv(faults.RELEASE, str(release))
    monkeypatch.setenv(faults.HOLD_S, "60")  # a broken once-guard holds 60 s, not forever
    faults.maybe_hold("report", step=2)  # before step 3
    faults.maybe_hold("evaluating")  # another point
    assert not marker.exists()
    threading.Timer(1.0, release.touch).start()
    faults.maybe_hold("report", step=3)  # holds until the release file exists
    assert marker.read_text().split()[2:] == ["report", "3"] and release.exists()
    release.unlink()
    faults.maybe_hold("report", step=6)  # once: the marker is there, no hold
