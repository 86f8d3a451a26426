"""Donor cross-validation in the report: the k fold trials of one configuration and seed
become one replicate.

With ``eval.donor_folds`` a configuration is trained and evaluated once per donor fold
(``data.fold``): each fold has its own train/val/test donors, and every donor is a test
donor in exactly one fold. For the statistics the k fold trials of one (configuration,
seed) are one replicate: its per-donor table is the union of the folds' (every donor
once), its metrics the mean over folds (a fold-averaged figure, as HEST-Benchmark averages
over patient folds; whole-set retrieval is computed within each fold's test donors). A
replicate with a fold missing or not finished is left out, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from hescape.study.space import FOLD_KEY, SEED_KEY, config_id


def merge_folds(
    rows: Sequence[dict[str, Any]], per_donor: Mapping[str, pd.DataFrame], k: int | None,
) -> tuple[list[dict[str, Any]], dict[str, pd.DataFrame], list[str]]:
    """(rows with each complete fold group merged into one row, per-donor tables keyed by
    the merged rows' ids, notes on incomplete groups). Rows without a fold pass through."""
    out: list[dict[str, Any]] = []
    tables = dict(per_donor)
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if FOLD_KEY not in row["sweep_params"]:
            out.append(row)
            continue
        key = (row.get("phase", ""), config_id(row["sweep_params"]),
               str(row["sweep_params"].get(SEED_KEY, row.get("seed", ""))))
        groups.setdefault(key, []).append(row)
    notes = []
    for (phase, cid, seed), group in groups.items():
        done = {int(r["sweep_params"][FOLD_KEY]): r for r in group if r["status"] == "FINISHED"}
        need = set(range(k)) if k else set(done)
        merged = _merge(group, done, need, phase, seed)
        if merged["status"] != "FINISHED":
            missing = sorted(need - set(done))
            notes.append(f"{phase} {cid} seed={seed}: fold(s) {missing} not finished; this "
                         "replicate is left out of the fold-averaged tables")
        elif all(r["trial_id"] in per_donor for r in done.values()):
            tables[merged["trial_id"]] = pd.concat(
                [per_donor[r["trial_id"]] for _, r in sorted(done.items())], ignore_index=True)
        for r in group:
            tables.pop(r["trial_id"], None)
        out.append(merged)
    return out, tables, notes


def _merge(group: list[dict[str, Any]], done: dict[int, dict[str, Any]], need: set[int],
           phase: str, seed: str) -> dict[str, Any]:
    first = sorted(group, key=lambda r: r["trial_id"])[0]
    complete = bool(need) and need <= set(done)
    rows = [done[f] for f in sorted(need)] if complete else list(done.values())
    metrics: dict[str, float] = {}
    if rows:
        shared = set.intersection(*(set(r["metrics"]) for r in rows))
        for key in sorted(shared):
            values = [float(r["metrics"][key]) for r in rows]
            if all(math.isfinite(v) for v in values):
                metrics[key] = float(np.mean(values))
    return {
        **first,
        "trial_id": f"{first['trial_id']}+cv{len(need)}",
        "name": f"{first.get('name', first['trial_id'])} (mean of {len(need)} donor folds)",
        "status": "FINISHED" if complete else "INCOMPLETE",
        "sweep_params": {k: v for k, v in first["sweep_params"].items() if k != FOLD_KEY},
        "metrics": metrics, "folds": len(need), "fold_trials": [r["trial_id"] for r in rows],
        "phase": phase, "seed": seed,
    }
