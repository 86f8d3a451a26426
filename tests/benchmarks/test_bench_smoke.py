"""The benchmark harness runs end to end at smoke size (no timed assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.run import BENCHMARKS  # noqa: E402


@pytest.mark.slow
def test_bench_smoke_prints_table_and_writes_every_key(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| benchmark |" in proc.stdout
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert set(data["benchmarks"]) == set(BENCHMARKS)
    for key, rows in data["benchmarks"].items():
        assert rows, key
        assert not rows[0]["notes"].startswith("FAILED"), rows[0]["notes"]
        assert rows[0]["command"].startswith("python benchmarks/run.py --only " + key)
    assert (tmp_path / "smoke.md").read_text().count("\n| ") >= len(BENCHMARKS)


def test_only_rejects_unknown_benchmark() -> None:
    from benchmarks.run import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--only", "nope"])
    assert parse_args(["--only", "retrieval,memmap"]).keys == ["retrieval", "memmap"]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| samples/s |" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["split_ms"]) >= {"data", "forward", "backward", "optim"}
    assert result["flops_per_step"] > 0


def test_effects_calibration_smoke_writes_its_table(tmp_path: Path) -> None:
    """The factor-effect calibration (not a speed benchmark) runs at smoke size: one seed
    gives no verdict, every other cell a false-claim rate and a power."""
    from benchmarks.effects_calibration import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "effects_calibration_smoke.json").read_text())
    cells = data["cells"]
    assert {c["seeds"] for c in cells} == {1, 3} and len(cells) == 32
    assert all(not c["verdict"] for c in cells if c["seeds"] == 1)
    assert all(0 <= c["fcr"] <= 1 and 0 <= c["power"] <= 1 for c in cells if c["seeds"] == 3)
    table = (tmp_path / "effects_calibration_smoke.md").read_text()
    assert "| controlled | 1 | 8 | no verdict |" in table
