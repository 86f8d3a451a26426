"""Vectorised head-only trials in a real study (local Ray, sqlite MLflow): each member is its
own Tune trial and MLflow run with the metrics an unbatched trial gets, and ASHA stops
members one by one."""

from __future__ import annotations

from pathlib import Path

import pytest

from hescape.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny.yaml"
pytestmark = pytest.mark.slow

HEAD_ONLY = ["model.image.mode=frozen", "train.max_steps=9", "train.eval_every=3",
             "sweep.params={train.lr: {type: choice, values: [0.001, 0.002, 0.004, 0.008]}}"]


def _children(storage: Path, study: str):
    from mlflow.tracking import MlflowClient

    from hescape.study.lineage import LineageRef, child_runs, find_parent

    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    parent = find_parent(client, exp.experiment_id, study)
    return client, child_runs(LineageRef(uri, exp.experiment_id, parent, study))


@pytest.fixture
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _by_lr(runs):
    return {r.data.params["train.lr"]: r for r in runs}


def test_stacked_trials_equal_unbatched_trials(tmp_path, ray_local):
    from hescape.study.driver import run_study

    plain = load_config(TINY, [f"storage_dir={tmp_path / 'plain'}", *HEAD_ONLY])
    stacked = load_config(TINY, [f"storage_dir={tmp_path / 'stacked'}", *HEAD_ONLY,
                                 "train.stack_size=4", "train.stack_wait_s=5"])
    run_study(plain, source="tiny", progress=False)
    run_study(stacked, source="tiny", progress=False)
    client, plain_runs = _children(tmp_path / "plain", "tiny")
    client_s, stacked_runs = _children(tmp_path / "stacked", "tiny")
    a, b = _by_lr(plain_runs), _by_lr(stacked_runs)
    assert sorted(a) == sorted(b) and len(b) == 4
    sizes = [r.data.metrics.get("sys/stack_size", 0) for r in b.values()]
    assert max(sizes) >= 2, sizes  # members really trained together
    assert "sys/stack_size" not in next(iter(a.values())).data.metrics
    for lr, run in b.items():
        assert run.info.status == "FINISHED", run.data.tags.get("hescape.error")
        assert run.data.tags["hescape.stacked"] == "true"
        assert a[lr].data.tags["hescape.stacked"] == "false"
        history = [m.step for m in client_s.get_metric_history(run.info.run_id, "val/loss")]
        assert sorted(history) == [3, 6, 9]  # its own per-step metrics, each step once
        for key, value in a[lr].data.metrics.items():
            if key.startswith(("val/", "test/", "train/loss")):
                assert run.data.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), \
                    (lr, key)
        arts = {x.path for x in client_s.list_artifacts(run.info.run_id, "eval")}
        assert "eval/per_donor.csv" in arts


def test_asha_stops_stacked_members_individually(tmp_path, ray_local):
    from hescape.study.driver import run_study

    cfg = load_config(TINY, [f"storage_dir={tmp_path}", *HEAD_ONLY, "train.stack_size=4",
                             "sweep.searcher=tpe", "sweep.scheduler=asha",
                             "sweep.num_samples=4", "sweep.grace_period=1",
                             "sweep.confirm.enabled=false",
                             "sweep.params={train.lr: {type: loguniform, low: 0.0001, "
                             "high: 0.01}}"])
    run_study(cfg, source="tiny", progress=False)
    client, runs = _children(tmp_path, "tiny")
    assert len(runs) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}  # a stop is not a failure
    outcomes = sorted(r.data.tags["hescape.outcome"] for r in runs)
    assert "completed" in outcomes and set(outcomes) <= {"completed", "stopped early"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert len(steps) == len(set(steps))
        if run.data.tags["hescape.outcome"] == "stopped early":  # nothing logged past the stop
            assert max(steps) < 9 and "test/r5_img2gene" not in run.data.metrics
        else:
            assert max(steps) == 9 and "test/r5_img2gene" in run.data.metrics


def test_stacking_refuses_trials_that_cannot_stack():
    from hescape.study.resources import trial_resources

    cfg = load_config(TINY, ["train.stack_size=4"])  # tiny.yaml fine-tunes its image encoder
    with pytest.raises(ConfigError, match="model.image.mode"):
        trial_resources(cfg)
    ok = load_config(TINY, [*HEAD_ONLY, "train.stack_size=4"])
    assert trial_resources(ok).trial == {"CPU": 0.25}


def test_an_idle_service_exits_and_a_late_joiner_is_sent_to_the_next(monkeypatch, tmp_path):
    """A service with no open member for ``idle_exit_s`` kills itself (each holds a dataset:
    a search that moved on to other stack keys must not keep them all); a member joining
    while it closes is told "closing"; a member whose final event is still unread, or one
    pending, keeps it alive."""
    import queue
    import threading
    import time

    import ray

    from hescape.study import stacking

    svc = stacking.StackService.__new__(stacking.StackService)  # the logic, without an actor
    svc.lock, svc.members, svc.pending = threading.Lock(), {}, []
    svc.size, svc.wait_s, svc.closing = 2, 0.0, False
    svc.idle_exit_s, svc.idle_since = 0.05, time.monotonic()
    svc.evaluator = type("E", (), {"shutdown": lambda self, wait: None})()
    killed = []
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart=True: killed.append(actor))
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: type("C", (), {"current_actor": "me"})())
    cfg = load_config(Path(__file__).parents[2] / "experiments" / "tiny.yaml",
                      [f"storage_dir={tmp_path}"])
    m = stacking._Member("t1", cfg, tmp_path, train=False)
    svc.members["t1"] = m
    m.events.put(("evaluated", {}, {}, None))
    time.sleep(0.1)
    assert not svc._idle_exit() and not killed  # its result is not fetched yet
    assert svc.next("t1", 0.1)[0] == "evaluated" and m.closed
    svc.idle_since = time.monotonic()
    assert not svc._idle_exit()  # idle, but not for long enough
    time.sleep(0.1)
    assert svc._idle_exit() and killed == ["me"] and svc.closing
    assert svc.join("t2", cfg.model_dump(), str(tmp_path), train=True) == "closing"
    assert "t2" not in svc.members and isinstance(m.events, queue.Queue)


