"""benchmarks/moasha.py at smoke size: records real curves, replays every arm on the same
streams, writes its table (issue 21.4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains 6 tiny configurations (about a minute on 2 cores)


def test_moasha_benchmark_smoke_writes_its_table(tmp_path: Path) -> None:
    from benchmarks.moasha import ARMS, hypervolume_2d, main

    assert hypervolume_2d([[1, 1]]) == 1.0 and hypervolume_2d([[2, 1], [1, 2]]) == 3.0
    assert hypervolume_2d([[2, 1], [1, 2], [1, 1]]) == 3.0  # a dominated point adds nothing
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "moasha_smoke.json").read_text())
    assert {r["arm"] for r in data["rows"]} == set(ARMS) and data["meta"]["seeds"] >= 3
    none = [r for r in data["rows"] if r["arm"] == "none"]
    assert all(r["started"] == data["meta"]["trials"] == r["finished"] for r in none)
    # no stopping reaches its own final front by its budget (earlier when the last trials
    # to finish add nothing to it)
    assert all(0 < r["time_to_target_frac"] <= 1.0 + 1e-9 for r in none)
    table = (tmp_path / "moasha_smoke.md").read_text()
    assert "| MO-ASHA (both objectives) |" in table and "no early stopping" in table
