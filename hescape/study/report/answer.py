"""The report's first section: per swept factor, the answer the study gives.

For each factor: the design the answer rests on (controlled and replicated: the confirm
phase or a seeded grid; else the search's marginal comparison, labelled as such), the
verdict with its 95% interval on the objective's held-out counterpart and on each headline
effect metric, and, where there is no verdict, what would give one (``effects.needs_text``:
seeds and donors estimated from the observed variance components). It reads the factor
effects table (``tables.effect_table``); it computes nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from hescape.study.report.effects import NEEDS_REPLICATES, NOT_DISTINGUISHABLE

CLAIMS = ("higher than reference", "lower than reference")


def objective_metric(objective: str) -> str:
    """The held-out (per-donor) counterpart of a validation objective: ``val/x`` -> ``x``."""
    return objective.split("/", 1)[1] if objective.startswith(("val/", "test/")) else objective


def _preferred(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows an answer rests on: controlled (replicated) comparisons when the factor has
    any, else the marginal ones; and the design label."""
    controlled = rows[rows["comparison"] == "controlled"]
    if len(controlled):
        return controlled, "controlled"
    return rows, "marginal"


def _interval(r: pd.Series) -> str:
    if not math.isfinite(r["delta"]):
        return "no value"
    if not math.isfinite(r["ci_low"]):
        return f"{r['delta']:+.3f} (no interval)"
    return f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def _design_words(rows: pd.DataFrame, kind: str, plan: dict[str, Any] | None,
                  folds: int | None, factor: str) -> str:
    seeds = int(rows["n_seeds"].max()) if len(rows) else 0
    donors = int(rows["n_donors"].max()) if len(rows) else 0
    if kind == "marginal":
        return (f"marginal (search trials: the levels also differ in what the search chose; "
                f"{donors} held-out donors), not a controlled comparison")
    confirmed = bool(plan and factor in (plan.get("factors") or {})
                     and "skipped" not in plan["factors"][factor])
    where = ("confirm phase: the searched best configuration at each level" if confirmed
             else "grid: blocks matched on seed and the other factors" if
             rows["design"].astype(str).str.startswith("paired").any()
             else "levels differing in this factor only")
    fold = f", {folds} donor folds (every donor tested once)" if folds else ""
    return f"controlled, replicated ({where}; {seeds} seeds per level{fold}; {donors} donors)"


def _overall(verdicts: Sequence[str]) -> str:
    if any(v in CLAIMS for v in verdicts):
        return "**matters**"
    if verdicts and all(v == NOT_DISTINGUISHABLE for v in verdicts):
        return "**no difference detected** at this design's resolution"
    if any(v == NOT_DISTINGUISHABLE for v in verdicts):
        return "**no difference detected** where measurable; the rest has **no verdict**"
    return "**no verdict**"


def answer_items(table: pd.DataFrame, objective: str, plan: dict[str, Any] | None = None,
                 folds: int | None = None) -> list[str]:
    """One bullet per (protocol, factor) of the effects ``table``, in words."""
    if table.empty:
        return []
    target = objective_metric(objective)
    items = []
    protocols = list(dict.fromkeys(table["protocol"]))
    for proto in protocols:
        part = table[table["protocol"] == proto]
        for factor in dict.fromkeys(part["factor"]):
            rows, kind = _preferred(part[part["factor"] == factor])
            metrics = sorted(dict.fromkeys(rows["metric"]), key=lambda m: (m != target, m))
            lines = []
            for level in dict.fromkeys(rows["level"]):
                at = rows[rows["level"] == level]
                ref = str(at["reference"].iloc[0])
                parts = []
                for metric in metrics:
                    r = at[at["metric"] == metric]
                    if r.empty:
                        continue
                    r = r.iloc[0]
                    text = f"`{metric}`{' (objective)' if metric == target else ''} " \
                           f"{_interval(r)} {r['verdict']}"
                    parts.append(text)
                needs = [str(n) for n in at["needs"] if isinstance(n, str) and n]
                what = f" To resolve: {needs[0]}." if needs else ""
                lines.append(f"{level} vs {ref}: " + "; ".join(parts) + "." + what)
            head = f"`{factor}`" + (f" ({proto} trials)" if len(protocols) > 1 else "")
            skipped = ((plan or {}).get("factors") or {}).get(factor, {}).get("skipped")
            why = f" Not in the confirm phase: {skipped}." if skipped and kind == "marginal" else ""
            items.append(f"{head}: {_overall(list(rows['verdict']))}. Design: "
                         f"{_design_words(rows, kind, plan, folds, factor)}.{why} "
                         + " ".join(lines))
    return items


def no_verdict_reason(table: pd.DataFrame) -> str | None:
    """A sentence when no comparison of the table has a verdict, else None."""
    if table.empty:
        return None
    if (table["verdict"] == NEEDS_REPLICATES).all():
        return ("No factor has a verdict: every level ran with one seed, so training-seed "
                "variation is unmeasured. Run each level with >= 3 seeds (`sweep.seeds`) or "
                "the confirm phase (`sweep.confirm`).")
    return None
