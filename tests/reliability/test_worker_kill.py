"""A Ray Train worker SIGKILLed mid-run: the run restarts from its last checkpoint
(FailureConfig(max_failures)) and ends where an uninterrupted run ends.

The fault is injected deterministically by ``hescape.train.faults``: right after the report
of step 3 is committed by the Train controller, the worker kills itself once (a marker file
guards the once). Every report appends ``pid step`` to a log, so the test counts worker
processes and the steps each one reported exactly.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

KILL_AFTER = 3
MAX_STEPS, EVAL_EVERY = 9, 3
COMPARED = ("train/loss", "train/contrastive", "val/loss", "val/r5_img2gene",
            "val/mean_rank_img2gene", "best")


def _start_faulty_ray(tmp_path: Path, monkeypatch, **extra: str):
    """A local Ray cluster whose processes carry the fault env (this process does not)."""
    ray = pytest.importorskip("ray")
    from hescape.train import faults

    env = {faults.KILL_AFTER_STEP: str(KILL_AFTER), faults.MARKER: str(tmp_path / "killed"),
           faults.LOG: str(tmp_path / "reports.log"), **extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # the raylet inherits os.environ at ray.init and passes it on to every worker process
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for key in env:  # in-process code in pytest must never see the kill switch
        monkeypatch.delenv(key)
    return ray


@pytest.fixture
def faulty_ray(tmp_path, monkeypatch):
    ray = _start_faulty_ray(tmp_path, monkeypatch)
    yield tmp_path / "killed", tmp_path / "reports.log"
    ray.shutdown()


@pytest.fixture
def faulty_ray_no_wait(tmp_path, monkeypatch):
    """The kill does not wait for the controller to register the report: a real crash."""
    from hescape.train import faults

    ray = _start_faulty_ray(tmp_path, monkeypatch, **{faults.NO_WAIT: "1"})
    yield tmp_path / "killed", tmp_path / "reports.log"
    ray.shutdown()


def test_hook_is_inert_unless_asked_and_kills_once(tmp_path, monkeypatch):
    """The hook alone (no Ray): unset is a no-op; before step n, on another rank or with the
    marker present nothing happens; otherwise the process dies by SIGKILL, once."""
    import os
    import signal
    import subprocess
    import sys

    from hescape.train import faults

    class Rank:
        def __init__(self, rank):
            self.world_rank, self.waited = rank, 0

        def wait_reported(self):
            self.waited += 1

    for key in (faults.KILL_AFTER_STEP, faults.MARKER, faults.RANK, faults.LOG):
        monkeypatch.delenv(key, raising=False)
    faults.maybe_kill_after_report(10**6, Rank(0))  # unset: nothing
    monkeypatch.setenv(faults.KILL_AFTER_STEP, "3")
    with pytest.raises(RuntimeError, match=faults.MARKER):
        faults.maybe_kill_after_report(3, Rank(0))
    marker, log = tmp_path / "killed", tmp_path / "reports.log"
    monkeypatch.setenv(faults.MARKER, str(marker))
    monkeypatch.setenv(faults.LOG, str(log))
    session = Rank(1)
    faults.maybe_kill_after_report(2, Rank(0))  # before step 3
    faults.maybe_kill_after_report(3, session)  # another rank
    assert not marker.exists() and session.waited == 0
    code = ("import sys; from hescape.train import faults\n"
            "class S: world_rank = 0\n"
            "faults.maybe_kill_after_report(4, S()); sys.exit(0)")
    env = {**os.environ, faults.RANK: "0"}
    first = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert first.returncode == -signal.SIGKILL
    pid, step = map(int, marker.read_text().split())
    assert step == 4 and pid != os.getpid()  # the child killed itself, not this process
    again = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert again.returncode == 0  # marker present: trains on
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["2", "3", "4", "4"]


def _config(tmp_path: Path):
    from hescape.config import StudyConfig
    from hescape.data import tiny_dataset

    data = tiny_dataset(tmp_path / "data", seed=0, spots_per_donor=120, n_states=4)
    return StudyConfig.model_validate({
        "name": "kill", "storage_dir": str(tmp_path / "storage"), "data": {"path": str(data)},
        "model": {"embed_dim": 32, "gene": {"hidden_dim": 64}},  # gene dropout: RNG matters
        "train": {"batch_size": 32, "max_steps": MAX_STEPS, "eval_every": EVAL_EVERY,
                  "warmup_steps": 2, "lr": 3e-3, "keep_checkpoints": 10,
                  "num_workers": 1, "in_process": False, "max_failures": 1},
        "eval": {"inbatch_repeats": 2},
    })


def _reports_by_pid(log: Path) -> dict[int, list[int]]:
    by_pid: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        pid, step = map(int, line.split())
        by_pid.setdefault(pid, []).append(step)
    return by_pid


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from hescape.train.checkpoint import load_checkpoint

    return load_checkpoint(ckpt, with_train_state=False).model_state


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path, faulty_ray):
    from hescape.train import fit, runs_in_process

    marker, log = faulty_ray
    cfg = _config(tmp_path)
    assert not runs_in_process(cfg)

    seen: list[tuple[int, Path | None]] = []
    killed = fit(cfg, run_dir=tmp_path / "killed_run", verbose=False,
                 report_callback=lambda m, c: seen.append((int(m["step"]), c)))

    # the kill happened, once, in the first worker right after step 3's report
    assert marker.is_file()
    first_pid, kill_step = map(int, marker.read_text().split())
    assert kill_step == KILL_AFTER
    by_pid = _reports_by_pid(log)
    assert list(by_pid)[0] == first_pid and len(by_pid) == 2  # exactly one restart
    assert by_pid[first_pid] == [3]
    assert list(by_pid.values())[1] == [6, 9]  # the restart began at step 3, not at 0

    # the driver saw every checkpointed step exactly once, in order, all with checkpoints
    steps = [s for s, _ in seen]
    assert steps == [3, 6, 9] and Counter(steps) == {3: 1, 6: 1, 9: 1}
    assert [int(h["step"]) for h in killed.history] == [3, 6, 9]
    assert all(c is not None and (c / "model.pt").is_file() for _, c in seen)
    assert killed.metrics["step"] == MAX_STEPS
    assert killed.best_checkpoint is not None and killed.best_checkpoint.is_dir()
    assert killed.best_metrics["step"] == int(killed.best_checkpoint.name.split("_")[-1])

    # the same config, never interrupted (marker present: no kill), in a fresh run dir
    n_lines = len(log.read_text().splitlines())
    full = fit(cfg, run_dir=tmp_path / "full_run", verbose=False)
    assert len(_reports_by_pid(log)) == 3 and len(log.read_text().splitlines()) == n_lines + 3
    assert [int(h["step"]) for h in full.history] == [3, 6, 9]
    for a, b in zip(killed.history, full.history, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    last = f"checkpoint_{MAX_STEPS:07d}"
    wa, wb = _weights(tmp_path / "killed_run" / last), _weights(tmp_path / "full_run" / last)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_crash_before_ray_registers_the_checkpoint_still_resumes_from_it(
        tmp_path, faulty_ray_no_wait):
    """Killed at once after persisting step 3's checkpoint: Ray may not have registered it
    yet, so the restarted worker finds it in the run directory (``newest_checkpoint``)."""
    from hescape.train import fit

    marker, log = faulty_ray_no_wait
    result = fit(_config(tmp_path), run_dir=tmp_path / "run", verbose=False)
    assert marker.is_file()
    by_pid = _reports_by_pid(log)
    assert len(by_pid) == 2 and list(by_pid.values()) == [[3], [6, 9]]  # resumed at 3, not 0
    assert result.metrics["step"] == MAX_STEPS
    assert (tmp_path / "run" / "checkpoint_0000003" / "model.pt").is_file()


@pytest.mark.slow
def test_killed_tune_trial_restarts_and_finishes(tmp_path):
    """One in-process trial (the loop runs in the Tune trial actor): the actor is killed
    after step 3; Tune's FailureConfig restarts the trial, which resumes from its step-3
    checkpoint and finishes; MLflow holds one FINISHED run with each step logged once."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from hescape.study.lineage import LineageRef, child_runs, find_parent
    from hescape.train import faults

    root = Path(__file__).resolve().parents[2]
    marker, log = tmp_path / "killed", tmp_path / "reports.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           faults.KILL_AFTER_STEP: str(KILL_AFTER), faults.MARKER: str(marker),
           faults.LOG: str(log)}
    args = [sys.executable, str(root / "study/run.py"), str(root / "experiments/tiny.yaml"),
            f"--set=storage_dir={tmp_path / 'store'}", "--set=sweep.params.loss.name.values=[clip]",
            f"--set=train.max_steps={MAX_STEPS}", f"--set=train.eval_every={EVAL_EVERY}",
            "--set=train.max_failures=1"]
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    first_pid, kill_step = map(int, marker.read_text().split())
    assert kill_step == KILL_AFTER
    by_pid = _reports_by_pid(log)
    assert list(by_pid) == [first_pid, list(by_pid)[1]] and len(by_pid) == 2  # one restart
    assert by_pid[first_pid] == [3] and list(by_pid.values())[1] == [6, 9]

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    parent = find_parent(client, exp.experiment_id, "tiny")
    runs = child_runs(LineageRef(uri, exp.experiment_id, parent, "tiny"))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # reattached, not a 2nd run
    assert "test/r5_img2gene" in runs[0].data.metrics
    steps = Counter(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/loss"))
    assert steps[3] == 1 and steps[6] == 1 and set(steps) == {3, 6, 9}
    assert client.get_run(parent).info.status == "FINISHED"
