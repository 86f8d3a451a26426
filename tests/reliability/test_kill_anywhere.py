"""Kill the study driver anywhere, resume, and end where an uninterrupted study ends (issue 15).

One small study (TPE + ASHA over two preprocessing variants, two losses and a learning rate;
4 search trials then the best configuration over a second seed) runs once uninterrupted and
once as a chain: each run is SIGKILLed (its whole process group, local Ray included) at a
deterministic instant by ``hescape.train.faults`` and the next run resumes it with
``--resume``, armed with the next instant ("report" = checkpoint written and logged, Tune
not told yet):

    precompute:1       during the shared precompute, after the first preprocessing variant
    report:6@search    right after trial 1's final checkpoint (step 6 = train.max_steps)
    evaluating@search  during trial 1's evaluation (computed, nothing logged)
    report:3@search    mid-training of trial 2 (started by this resumed run), by SIGINT
                       (Ctrl-C: the driver exits 130; Ray goes down with it)
    report:3@seeds     the seeds phase, mid-training
    study_report       every trial done, the report not written

Each killed run must die at its instant (not crash before it), and at that moment every
trial with an MLflow run must be in Tune's saved state (else the searcher would ask for it
again under a new id). The last resume exits 0 and the result equals the uninterrupted
study: the same trials (configuration, seed, status), one MLflow child run per trial, none
RUNNING, each step logged once, finished trials' metrics equal; Optuna's trials and Tune's
trial list agree; the report is written; and ``--resume`` of the finished study is a no-op
that says where the report is.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

KILLS = ["precompute:1", "report:6@search", "evaluating@search", "report:3@search",
         "report:3@seeds", "study_report"]
CTRL_C = {"report:3@search"}  # SIGINT to the driver instead of SIGKILL to its group
NUM_SAMPLES, SEEDS = 4, 2
OVERRIDES = [
    "--set=sweep.searcher=tpe", "--set=sweep.scheduler=asha",
    f"--set=sweep.num_samples={NUM_SAMPLES}", "--set=sweep.max_concurrent=1",
    f"--set=sweep.seeds={SEEDS}", "--set=sweep.seed_top_k=1", "--set=sweep.grace_period=1",
    "--set=sweep.params={preprocess.expression.method: {type: choice, values: [none, pca]}, "
    "loss.name: {type: choice, values: [clip, siglip]}, "
    "train.lr: {type: loguniform, low: 0.001, high: 0.005}}",
    "--set=train.max_steps=6", "--set=train.eval_every=3",
    "--set=sweep.confirm.enabled=false",  # its kills are in test_confirm_resume.py
]
COMPARED_PREFIXES = ("val/", "test/", "train/")
NOT_COMPARED = ("train/steps_per_s",)  # wall-clock


def _run(store: Path, *extra: str, fault: str | None = None, marker: Path | None = None):
    from hescape.train import faults

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    for key in (faults.KILL_DRIVER_AT, faults.MARKER, faults.DRIVER_PGID, faults.DRIVER_SIGNAL):
        env.pop(key, None)
    if fault is not None:
        env.update({faults.KILL_DRIVER_AT: fault, faults.MARKER: str(marker),
                    faults.DRIVER_SIGNAL: "INT" if fault in CTRL_C else "KILL"})
    args = [sys.executable, str(ROOT / "study/run.py"), str(ROOT / "experiments/tiny.yaml"),
            f"--set=storage_dir={store}", *OVERRIDES, *extra]
    # its own session: the fault kills the driver's process group, never pytest. SIGINT at
    # its default, as in a terminal: an earlier test can leave pytest ignoring it, a child
    # inherits that, and a driver started ignoring SIGINT keeps ignoring it (nohup rule)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _runs(store: Path):
    from mlflow.tracking import MlflowClient

    from hescape.study.lineage import LineageRef, child_runs, find_parent

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    parent = find_parent(client, exp.experiment_id, "tiny")
    return client, client.get_run(parent), child_runs(LineageRef(uri, exp.experiment_id,
                                                                 parent, "tiny"))


def _by_config(runs) -> dict[tuple[str, str, str], object]:
    out = {}
    for run in runs:
        tags = run.data.tags
        key = (tags["hescape.phase"], tags["hescape.config_id"], tags["hescape.seed"])
        assert key not in out, f"configuration trained twice: {key}"
        out[key] = run
    return out


def _tune_trials(phase_dir: Path) -> dict[str, dict]:
    """Tune's saved trial list (id -> {status, config}), as a resume would read it: the
    newest state file, or the driver's copy when the kill cut that file short."""
    from hescape.study.durable import BACKUP

    newest = Path(max(glob.glob(str(phase_dir / "experiment_state-*.json"))))
    try:
        data = json.loads(newest.read_text())
    except ValueError:
        backup = phase_dir.parents[1] / "resume" / phase_dir.name / BACKUP
        current = (backup / "current").read_text().strip()
        data = json.loads((backup / current / newest.name).read_text())
    trials = {}
    for item in data["trial_data"]:
        state = json.loads(item[0]) if isinstance(item[0], str) else item[0]
        trials[state["trial_id"]] = {"status": state["status"], "config": state["config"]}
    return trials


