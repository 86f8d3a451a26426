"""The panel-scaling results as JSON and a markdown table (time, peak RSS, exponents)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.panel_stages import STAGES


def size_pairs(sizes: list[int]) -> list[tuple[int, int]]:
    """Consecutive sizes, plus smallest -> largest when there are more than two."""
    pairs = list(zip(sizes, sizes[1:], strict=False))
    return pairs + [(sizes[0], sizes[-1])] if len(sizes) > 2 else pairs


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


def _one_trial(rows: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stages one trial goes through: simulate/import, validate, its preprocessing variant
    (the costliest measured, by time: a study computes each of its variants once), the feature
    cache, the trial and its evaluation. None unless every one was measured."""
    done = {k: r for k, r in rows.items() if "work_s" in r}
    variants = [r for k, r in done.items() if k.startswith("pre_") and k != "pre_scvi_10ep"]
    rest = [done.get(k) for k in ("simulate", "validate", "features", "trial", "evaluate")]
    if not variants or any(r is None for r in rest):
        return None
    return [*rest, max(variants, key=lambda r: r["work_s"])]


def _totals(results: dict[str, Any], sizes: list[int]) -> list[str]:
    """One trial's pipeline (``_one_trial``): summed work time; memory as the largest stage
    (stages run one after another) and, as an upper bound for one process doing every stage
    without freeing anything, the largest start RSS plus every stage's growth."""
    cells = []
    for n in sizes:
        rows = _one_trial(results[str(n)])
        if rows is None:
            cells += ["(partial)", ""]
            continue
        bound = max(r["rss_before_mib"] for r in rows) + sum(r["rss_growth_mib"] for r in rows)
        cells += [_fmt(sum(r["work_s"] for r in rows), 1),
                  f"{max(r['peak_rss_mib'] for r in rows):,.0f} (bound {bound / 1024:,.1f} GiB)"]
    return cells


def _marginal(results: dict[str, Any], sizes: list[int]) -> list[str]:
    """What one more trial costs in a study (the shared work is done once): its training and
    its evaluation as a study trial runs it; "" where either was not measured."""
    cells = []
    for n in sizes:
        rows = [results[str(n)].get(k) or {} for k in ("trial", "trial_eval")]
        if all("work_s" in r for r in rows):
            t, e = (r["work_s"] for r in rows)
            cells.append(f"{t + e:,.1f} ({t:,.1f} + {e:,.1f})")
        else:
            cells.append("")
    return cells


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict[str, Any], exps: dict[str, list[dict[str, Any]]]) -> str:
    """Two tables. Stage x size: work seconds and peak RSS MiB, with the exponents between
    the smallest and largest size; then the exponents between every pair of sizes."""
    sizes = sorted(int(n) for n in results)
    pairs = size_pairs(sizes)
    span = [(sizes[0], sizes[-1])] if len(sizes) > 1 else []
    sl = [f"{_label(n1)}->{_label(n2)}" for n1, n2 in span]
    head = (["stage"] + [f"{_label(n)}: s" for n in sizes] + [f"a {x}" for x in sl]
            + [f"{_label(n)}: peak RSS MiB" for n in sizes] + [f"b {x}" for x in sl]
            + [f"b growth {x}" for x in sl])
    lines = [_row(head), "|" + "---|" + "---:|" * (len(head) - 1)]
    for stage in STAGES:
        cells = [_cells(results[str(n)].get(stage)) for n in sizes]
        ex = [_exp(exps.get(stage, []), n1, n2) for n1, n2 in span]
        lines.append(_row([stage] + [c[0] for c in cells] + [e[0] for e in ex]
                          + [c[1] for c in cells] + [e[1] for e in ex] + [e[2] for e in ex]))
    totals = _totals(results, sizes)
    lines.append(_row(["**one trial** (costliest variant)"] + totals[0::2] + [""] * len(span) + totals[1::2]
                      + [""] * 2 * len(span)))
    marginal = _marginal(results, sizes)
    if any(marginal):
        lines.append(_row(["**a trial's marginal cost in a study** (trial + trial_eval)"]
                          + marginal + [""] * len(span) + [""] * len(sizes)
                          + [""] * 2 * len(span)))
    if len(pairs) > len(span):
        lines += ["", "Exponents between each pair of sizes (a: time, b: peak RSS, "
                  "g: RSS growth above the process's start):", ""]
        head = ["stage"] + [f"{k} {_label(n1)}->{_label(n2)}" for n1, n2 in pairs
                            for k in ("a", "b", "g")]
        lines += [_row(head), "|" + "---|" + "---:|" * (len(head) - 1)]
        for stage in STAGES:
            lines.append(_row([stage] + [v for n1, n2 in pairs
                                         for v in _exp(exps.get(stage, []), n1, n2)]))
    notes = [f"- N={n:,d} {stage}: {row.get('skipped') or row.get('error', '')[:200]}"
             for n in sizes for stage, row in results[str(n)].items()
             if "work_s" not in row]
    loads = [f"{_label(n)} {min(r['load_avg_at_start'] for r in results[str(n)].values() if 'load_avg_at_start' in r):.1f}-"
             f"{max(r['load_avg_at_start'] for r in results[str(n)].values() if 'load_avg_at_start' in r):.1f}"
             for n in sizes if any("load_avg_at_start" in r for r in results[str(n)].values())]
    if loads:
        notes.append("- load average at each stage's start: " + ", ".join(loads))
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
