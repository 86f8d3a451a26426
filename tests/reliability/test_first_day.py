"""A new user's first day (issue 24): every external endpoint probed before anything is
written (closed ports and dead addresses refused in seconds, not hung), studies that fail
before their first trial leave nothing that blocks the corrected re-run, --overwrite
retires the old runs, --dry-run never writes, --resume refuses a changed config.

The hangs are bounded: each command runs with a subprocess timeout far below what the old
behaviour took (25 min for a closed MLflow port, 400 s for a dead Ray address)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "study" / "run.py")]
TINY = str(ROOT / "experiments" / "tiny.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "HESCAPE_PROBE_TIMEOUT_S": "1"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def _run(args: list[str], tmp: Path, env: dict | None = None, timeout: int = 60):
    proc = subprocess.run([*RUN, TINY, "--set", f"storage_dir={tmp / 'runs'}", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=tmp)
    return proc, proc.stdout + proc.stderr


def _nothing_written(tmp: Path) -> None:
    runs = tmp / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.rglob("*"))


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers (a hung server, or a host whose
    packets vanish: the client waits either way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.mark.parametrize("case", ["closed_port", "silent", "bad_dns"])
def test_tracking_server_that_does_not_answer_is_refused_at_once(tmp_path, case, silent_port):
    uri = {"closed_port": f"http://127.0.0.1:{_closed_port()}",
           "silent": f"http://127.0.0.1:{silent_port}",
           "bad_dns": "http://no-such-host.invalid:5000"}[case]
    proc, out = _run([], tmp_path, {"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, out[-2000:]
    assert "MLFLOW_TRACKING_URI" in out and "Fix:" in out and "Traceback" not in out, out
    _nothing_written(tmp_path)


def test_tracking_probe_names_each_failure(silent_port):
    from hescape.endpoints import tracking_problem

    closed = tracking_problem(f"http://127.0.0.1:{_closed_port()}", setting="S")
    assert closed.startswith("S=http://127.0.0.1:") and "refused" in closed
    assert "no HTTP server answered" in tracking_problem(f"http://127.0.0.1:{silent_port}",
                                                         setting="S")


def test_config_tracking_uri_and_artifact_store_are_named(tmp_path):
    port = _closed_port()
    proc, out = _run(["--set", f"mlflow.tracking_uri=postgresql://u:secret@127.0.0.1:{port}/db",
                      "--set", f"mlflow.artifact_location=http://127.0.0.1:{port}/artifacts"],
                     tmp_path)
    assert proc.returncode == 2, out
    assert "mlflow.tracking_uri=" in out and "mlflow.artifact_location=" in out, out
    assert "secret" not in out and "2 problem(s)" in out and "Traceback" not in out
    _nothing_written(tmp_path)


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "nonsense"])
def test_dead_ray_address_is_refused_at_once(tmp_path, address):
    address = address.format(port=_closed_port())
    proc, out = _run(["--address", address], tmp_path)
    assert proc.returncode == 2, out[-2000:]
    assert f"--address={address}" in out and "Traceback" not in out, out
    _nothing_written(tmp_path)


def test_dead_ray_address_in_environment_is_named(tmp_path):
    proc, out = _run([], tmp_path, {"RAY_ADDRESS": f"127.0.0.1:{_closed_port()}"})
    assert proc.returncode == 2 and "RAY_ADDRESS=" in out and "Traceback" not in out, out


def test_endpoint_probes_pass_on_live_endpoints(tmp_path):
    """A listening socket answers the TCP probe; a real HTTP server the HTTP probe."""
    import http.server
    import threading

    from hescape.endpoints import ray_address_problem, tcp_problem, tracking_problem

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert tcp_problem("127.0.0.1", port) is None
        assert "not as an MLflow tracking server (GET /health: 404)" in tracking_problem(
            f"http://127.0.0.1:{port}", setting="x")  # a web server, not MLflow
        assert ray_address_problem(f"127.0.0.1:{port}") is None
    finally:
        server.shutdown()
    assert tracking_problem(f"sqlite:///{tmp_path}/a/b/mlflow.db", setting="x") is None


# --------------------------------------------------------------------- nothing half-written
def _study_state(tmp_path: Path, **cfg_over):
    """A study as a run leaves it once its parent run opened (study.json + MLflow runs:
    a parent and two children, one FINISHED one FAILED) — without running Ray."""
    from hescape.config import load_config
    from hescape.study import lineage
    from hescape.study.driver import _write_study_json, study_dir_of
    from hescape.tracking import resolve_tracking_uri

    sets = [f"storage_dir={tmp_path / 'runs'}", *[f"{k}={v}" for k, v in cfg_over.items()]]
    cfg = load_config(TINY, sets)
    study_dir = study_dir_of(cfg)
    uri = resolve_tracking_uri(None, tmp_path / "runs")
    ref = lineage.open_parent(uri, cfg.name, cfg.name, resume=False, tags={})
    kids = [lineage.open_child(ref, f"t{i}", existing=None, name=f"t{i}", tags={})
            for i in range(2)]
    lineage.finish_run(ref, kids[0], "FINISHED")
    lineage.finish_run(ref, kids[1], "FAILED", error="ValueError: boom")
    _write_study_json(study_dir, cfg, TINY, ref=ref, started=True)
    (study_dir / "tune" / "search").mkdir(parents=True)
    (study_dir / "trials" / "t0").mkdir(parents=True)
    return cfg, ref, [ref.parent_run_id, *kids]


def _tree(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(path.rglob("*"))}


def test_dry_run_on_an_existing_study_plans_and_writes_nothing(tmp_path):
    from hescape.study.api import describe_plan

    cfg, _, _ = _study_state(tmp_path)
    before = _tree(tmp_path / "runs")
    text = describe_plan(cfg, TINY)
    assert "already exists" in text and "trial(s) in the search phase" in text
    resumed = describe_plan(cfg, TINY, resume=True)
    assert "resume: phases started ['search']" in resumed and "1 trial(s) on disk" in resumed
    assert _tree(tmp_path / "runs") == before


def test_resume_with_a_changed_config_is_refused_with_the_difference(tmp_path):
    from hescape.config import ConfigError, load_config
    from hescape.study.driver import preflight

    _study_state(tmp_path, **{"train.max_steps": 3000})
    changed = load_config(TINY, [f"storage_dir={tmp_path / 'runs'}", "train.max_steps=300"])
    with pytest.raises(ConfigError, match=r"(?s)train\.max_steps: 3000 -> 300.*--accept-config-change"):
        preflight(changed, source=TINY, resume=True, overwrite=False, probe=False)
    pre = preflight(changed, source=TINY, resume=True, overwrite=False, probe=False,
                    accept_config_change=True)
    assert pre.config_change == ["train.max_steps: 3000 -> 300"]


def test_resume_refusal_through_the_cli(tmp_path):
    _study_state(tmp_path, **{"train.max_steps": 3000})
    proc, out = _run(["--resume", "--set", "train.max_steps=300"], tmp_path)
    assert proc.returncode == 2 and "train.max_steps: 3000 -> 300" in out, out


def test_overwrite_retires_the_old_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from hescape.study.driver import preflight, retire_study

    cfg, ref, run_ids = _study_state(tmp_path)
    pre = preflight(cfg, source=TINY, resume=False, overwrite=True, probe=False)
    assert pre.replace and pre.study_dir.exists()  # preflight itself writes nothing
    retire_study(pre)
    assert not pre.study_dir.exists()
    client = MlflowClient(ref.tracking_uri)
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.lifecycle_stage == "deleted" and "hescape.superseded" in run.data.tags
    assert client.search_runs([ref.experiment_id]) == []  # the UI's default view is clean


def test_a_study_stopped_before_its_first_trial_does_not_block_the_rerun(tmp_path):
    from hescape.config import ConfigError, load_config
    from hescape.study.driver import _write_study_json, preflight, study_dir_of

    cfg = load_config(TINY, [f"storage_dir={tmp_path / 'runs'}"])
    _write_study_json(study_dir_of(cfg), cfg, TINY, tracking_uri="sqlite:///x", started=False)
    pre = preflight(cfg, source=TINY, resume=False, overwrite=False, probe=False)
    assert pre.replace and "stopped before its first trial" in pre.notes[0]
    _write_study_json(study_dir_of(cfg), cfg, TINY, tracking_uri="sqlite:///x", started=True)
    with pytest.raises(ConfigError, match="(?s)already exists.*--resume.*--overwrite"):
        preflight(cfg, source=TINY, resume=False, overwrite=False, probe=False)


@pytest.mark.slow
def test_failure_before_the_first_trial_rolls_back(tmp_path, monkeypatch):
    """A study that fails in its shared preprocessing (after its parent run opened) leaves
    no study directory and no live MLflow run: the corrected re-run is not refused."""
    from mlflow.tracking import MlflowClient

    from hescape.config import load_config
    from hescape.study import driver

    def broken(*a, **k):
        raise ValueError("preprocessing failed")

    monkeypatch.setattr(driver, "precompute", broken)
    cfg = load_config(TINY, [f"storage_dir={tmp_path / 'runs'}"])
    try:
        with pytest.raises(ValueError, match="preprocessing failed"):
            driver.run_study(cfg, source=TINY, progress=False)
    finally:
        import ray

        ray.shutdown()
    assert not driver.study_dir_of(cfg).exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.name)
    assert client.search_runs([exp.experiment_id]) == []  # the parent run is deleted
    driver.preflight(cfg, source=TINY, resume=False, overwrite=False, probe=False)


def test_all_trials_failed_is_one_paragraph_and_exit_1(tmp_path, monkeypatch, capsys):
    from hescape.config import load_config
    from hescape.study import lineage
    from hescape.study.driver import StudyFailed, _raise_if_all_failed
    from hescape.tracking import resolve_tracking_uri

    cfg = load_config(TINY, [f"storage_dir={tmp_path / 'runs'}"])
    ref = lineage.open_parent(resolve_tracking_uri(None, tmp_path / "runs"), "x", "x",
                              resume=False, tags={})
    for i in range(3):
        kid = lineage.open_child(ref, f"t{i}", existing=None, name=f"t{i}", tags={})
        lineage.finish_run(ref, kid, "FAILED", error="ValueError: need at least one array to "
                           "concatenate\nTraceback (most recent call last): ...")
    with pytest.raises(StudyFailed) as err:
        _raise_if_all_failed(cfg, ref, tmp_path)
    text = str(err.value)
    assert "all 3 trial(s) failed" in text and "3x 'ValueError: need at least one array" in text
    assert "\n" not in text and "Traceback" not in text
    kid = lineage.open_child(ref, "ok", existing=None, name="ok", tags={})
    lineage.finish_run(ref, kid, "FINISHED")
    _raise_if_all_failed(cfg, ref, tmp_path)  # one finished trial: a study with a report

    import hescape.study as study_api
    from hescape.cli.study import run_from_args

    def fail(*a, **k):
        raise StudyFailed(text)

    monkeypatch.setattr(study_api, "run_study_file", fail)
    import argparse

    from hescape.cli.study import add_run_arguments

    p = argparse.ArgumentParser()
    add_run_arguments(p)
    assert run_from_args(p.parse_args([TINY])) == 1
    assert "all 3 trial(s) failed" in capsys.readouterr().err


def test_trials_that_failed_before_their_run_still_fail_the_study(tmp_path):
    """Every trial raised before it opened its MLflow run (its config, its inputs): the study
    does not pass with an empty report; the message quotes Tune's first error file."""
    from hescape.config import load_config
    from hescape.study import lineage
    from hescape.study.driver import StudyFailed, _raise_if_all_failed
    from hescape.tracking import resolve_tracking_uri

    cfg = load_config(TINY, [f"storage_dir={tmp_path / 'runs'}"])
    ref = lineage.open_parent(resolve_tracking_uri(None, tmp_path / "runs"), "x", "x",
                              resume=False, tags={})
    trial = tmp_path / "study" / "tune" / "search" / "run_trial_1"
    trial.mkdir(parents=True)
    (trial / "error.txt").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for StudyConfig\n"
        "train.bogus\n  Extra inputs are not permitted\n    For further information visit x\n")
    with pytest.raises(StudyFailed) as err:
        _raise_if_all_failed(cfg, ref, tmp_path / "study")
    text = str(err.value)
    assert "no trial started" in text and "ValidationError" in text and "train.bogus" in text
    assert "error.txt" in text and "\n" not in text