def _tune_state(phase_dir: Path) -> tuple[dict[str, dict], dict]:
    """Tune's trial list and the searcher's pickled state (after the final resume)."""
    trials = _tune_trials(phase_dir)
    with open(max(glob.glob(str(phase_dir / "searcher-state-*.pkl"))), "rb") as fh:
        searcher = pickle.load(fh)  # noqa: S301 - the study's own file
    return trials, searcher


def _compared(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if k.startswith(COMPARED_PREFIXES) and k not in NOT_COMPARED}


def _assert_runs_match(client, got: dict, ref_client, want: dict) -> None:
    """Each resumed run ended as its uninterrupted twin: same status and outcome, every
    ``val/loss`` step once, and (completed trials; a trial ASHA stopped early has no test
    metrics) no error and the same metrics."""
    for key, run in got.items():
        ref = want[key]
        assert run.info.status == ref.info.status, (key, run.data.tags.get("hescape.error"))
        outcome = run.data.tags.get("hescape.outcome")
        assert outcome == ref.data.tags.get("hescape.outcome"), key
        assert run.info.status == "FINISHED" and outcome in ("completed", "stopped early"), key
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
        ref_steps = [m.step for m in ref_client.get_metric_history(ref.info.run_id, "val/loss")]
        assert sorted(steps) == sorted(ref_steps) and len(set(steps)) == len(steps), key
        if outcome == "completed":
            assert "hescape.error" not in run.data.tags, key  # a reattached run ran again
            a, b = _compared(run.data.metrics), _compared(ref.data.metrics)
            assert set(a) == set(b) and any(k.startswith("test/") for k in a), key
            for name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (key, name)


def test_driver_killed_anywhere_resumes_to_the_uninterrupted_study(tmp_path):
    reference = _run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    store = tmp_path / "killed"
    for i, fault in enumerate(KILLS):
        marker = tmp_path / f"killed-{i}"
        out = _run(store, *(["--resume"] if i else []), fault=fault, marker=marker)
        expected = 130 if fault in CTRL_C else -signal.SIGKILL
        assert out.returncode == expected, (  # did the fault fire (marker) and what was said
            fault, out.returncode, marker.exists() and marker.read_text(),
            [ln for ln in out.stderr.splitlines() if "Exception ignored" in ln or "Interrupt" in ln],
            out.stdout[-2000:], out.stderr[-3000:])
        assert marker.read_text().split()[1] == fault.split(":")[0].split("@")[0], fault
        for phase in ("search", "seeds"):  # a trial that did work is one Tune restores
            phase_dir = store / "tiny" / "tune" / phase
            if glob.glob(str(phase_dir / "experiment_state-*.json")):
                in_mlflow = {r.data.tags["ray.trial_id"] for r in _runs(store)[2]
                             if r.data.tags["hescape.phase"] == phase}
                assert in_mlflow <= set(_tune_trials(phase_dir)), (fault, phase)
    final = _run(store, "--resume")
    assert final.returncode == 0, final.stderr[-3000:]

    # the same trials as the uninterrupted study, one run each, none RUNNING
    client, parent, runs = _runs(store)
    ref_client, ref_parent, ref_runs = _runs(tmp_path / "reference")
    got, want = _by_config(runs), _by_config(ref_runs)
    assert sorted(got) == sorted(want)
    phases = [key[0] for key in got]
    assert phases.count("search") == NUM_SAMPLES and phases.count("seeds") == SEEDS - 1
    assert len({r.data.tags["ray.trial_id"] for r in runs}) == len(runs)
    assert parent.info.status == "FINISHED"
    _assert_runs_match(client, got, ref_client, want)

    # Optuna's trials and Tune's trial list agree (and MLflow's runs are Tune's trials)
    tune_trials, searcher = _tune_state(store / "tiny" / "tune" / "search")
    assert len(tune_trials) == NUM_SAMPLES
    assert {t["status"] for t in tune_trials.values()} == {"TERMINATED"}
    assert set(searcher["_ot_trials"]) == set(tune_trials)
    assert len(searcher["_ot_study"].trials) == NUM_SAMPLES
    for trial_id, trial in tune_trials.items():
        ot_trial = searcher["_ot_trials"][trial_id]
        assert ot_trial.params == trial["config"], trial_id
        assert searcher["_ot_study"].trials[ot_trial.number].state.name == "COMPLETE"
    search_ids = {r.data.tags["ray.trial_id"] for r in runs
                  if r.data.tags["hescape.phase"] == "search"}
    assert search_ids == set(tune_trials)

    report = store / "tiny" / "report" / "report.md"
    assert report.is_file() and "Leaderboard" in report.read_text()

    # --resume of the finished study: a no-op that says where the report is
    again = _run(store, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout and str(report.resolve()) in again.stdout
    _, parent_after, runs_after = _runs(store)
    assert parent_after.info.end_time == parent.info.end_time
    assert parent_after.data.tags == parent.data.tags and len(runs_after) == len(runs)