def test_a_stacked_member_that_fails_fails_alone(tmp_path, monkeypatch):
    """In one stack of four trials, one member runs out of memory in its second training
    step (a ``torch.OutOfMemoryError`` for that member only: ``HESCAPE_FAULT_STACK_MEMBER_FAIL``;
    a real one needs a GPU) and another's validation raises at step 6: both trials are
    ERROR in Tune and FAILED in MLflow with the reason in ``hescape.error``; the other two
    finish with the metrics of their unbatched trials."""
    import json

    import ray

    from hescape.study.driver import run_study
    from hescape.train.faults import STACK_MEMBER_FAIL

    plain = load_config(TINY, [f"storage_dir={tmp_path / 'plain'}", *HEAD_ONLY])
    stacked = load_config(TINY, [f"storage_dir={tmp_path / 'stacked'}", *HEAD_ONLY,
                                 "train.stack_size=4", "train.stack_wait_s=5"])
    monkeypatch.setenv(STACK_MEMBER_FAIL,
                       "oom@2:train.lr=0.004;validation@6:train.lr=0.008")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_study(stacked, source="tiny", progress=False)
        monkeypatch.delenv(STACK_MEMBER_FAIL)
        run_study(plain, source="tiny", progress=False)  # not stacked: the hook is not on
    finally:
        ray.shutdown()
    _, plain_runs = _children(tmp_path / "plain", "tiny")
    client, stacked_runs = _children(tmp_path / "stacked", "tiny")
    a, b = _by_lr(plain_runs), _by_lr(stacked_runs)
    assert sorted(a) == sorted(b) and len(b) == 4
    assert all(r.info.status == "FINISHED" for r in a.values())
    assert max(r.data.metrics.get("sys/stack_size", 0) for r in b.values()) >= 2
    failed = {"0.004": ("OutOfMemoryError", []), "0.008": ("RuntimeError", [3])}
    for lr, (error, steps) in failed.items():
        run = b[lr]
        assert run.info.status == "FAILED", lr
        reason = run.data.tags.get("hescape.error", "")
        assert error in reason and "injected fault" in reason, (lr, reason)
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert history == steps and "test/r5_img2gene" not in run.data.metrics, lr
    for lr in sorted(set(b) - set(failed)):
        run = b[lr]
        assert run.info.status == "FINISHED", (lr, run.data.tags.get("hescape.error"))
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        assert sorted(history) == [3, 6, 9], lr
        for key, value in a[lr].data.metrics.items():
            if key.startswith(("val/", "test/", "train/loss")):
                assert run.data.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), \
                    (lr, key)
    # Tune's own view: the two failed members' trials are ERROR, the others TERMINATED
    phase = tmp_path / "stacked" / "tiny" / "tune" / "search"
    state = json.loads(max(phase.glob("experiment_state-*.json")).read_text())
    status = {}
    for item in state["trial_data"]:
        trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
        status[trial["trial_id"]] = trial["status"]
    by_trial = {r.data.tags["ray.trial_id"]: lr for lr, r in b.items()}
    assert {by_trial[t]: s for t, s in status.items()} == {
        lr: ("ERROR" if lr in failed else "TERMINATED") for lr in b}
