"""A full disk mid-study (issue 23): the study stops with one line, leaves nothing half-written,
and ``--resume`` after space is freed ends where an uninterrupted study ends.

``storage_dir`` lies on a tmpfs of its own (mounted by the test: root, or ``sudo -n``; the
test is skipped where neither may mount), just over the 512 MiB a study asks for. At a
named instant ``hescape.train.faults.maybe_fill_disk`` fills that filesystem with a ballast
file, so the study's next write gets a real ``ENOSPC`` from the kernel (sqlite its real
"database or disk is full"). Three runs, each stopped by a full disk at a different write,
each resumed after the ballast is deleted:

    precompute:1   the shared preprocessing cache (the second variant's entry)
    checkpoint:6   a checkpoint save inside a trial (its final one, in a Ray worker)
    study_report   the study report (every trial done)

After each stop: exit code 1, one ``error: disk full: could not write <path> (...)`` line
on stderr naming the path and the space free and needed, no traceback, and every file
under ``storage_dir`` loads (JSON, pickles, numpy and preprocessing caches, checkpoints
through ``load_checkpoint``, the MLflow sqlite store's integrity check). The last resume
exits 0 with the trials of the uninterrupted study, one MLflow run each, none RUNNING, the
same metrics.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tmpfs import mounted_tmpfs

from tests.reliability import test_kill_anywhere as ka

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

FS_SIZE = "600m"  # the study refuses to start with under 512 MiB free (resources.MIN_FREE_BYTES)
POINTS = {  # fill instant -> a part of the path the one-line message must name
    "precompute:1": "cache/preprocess/expr-",
    "checkpoint:6": "/train/checkpoint_0000006",
    "study_report": "/report",
}
NUM_SAMPLES = 2
OVERRIDES = [
    "--set=sweep.searcher=tpe", "--set=sweep.scheduler=asha",
    f"--set=sweep.num_samples={NUM_SAMPLES}", "--set=sweep.max_concurrent=1",
    "--set=sweep.seeds=1", "--set=sweep.grace_period=1",
    "--set=sweep.params={preprocess.expression.method: {type: choice, values: [none, pca]}, "
    "train.lr: {type: loguniform, low: 0.001, high: 0.005}}",
    "--set=train.max_steps=6", "--set=train.eval_every=3",
    "--set=sweep.confirm.enabled=false",
]


@pytest.fixture
def small_fs(tmp_path):
    """A fresh tmpfs of ``FS_SIZE`` at ``tmp_path/fs`` (unmounted afterwards)."""
    with mounted_tmpfs(tmp_path / "fs", FS_SIZE,
                       "; the disk-full test needs root or passwordless sudo") as where:
        yield where


def _run(store: Path, *extra: str, fill: str | None = None, marker: Path | None = None,
         ballast: Path | None = None):
    from hescape.train import faults

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "RAY_ADDRESS": "local"}  # a Ray of its own (not a `ray start` cluster on the host)
    for key in (faults.KILL_DRIVER_AT, faults.FILL_DISK_AT, faults.MARKER, faults.BALLAST):
        env.pop(key, None)
    if fill is not None:
        env.update({faults.FILL_DISK_AT: fill, faults.MARKER: str(marker),
                    faults.BALLAST: str(ballast)})
    args = [sys.executable, str(ROOT / "study/run.py"), str(ROOT / "experiments/tiny.yaml"),
            f"--set=storage_dir={store}", *OVERRIDES, *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def check_every_file_loads(store: Path) -> dict[str, int]:
    """Load every file under ``store`` by its kind; the count per kind checked. Fails with
    the list of every file that does not load."""
    counts: dict[str, int] = {}
    bad: list[str] = []
    for path in sorted(store.rglob("*")):
        try:
            kind = _load(path)
        except Exception as exc:  # noqa: BLE001 - collected, the test fails on the list
            bad.append(f"{path.relative_to(store)}: {type(exc).__name__}: {exc}"[:300])
            continue
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    assert not bad, "files that do not load:\n" + "\n".join(bad)
    return counts


def _load(path: Path) -> str | None:
    """Load ``path`` as what it is (raises if it does not load); its kind, or None."""
    from hescape.preprocess.cache import load_entry
    from hescape.train.checkpoint import load_checkpoint

    name = path.name
    if path.is_dir():
        if name.startswith("checkpoint_") and ".tmp" not in name:
            loaded = load_checkpoint(path, fallback=False)  # raises if cut short
            assert Path(loaded.path) == path
            return "checkpoint"
        return None
    assert ".tmp" not in name, "temporary file left behind"
    if name.startswith("search_gen_state-") and name.endswith(".json"):
        with open(path, "rb") as fh:  # Tune's searcher generator: a pickle named .json
            pickle.load(fh)  # noqa: S301 - the study's own file
        return "pickle"
    if name == "result.json":  # Tune's per-trial results: JSON lines
        for line in path.read_text().splitlines():
            json.loads(line)
        return "json"
    if name.endswith(".json"):
        json.loads(path.read_text())
        if path.parent.name == "preprocess":
            assert load_entry(path.with_suffix("")) is not None, "cache entry does not load"
            return "preprocessing cache"
        return "json"
    if name.endswith(".pkl"):
        with open(path, "rb") as fh:
            pickle.load(fh)  # noqa: S301 - the study's own file
        return "pickle"
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                np.asarray(data[key])
        return "numpy"
    if name.endswith(".npy"):
        np.asarray(np.load(path, allow_pickle=False))
        return "numpy"
    if name == "mlflow.db":
        con = sqlite3.connect(path)
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            con.close()
        return "sqlite"
    return None


def test_a_full_disk_stops_the_study_cleanly_and_resume_completes_it(tmp_path, small_fs):
    reference = _run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    store, ballast = small_fs / "store", small_fs / "ballast"
    for i, (point, names) in enumerate(POINTS.items()):
        marker = tmp_path / f"filled-{i}"
        out = _run(store, *(["--resume"] if i else []), fill=point, marker=marker,
                   ballast=ballast)
        assert marker.exists(), (point, out.returncode, out.stderr[-3000:])  # it fired
        assert out.returncode == 1, (point, out.returncode, out.stderr[-3000:])
        assert "Traceback" not in out.stderr, (point, out.stderr[-5000:])
        errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, (point, out.stderr[-3000:])
        line = errors[0]
        assert line.startswith(f"error: disk full: could not write {store}"), (point, line)
        assert names in line.split(" (no space left")[0], (point, line)
        assert "MiB free of" in line and "needs at least 512 MiB" in line, line
        assert "--resume" in line, line
        counts = check_every_file_loads(store)
        assert counts.get("sqlite") == 1 and counts.get("json", 0) > 0, counts
        assert counts.get("preprocessing cache", 0) >= (1 if i == 0 else 2), counts
        if i:
            assert counts.get("checkpoint", 0) > 0, counts
        ballast.unlink()  # space freed

    final = _run(store, "--resume")
    assert final.returncode == 0, final.stderr[-3000:]
    check_every_file_loads(store)

    # the same trials as the uninterrupted study, one run each, none RUNNING
    client, parent, runs = ka._runs(store)
    ref_client, _, ref_runs = ka._runs(tmp_path / "reference")
    got, want = ka._by_config(runs), ka._by_config(ref_runs)
    assert sorted(got) == sorted(want) and len(got) == NUM_SAMPLES
    assert len({r.data.tags["ray.trial_id"] for r in runs}) == len(runs)
    assert parent.info.status == "FINISHED"
    ka._assert_runs_match(client, got, ref_client, want)
    report = store / "tiny" / "report" / "report.md"
    assert report.is_file() and "Leaderboard" in report.read_text()
    shutil.rmtree(store, ignore_errors=True)
