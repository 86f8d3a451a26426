"""End-to-end studies on a real local Ray and a real MLflow sqlite store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hescape.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "tiny.yaml"
PY = sys.executable

pytestmark = pytest.mark.slow


def _children(storage: Path, study: str):
    from mlflow.tracking import MlflowClient

    from hescape.study.lineage import LineageRef, child_runs, find_parent

    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    parent = find_parent(client, exp.experiment_id, study)
    ref = LineageRef(uri, exp.experiment_id, parent, study)
    return client, parent, child_runs(ref)


@pytest.fixture
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_tiny_study_end_to_end(tmp_path, ray_local):
    from hescape.study.driver import run_study

    cfg = load_config(TINY, [f"storage_dir={tmp_path}", "eval.baselines=true",
                             "eval.plots=true", "eval.umap_top_trials=1"])
    result = run_study(cfg, source=str(TINY), progress=False)
    client, parent, children = _children(tmp_path, "tiny")
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(children) == 2  # grid: clip, siglip
    names = set()
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("hescape.error")
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["mlflow.parentRunId"] == parent
        for key in ("ray.trial_id", "hescape.git_commit", "hescape.data_fingerprint",
                    "hescape.split", "hescape.preprocess_saw_heldout", "hescape.best_checkpoint"):
            assert tags.get(key), key
        assert "test/r5_img2gene" in metrics and "test/inbatch64_r5_img2gene" not in metrics
        assert any(k.startswith("test/inbatch16_") for k in metrics)
        assert "val/r5_img2gene" in metrics
        assert metrics["sys/peak_rss_mib"] > 50  # the trial's peak memory (issue #8)
        assert run.data.params["loss.name"] in ("clip", "siglip")
        names.add(run.data.params["loss.name"])
        # the dashboard: the swept level leads the name, the metrics fit on one screen (the
        # whole evaluation is the eval/metrics.json artifact), params are the trial's own
        assert tags["mlflow.runName"].startswith(f"{run.data.params['loss.name']} s0 · ")
        assert tags["hescape.outcome"] == "completed"
        assert len(metrics) <= 40 and len(run.data.params) <= 20, (sorted(metrics),
                                                                   sorted(run.data.params))
        assert "eval/metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                              "eval")}
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert len(history) >= 2  # metrics over steps
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), steps  # each step logged once
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "resolved_config.json" in arts
        # study-constant evaluation is not repeated per trial: the baselines are the parent's
        assert not [k for k in metrics if "/baseline_" in k], sorted(metrics)
        assert tags.get("hescape.baseline_key", "").startswith("frozen-")
    assert names == {"clip", "siglip"}
    parent_metrics = client.get_run(parent).data.metrics
    assert client.get_run(parent).data.params["eval.probe_pca"] == "8"  # the study's config
    assert "test/baseline_frozen/r5_img2gene" not in parent_metrics  # a feature-set probe only
    for key in ("test/baseline_frozen/label_balanced_accuracy",  # (1 test donor: no mixing)
                "test/baseline_pca/label_balanced_accuracy"):
        assert key in parent_metrics, sorted(parent_metrics)
    assert "baselines" in {a.path for a in client.list_artifacts(parent)}
    report = result.report_dir / "report.md"
    text = report.read_text()
    assert report.exists() and "Leaderboard" in text
    assert "vs baselines" in text  # the report still shows the baselines beside the trials
    # UMAPs are drawn once, at report time, for the best trial only (none in the trials)
    assert "Held-out embeddings of the best trials" in text
    drawn = [r for r in children
             if any(a.path.startswith("eval/umap_") or a.path.startswith("eval/pca_")
                    for a in client.list_artifacts(r.info.run_id, "eval"))]
    assert len(drawn) == 1
    assert "report" in {a.path for a in client.list_artifacts(parent)}
    # a second start without --resume is refused (no silent resume of the old Tune run)
    from hescape.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_study(cfg, source=str(TINY), progress=False)


def _count_finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as con:
            rows = con.execute(
                "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                "where t.key = 'hescape.role' and t.value = 'trial' and r.status = 'FINISHED'"
            ).fetchone()
        return int(rows[0])
    except sqlite3.Error:
        return 0


def test_resume_after_driver_is_killed(tmp_path):
    """Kill the driver (and its local Ray) after the first trial; --resume finishes the study."""
    args = [PY, str(ROOT / "study/run.py"), str(TINY), f"--set=storage_dir={tmp_path}",
            "--set=sweep.params.train.lr={type: choice, values: [0.001, 0.002, 0.003]}",
            "--set=train.max_steps=30", "--set=train.eval_every=10", "--set=sweep.max_concurrent=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 300
    try:
        while _count_finished(db) < 1:
            assert proc.poll() is None, "driver exited before the first trial finished"
            assert time.time() < deadline, "no trial finished within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, _, before = _children(tmp_path, "tiny")
    finished_before = {r.data.tags["ray.trial_id"]: r.info.start_time
                       for r in before if r.info.status == "FINISHED"}
    assert finished_before
    out = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client, parent, after = _children(tmp_path, "tiny")
    trial_ids = [r.data.tags["ray.trial_id"] for r in after]
    assert len(trial_ids) == len(set(trial_ids)) == 6  # 2 losses x 3 lrs, one run per trial
    assert all(r.info.status == "FINISHED" for r in after), [r.info.status for r in after]
    for r in after:  # completed trials were not re-run
        if r.data.tags["ray.trial_id"] in finished_before:
            assert r.info.start_time == finished_before[r.data.tags["ray.trial_id"]]
            assert r.data.tags.get("hescape.reattached") is None
    assert client.get_run(parent).info.status == "FINISHED"
    assert "hescape.resumed_at" in client.get_run(parent).data.tags


class _Reads(dict):
    """A result dict that records which keys its reader looked at."""

    log: list[str] = []  # keys read, in order
    offered: dict[str, float] = {}  # every metric the readers could have read

    def __getitem__(self, key):
        _Reads.log.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        _Reads.log.append(key)
        return super().get(key, default)

    def __contains__(self, key):
        _Reads.log.append(key)
        return super().__contains__(key)


def _recording(method, position: int):
    def wrapper(*args, **kwargs):
        args = list(args)
        if len(args) > position and isinstance(args[position], dict):
            _Reads.offered.update(args[position])
            args[position] = _Reads(args[position])
        elif isinstance(kwargs.get("result"), dict):
            _Reads.offered.update(kwargs["result"])
            kwargs["result"] = _Reads(kwargs["result"])
        return method(*args, **kwargs)

    return wrapper


def test_selection_never_reads_a_test_metric(tmp_path, ray_local, monkeypatch):
    """A TPE + ASHA + seeds + confirm study that leaves ``objectives`` out: the searcher, the
    scheduler, the seed phase's top-k selection and the confirm plan's best configuration read
    validation metrics only, although every
    trial's closing report (and its MLflow run) holds the test metrics (issue 12 item 1)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.search.optuna import OptunaSearch

    import hescape.study.report.build  # noqa: F401 - bound before the patch: the report may read test/
    from hescape.study import results
    from hescape.study.driver import run_study

    _Reads.log, _Reads.offered = [], {}
    for cls, name, position in ((OptunaSearch, "on_trial_result", 2),
                                (OptunaSearch, "on_trial_complete", 2),
                                (AsyncHyperBandScheduler, "on_trial_result", 3),
                                (AsyncHyperBandScheduler, "on_trial_complete", 3)):
        monkeypatch.setattr(cls, name, _recording(getattr(cls, name), position))
    table = results.trial_table

    def recorded_table(*args, **kwargs):
        rows = table(*args, **kwargs)
        for row in rows:
            _Reads.offered.update(row["metrics"])
            row["metrics"] = _Reads(row["metrics"])
        return rows

    monkeypatch.setattr(results, "trial_table", recorded_table)
    cfg = load_config(TINY, [f"storage_dir={tmp_path}", "sweep.searcher=tpe",
                             "sweep.scheduler=asha", "sweep.num_samples=2", "sweep.seeds=2",
                             "sweep.seed_top_k=1", "sweep.max_concurrent=1"])
    assert "objectives" not in cfg.sweep.model_fields_set  # the default applies
    run_study(cfg, source=str(TINY), progress=False)
    _, _, children = _children(tmp_path, "tiny")
    # the confirm phase (on by default after TPE) picks its best configuration from the
    # same rows: validation metrics only, too
    assert {r.data.tags["hescape.phase"] for r in children} == {"search", "seeds", "confirm"}
    assert any(k.startswith("test/") for k in _Reads.offered)  # test metrics were at hand
    assert "val/r5_img2gene" in _Reads.log  # the readers were recorded
    assert not [k for k in _Reads.log if k.startswith("test/")], sorted(set(_Reads.log))
