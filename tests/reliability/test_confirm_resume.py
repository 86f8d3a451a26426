"""The confirm phase on donor folds, killed anywhere and resumed, ends where the
uninterrupted study ends (issue 19: the confirm phase and donor folds resume like the
other phases).

A tiny TPE study (2 search trials over the loss) with ``sweep.confirm`` (2 seeds) and
``eval.donor_folds: 3``: the confirm phase trains the best configuration and its other loss
on 3 donor folds x 2 seeds (12 trials). One run goes uninterrupted; a chain is SIGKILLed
during the fold precompute, mid-training of a confirm trial and during a confirm trial's
evaluation, each time resumed with ``--resume``. The result: the same trials (phase,
configuration, seed, fold, status), one MLflow run each, none RUNNING, equal metrics, the
same confirm plan, and a report whose effects rest on the controlled, fold-merged trials.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability import test_kill_anywhere as ka

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

KILLS = ["precompute:2", "report:3@confirm", "evaluating@confirm"]
FOLDS, SEEDS = 3, 2
OVERRIDES = [
    "--set=sweep.searcher=tpe", "--set=sweep.scheduler=none", "--set=sweep.num_samples=2",
    "--set=sweep.max_concurrent=1",
    "--set=sweep.params={loss.name: {type: choice, values: [clip, siglip]}}",
    f"--set=sweep.confirm.seeds={SEEDS}", f"--set=eval.donor_folds={FOLDS}",
    "--set=train.max_steps=6", "--set=train.eval_every=3",
]


def _run(store: Path, *extra: str, fault: str | None = None, marker: Path | None = None):
    from hescape.train import faults

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    for key in (faults.KILL_DRIVER_AT, faults.MARKER, faults.DRIVER_PGID, faults.DRIVER_SIGNAL):
        env.pop(key, None)
    if fault is not None:
        env.update({faults.KILL_DRIVER_AT: fault, faults.MARKER: str(marker),
                    faults.DRIVER_SIGNAL: "KILL"})
    args = [sys.executable, str(ROOT / "study/run.py"), str(ROOT / "experiments/tiny.yaml"),
            f"--set=storage_dir={store}", *OVERRIDES, *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _by_trial(runs) -> dict[tuple[str, str, str, str], object]:
    out = {}
    for run in runs:
        tags = run.data.tags
        key = (tags["hescape.phase"], tags["hescape.config_id"], tags["hescape.seed"],
               tags["hescape.fold"])
        assert key not in out, f"trained twice: {key}"
        out[key] = run
    return out


def test_confirm_phase_on_donor_folds_resumes_after_kills(tmp_path):
    reference = _run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    store = tmp_path / "killed"
    for i, fault in enumerate(KILLS):
        marker = tmp_path / f"killed-{i}"
        out = _run(store, *(["--resume"] if i else []), fault=fault, marker=marker)
        assert out.returncode == -signal.SIGKILL, (fault, out.returncode, out.stdout[-2000:],
                                                   out.stderr[-3000:])
        assert marker.read_text().split()[1] == fault.split(":")[0].split("@")[0], fault
    final = _run(store, "--resume")
    assert final.returncode == 0, final.stderr[-3000:]

    client, parent, runs = ka._runs(store)
    ref_client, _, ref_runs = ka._runs(tmp_path / "reference")
    got, want = _by_trial(runs), _by_trial(ref_runs)
    assert sorted(got) == sorted(want)
    confirm = [k for k in got if k[0] == "confirm"]
    assert len(confirm) == 2 * SEEDS * FOLDS  # both losses x seeds x folds
    assert {k[3] for k in confirm} == {str(f) for f in range(FOLDS)}
    assert {k[3] for k in got if k[0] == "search"} == {"none"}  # the search: dataset's split
    assert parent.info.status == "FINISHED"
    for key, run in got.items():
        ref = want[key]
        assert run.info.status == ref.info.status == "FINISHED", (
            key, run.data.tags.get("hescape.error"))
        a = {k: v for k, v in run.data.metrics.items() if k.startswith(("val/", "test/"))}
        b = {k: v for k, v in ref.data.metrics.items() if k.startswith(("val/", "test/"))}
        assert set(a) == set(b), key
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (key, name)
    plans = [json.loads((s / "tiny" / "confirm" / "plan.json").read_text())
             for s in (store, tmp_path / "reference")]
    assert plans[0] == plans[1]
    tests = {run.data.tags["hescape.split"].split("test=")[1] for run in runs
             if run.data.tags["hescape.phase"] == "confirm"}
    donors = sorted(d for t in tests for d in t.split(","))
    assert len(donors) == len(set(donors)) == 4  # every donor a test donor exactly once
    text = (store / "tiny" / "report" / "report.md").read_text()
    assert "confirm" in text.lower()
