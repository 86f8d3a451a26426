"""The test helper that starts Ray nodes retries only Ray's start-up timeout."""

from __future__ import annotations

import sys

from tests.reliability.ray_nodes import start_node


def _cmd(tmp_path, message: str) -> list[str]:
    """A stand-in for `ray start` that counts its calls and fails with ``message``."""
    script = tmp_path / "fake_ray_start.py"
    script.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(tmp_path / 'calls')!r})\n"
        "p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))\n"
        "sys.stderr.write(sys.argv[1])\nsys.exit(1)\n")
    return [sys.executable, str(script), message]


def test_startup_timeout_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    out = start_node(_cmd(tmp_path, "Exception: The current node timed out during startup."),
                     str(tmp_path / "none"), {}, attempts=3)
    assert out.returncode == 1 and (tmp_path / "calls").read_text() == "3"


def test_other_failures_are_returned_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    out = start_node(_cmd(tmp_path, "port 6379 already in use"), str(tmp_path / "none"), {})
    assert out.returncode == 1 and "already in use" in out.stderr
    assert (tmp_path / "calls").read_text() == "1"
