"""The panel-scaling harness: size parsing, growth exponents, table, and a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.panel_scaling import exponents, parse_args, parse_sizes  # noqa: E402
from benchmarks.panel_stages import STAGES  # noqa: E402
from benchmarks.panel_table import markdown  # noqa: E402


def test_sizes_and_stages_parse():
    assert parse_sizes("50k,10k,2000,10k") == [2000, 10_000, 50_000]
    args = parse_args(["--sizes", "2k", "--stages", "trial,simulate"])
    assert args.sizes == [2000] and args.stages == ["simulate", "trial"]  # pipeline order
    with pytest.raises(SystemExit):
        parse_args(["--stages", "simulate,nope"])


def _row(work: float, peak: float, before: float = 100.0) -> dict:
    return {"work_s": work, "wall_s": work + 5, "peak_rss_mib": peak, "rss_before_mib": before,
            "rss_growth_mib": peak - before, "peak_anon_mib": 0.0, "peak_file_mib": 0.0}


def test_exponents_recover_the_power_law():
    """time ~ N^2 and memory growth ~ N^1 come back as a = 2, b growth = 1."""
    results = {str(n): {"trial": _row(1e-6 * n**2, 100.0 + 0.01 * n)}
               for n in (10_000, 50_000, 200_000)}
    pairs = exponents(results)["trial"]
    assert [(p["from"], p["to"]) for p in pairs] == [(10_000, 50_000), (50_000, 200_000),
                                                    (10_000, 200_000)]  # + smallest->largest
    for p in pairs:
        assert p["time"] == pytest.approx(2.0) and p["rss_growth"] == pytest.approx(1.0)
        assert 0 < p["rss"] < 1  # the constant start RSS flattens the raw peak's exponent
    results["200000"]["trial"] = {"skipped": "needs ~30 GiB"}
    assert len(exponents(results)["trial"]) == 1  # a skipped size yields no exponent
    table = markdown(results, exponents(results))
    # seconds per size, a 10k->200k (none: skipped), peak RSS per size, b and b growth
    assert "| trial | 100.0 | 2,500.0 | skipped |  | 200 | 600 |  |  |  |" in table
    assert "| trial | 2.00 | 0.68 | 1.00 |" in table  # the per-pair table: 10k->50k
    assert "N=200,000 trial: needs ~30 GiB" in table


def test_one_trial_total_counts_the_costliest_variant_once():
    """The 'one trial' row: non-preprocessing stages plus the slowest variant (not every
    variant, not the fixed-epoch scVI diagnostic); partial until each of them is measured."""
    from benchmarks.panel_table import _totals

    rows = {s: _row(1.0, 150.0) for s in ("simulate", "validate", "features", "trial")}
    rows |= {"pre_none": _row(2.0, 150.0), "pre_scvi": _row(30.0, 400.0),
             "pre_scvi_10ep": _row(500.0, 900.0)}
    assert _totals({"1000": rows}, [1000]) == ["(partial)", ""]  # evaluate missing
    rows["evaluate"] = _row(4.0, 200.0)
    secs, mem = _totals({"1000": rows}, [1000])
    assert secs == "38.0"  # 4 x 1 + 4 (evaluate) + 30 (scVI)
    assert mem.startswith("400 (bound")


@pytest.mark.slow
def test_harness_runs_every_stage_at_a_tiny_size(tmp_path: Path) -> None:
    """Every stage in its own process at 320 spots (scVI, DRVI: 2 epochs): time, peak RSS
    and the stage's output land in the JSON, the table in the markdown."""
    out = tmp_path / "scaling.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.panel_scaling", "--sizes", "320", "--steps", "10",
         "--workdir", str(tmp_path / "work"), "--out", str(out), "--stop-on-error",
         "--set", "preprocess.expression.scvi.max_epochs=2",
         "--set", "preprocess.expression.drvi.max_epochs=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]["320"]
    assert list(rows) == list(STAGES)
    for stage, row in rows.items():
        assert row["work_s"] > 0 and row["peak_rss_mib"] > 0, (stage, row)
    assert rows["simulate"]["info"]["n_obs"] == 320
    assert rows["features"]["info"]["shape"][0] == 320
    assert rows["pre_harmony"]["info"]["variant"]["harmony"]["mode"] == "inductive"
    assert rows["evaluate"]["info"]["n_metrics"] > 0
    assert 0 < rows["trial_eval"]["info"]["n_metrics"] < rows["evaluate"]["info"]["n_metrics"]
    marginal = next(line for line in out.with_suffix(".md").read_text().splitlines()
                    if line.startswith("| **a trial's marginal cost"))
    assert "+" in marginal  # training + evaluation
    one_trial = next(line for line in out.with_suffix(".md").read_text().splitlines()
                     if line.startswith("| **one trial**"))
    assert "(partial)" not in one_trial and "bound" in one_trial


@pytest.mark.slow
def test_packed_trials_smoke_on_a_fake_gpu(tmp_path: Path) -> None:
    """K = 1 and 2 head-only trials per (fake) GPU run through Tune; the table is printed."""
    out = tmp_path / "packed.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.packed_trials", "--smoke", "--workdir",
         str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["k"], r["concurrency"], r["trials_ok"]) for r in rows] == [(1, 1, 2), (2, 2, 2)]
    assert "| K per GPU |" in proc.stdout
