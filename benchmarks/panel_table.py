"""The panel-scaling results as JSON and a markdown table (time, peak RSS, exponents)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.panel_stages import STAGES


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,d}"


def _cells(row: dict[str, Any] | None) -> list[str]:
    if not row:
        return ["", ""]
    if "skipped" in row:
        return ["skipped", ""]
    if "work_s" not in row:
        return ["failed", ""]
    return [_fmt(row["work_s"], 1), _fmt(row["peak_rss_mib"])]


def _exp(pairs: list[dict[str, Any]], n1: int, n2: int) -> list[str]:
    hit = next((p for p in pairs if p["from"] == n1 and p["to"] == n2), None)
    if hit is None:
        return ["", "", ""]
    return [_fmt(hit["time"], 2), _fmt(hit["rss"], 2), _fmt(hit["rss_growth"], 2)]


def _totals(results: dict[str, Any], sizes: list[int]) -> list[str]:
    """Whole pipeline: summed work time; memory as the largest stage (stages run one after
    another) and, as an upper bound for one process doing every stage without freeing
    anything, the largest start RSS plus every stage's growth."""
    cells = []
    for n in sizes:
        rows = [r for r in results[str(n)].values() if "work_s" in r]
        if len(rows) < len(STAGES):
            cells += ["(partial)", ""]
            continue
        bound = max(r["rss_before_mib"] for r in rows) + sum(r["rss_growth_mib"] for r in rows)
        cells += [_fmt(sum(r["work_s"] for r in rows), 1),
                  f"{max(r['peak_rss_mib'] for r in rows):,.0f} (bound {bound / 1024:,.1f} GiB)"]
    return cells


def markdown(results: dict[str, Any], exps: dict[str, list[dict[str, Any]]]) -> str:
    """Stage x size table: work seconds, peak RSS MiB; exponents between consecutive sizes."""
    sizes = sorted(int(n) for n in results)
    pairs = list(zip(sizes, sizes[1:], strict=False))
    head = ["stage"]
    for n in sizes:
        head += [f"{_label(n)}: s", f"{_label(n)}: peak RSS MiB"]
    for n1, n2 in pairs:
        head += [f"a {_label(n1)}->{_label(n2)}", f"b {_label(n1)}->{_label(n2)}",
                 f"b growth {_label(n1)}->{_label(n2)}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for stage in STAGES:
        cells = [stage]
        for n in sizes:
            cells += _cells(results[str(n)].get(stage))
        for n1, n2 in pairs:
            cells += _exp(exps.get(stage, []), n1, n2)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **pipeline** | " + " | ".join(_totals(results, sizes)
                                                  + [""] * 3 * len(pairs)) + " |")
    notes = [f"- N={n:,d} {stage}: {row.get('skipped') or row.get('error', '')[:200]}"
             for n in sizes for stage, row in results[str(n)].items()
             if "work_s" not in row]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_outputs(path: Path, results: dict[str, Any], exps: dict[str, Any],
                  machine: dict[str, Any], *, quiet: bool = False) -> None:
    """``path`` (JSON: results, exponents, machine) and ``path.with_suffix('.md')``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data = {"updated": stamp, "machine": machine, "results": results, "exponents": exps,
            "setup": "16 donors, 380 genes, 64 px patches (simulator scale-* presets); "
                     "experiments/demo.yaml (efficientnet_lite0 frozen at 64 px), no sweep"}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md = (f"Panel scaling, updated {stamp} ({machine['cpus']} CPUs, "
          f"{machine['mem_total_gib']:.1f} GiB). s = seconds of the stage's work (imports "
          "excluded); a: time ~ N^a, b: peak RSS ~ N^b, b growth: RSS above the process's "
          "start ~ N^b.\n\n" + markdown(results, exps))
    path.with_suffix(".md").write_text(md)
    if not quiet:
        print(md)
