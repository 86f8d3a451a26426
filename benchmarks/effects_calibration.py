"""Factor-effect intervals: false-claim rate and power by simulation.

The report's factor effects (``hescape.study.report.effects``) claim "higher/lower than reference"
when the 95% interval of a difference excludes 0. This script simulates per-donor result
tables with a known truth and measures, per design, held-out donor count and seeds per
level, how often the production interval (``difference_intervals``, the same code and
settings the report uses; the verdict rule ``replicates_suffice`` too) makes a claim:

- false-claim rate (FCR): the factor has no effect, the interval excludes 0 anyway;
- power: the factor moves the metric by ``--effect`` residual SDs on every donor on average.

Per-donor value of a run ``t`` of level ``l`` on donor ``d`` (in residual-SD units):
``effect * l + a_d + b_ld + s_t + e_td`` with donor difficulty ``a_d ~ N(0, 1)`` (shared by
the levels), donor x level interaction ``b_ld`` (the per-donor effect has SD ``--interaction``
= 0.5), the run's seed shift ``s_t ~ N(0, seed_sd)`` (seed_sd 0, 0.5, 1) and residual
``e_td ~ N(0, 1)``. Donors are weighted by spots (log-uniform 300-3000 per donor) for the
recall rows, unweighted for the Pearson rows.

Designs:

- controlled: every trial shares the other factors (a one-factor sweep over seeds, the
  confirm phase): ``seeds`` runs per level, independent seed shifts;
- paired: a grid, the factor crossed with a second factor (2 settings, a main effect of SD
  1 that pairing cancels) and ``seeds`` seeds: 2 x seeds blocks of one trial per level; the
  two trials of a block share half the seed variance (same seed and other settings).

One seed per level gives no verdict (controlled: a level with one run; paired: 2 blocks
give 1 degree of freedom for seed variation); the table says so rather than a rate.

    python -m benchmarks.effects_calibration            # 10,000 null + 2,000 power runs per
                                                        # cell (~30-45 min on 2 busy cores)
    python -m benchmarks.effects_calibration --smoke    # a few cells, 100 runs (seconds)
    python -m benchmarks.effects_calibration --runs 2000 --donors 3,20

Results: ``benchmarks/results/effects_calibration.{json,md}`` (``effects_calibration_smoke.*``
with ``--smoke``); the markdown table is printed too. Not a timed test: nothing asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hescape.atomic import write_json, write_text  # noqa: E402
from hescape.study.report.effects import (  # noqa: E402
    EffectSettings,
    difference_intervals,
    replicates_suffice,
)

RESULTS = REPO / "benchmarks" / "results"
DESIGNS = ("controlled", "paired")
TARGET = (3.0, 7.0)  # FCR band (%) wherever a verdict is given, with seed noise
CHUNK = 500  # runs simulated and evaluated at once (memory: CHUNK x draws floats)


@dataclass(frozen=True)
class Cell:
    design: str
    weighted: bool
    seed_sd: float
    donors: int
    seeds: int


def units(cell: Cell) -> list[int]:
    """Replicates per group as the report forms them (paired: blocks, one group)."""
    return [2 * cell.seeds] if cell.design == "paired" else [cell.seeds, cell.seeds]


def simulate(rng: np.random.Generator, cell: Cell, runs: int, effect: float,
             interaction: float, shared: float = 0.5) -> tuple[list[tuple[float, np.ndarray]],
                                                               np.ndarray]:
    """``runs`` studies of one cell: (replicate groups, donor weights) for the interval."""
    d, n = cell.donors, cell.seeds
    a = rng.normal(0, 1, (runs, 1, d))
    b = rng.normal(0, interaction / math.sqrt(2), (2, runs, 1, d))
    if cell.weighted:
        w = np.exp(rng.uniform(math.log(300), math.log(3000), (runs, d)))
    else:
        w = np.ones((runs, d))
    if cell.design == "controlled":
        x = [effect * lv + a + b[lv] + rng.normal(0, cell.seed_sd, (runs, n, 1))
             + rng.normal(0, 1, (runs, n, d)) for lv in (0, 1)]
        return [(1.0, x[1]), (-1.0, x[0])], w
    blocks = 2 * n
    other = np.repeat(rng.normal(0, 1, (runs, 2, 1)), n, axis=1)
    common = rng.normal(0, cell.seed_sd * math.sqrt(shared), (runs, blocks, 1))
    x = [effect * lv + a + b[lv] + other + common
         + rng.normal(0, cell.seed_sd * math.sqrt(1 - shared), (runs, blocks, 1))
         + rng.normal(0, 1, (runs, blocks, d)) for lv in (0, 1)]
    return [(1.0, x[1] - x[0])], w


def claim_rate(rng: np.random.Generator, cell: Cell, runs: int, effect: float,
               interaction: float, settings: EffectSettings) -> float:
    """Share of ``runs`` simulated studies whose interval excludes 0."""
    claims = 0
    for start in range(0, runs, CHUNK):
        k = min(CHUNK, runs - start)
        groups, w = simulate(rng, cell, k, effect, interaction)
        iv = difference_intervals(groups, w, settings, rng)
        claims += int(np.sum(np.abs(iv.delta) > iv.half))
    return claims / runs


def run_cell(cell: Cell, args: argparse.Namespace, settings: EffectSettings) -> dict[str, Any]:
    rec: dict[str, Any] = {"design": cell.design, "weighted": cell.weighted,
                           "seed_sd": cell.seed_sd, "donors": cell.donors,
                           "seeds": cell.seeds, "runs": args.runs,
                           "power_runs": args.power_runs}
    if not replicates_suffice(units(cell), settings):
        return {**rec, "verdict": False}
    rng = np.random.default_rng([args.seed, zlib.crc32(repr(cell).encode())])
    fcr = claim_rate(rng, cell, args.runs, 0.0, args.interaction, settings)
    power = claim_rate(rng, cell, args.power_runs, args.effect, args.interaction, settings)
    return {**rec, "verdict": True, "fcr": fcr, "fcr_se": math.sqrt(fcr * (1 - fcr) / args.runs),
            "power": power}


def _fmt(rec: dict[str, Any]) -> str:
    if not rec["verdict"]:
        return "no verdict"
    flag = "" if rec["seed_sd"] == 0 or TARGET[0] <= 100 * rec["fcr"] <= TARGET[1] else " (!)"
    return f"{100 * rec['fcr']:.1f}{flag} / {100 * rec['power']:.0f}"


def markdown(cells: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Tables per metric weighting: FCR % / power % per design, seed noise, donors, seeds."""
    seeds = sorted({c["seeds"] for c in cells})
    out = [f"False-claim rate % / power % of a {meta['effect']:g}-residual-SD effect, "
           f"{meta['runs']} / {meta['power_runs']} simulated studies per cell (Monte-Carlo "
           "SE of a 5% rate: "
           f"{100 * math.sqrt(0.05 * 0.95 / meta['runs']):.1f} points); nominal 5%, target "
           f"{TARGET[0]:g}-{TARGET[1]:g}% wherever a verdict is given with seed noise "
           "((!) marks a cell outside). Seed SD in residual SDs; donor x level SD "
           f"{meta['interaction']:g}.", ""]
    for weighted, title in ((False, "Pearson-like (donors unweighted)"),
                            (True, "recall-like (donors weighted by spots)")):
        out += [f"**{title}**", "",
                "| design | seed SD | donors | " + " | ".join(
                    f"{s} seed{'s' if s > 1 else ''}" for s in seeds) + " |",
                "|---|---:|---:|" + "---:|" * len(seeds)]
        keyed = {(c["design"], c["seed_sd"], c["donors"], c["seeds"]): c
                 for c in cells if c["weighted"] == weighted}
        for design in DESIGNS:
            for sd in sorted({c["seed_sd"] for c in cells}):
                for donors in sorted({c["donors"] for c in cells}):
                    row = [keyed.get((design, sd, donors, s)) for s in seeds]
                    if not any(row):
                        continue
                    out.append(f"| {design} | {sd:g} | {donors} | " + " | ".join(
                        _fmt(r) if r else "" for r in row) + " |")
        out.append("")
    given = [c for c in cells if c["verdict"] and c["seed_sd"] > 0]
    if given:
        rates = [100 * c["fcr"] for c in given]
        inside = sum(TARGET[0] <= r <= TARGET[1] for r in rates)
        out.append(f"With seed noise: FCR {min(rates):.1f}-{max(rates):.1f}% over {len(given)} "
                   f"cells with a verdict, {inside} inside {TARGET[0]:g}-{TARGET[1]:g}%.")
    calm = [100 * c["fcr"] for c in cells if c["verdict"] and c["seed_sd"] == 0]
    if calm:
        out.append(f"Without seed noise (outside the target: the interval cannot know that "
                   f"the seed variance is 0): FCR {min(calm):.1f}-{max(calm):.1f}%.")
    out.append(f"\nReproduce: `{meta['command']}` ({meta['seconds']:.0f} s, {meta['when']}).")
    return "\n".join(out) + "\n"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few cells, 100 runs each")
    ap.add_argument("--runs", type=int, default=10_000, help="null studies per cell (FCR)")
    ap.add_argument("--power-runs", type=int, default=2000, help="studies per cell (power)")
    ap.add_argument("--donors", type=_ints, default=[3, 5, 8, 12, 20])
    ap.add_argument("--seeds", type=_ints, default=[1, 2, 3, 5], help="seeds per level")
    ap.add_argument("--seed-sd", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.0, 0.5, 1.0], help="seed shift SD (residual SDs)")
    ap.add_argument("--effect", type=float, default=1.0, help="planted effect (residual SDs)")
    ap.add_argument("--interaction", type=float, default=0.5, help="donor x level SD")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.runs, args.donors, args.seeds, args.seed_sd = 100, [3, 8], [1, 3], [0.0, 1.0]
        args.power_runs = 100
    return args


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    settings = EffectSettings()
    cells = [Cell(design, weighted, sd, donors, seeds) for design in DESIGNS
             for weighted in (False, True) for sd in args.seed_sd for donors in args.donors
             for seeds in args.seeds]
    start = time.perf_counter()
    records = [run_cell(c, args, settings) for c in tqdm(cells, desc="cells", file=sys.stderr)]
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.effects_calibration", *given])
    meta = {"runs": args.runs, "power_runs": args.power_runs, "effect": args.effect, "interaction": args.interaction,
            "settings": {k: getattr(settings, k) for k in ("level", "replicate_bound",
                                                           "donor_bound", "draws",
                                                           "min_replicate_df", "min_donors")},
            "seconds": time.perf_counter() - start, "command": command,
            "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    table = markdown(records, meta)
    stem = "effects_calibration_smoke" if args.smoke else "effects_calibration"
    write_json(args.out / f"{stem}.json", {"meta": meta, "cells": records})
    write_text(args.out / f"{stem}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
