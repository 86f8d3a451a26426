"""The report's MO-ASHA section: what each rung promoted or stopped and why (dominated by
whom), and the search's validation Pareto front with the trials stopped early marked.

Reads the scheduler's decision log (``moasha.decisions_path``, written as the study ran) and
the trial rows (``results.trial_table``). A study without ``sweep.scheduler: moasha`` or
without a log gets no section.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hescape.config import StudyConfig
from hescape.study.moasha import DECISIONS_FILE, decisions_path, read_decisions
from hescape.study.pareto_rank import dominance_matrix, orient
from hescape.study.report.document import Document

MAX_ROWS = 200  # decisions listed in the table (the log holds them all)


def study_decisions(study_dir: str | Path) -> Path:
    """The search phase's decision log of the study in ``study_dir``."""
    return decisions_path(study_dir, "search")


def moasha_section(doc: Document, rows: Sequence[dict[str, Any]],
                   decisions: str | Path | dict[str, Any] | None, cfg: StudyConfig, *,
                   out: Path | None = None) -> None:
    """Append the section to ``doc`` (``decisions``: the log or its path); with ``out``, draw
    the front (``moasha_front.png``) there. Nothing when the study did not run MO-ASHA."""
    if cfg.sweep is None or cfg.sweep.scheduler != "moasha":
        return
    log = decisions if isinstance(decisions, dict) or decisions is None else read_decisions(decisions)
    doc.heading("Early stopping: MO-ASHA")
    if not log or not log.get("decisions"):
        doc.para("No MO-ASHA decision was recorded (no trial reached a rung with another "
                 "trial recorded there, or the decision log is missing).")
        return
    metrics, modes = list(log["metrics"]), list(log["modes"])
    decided = log["decisions"]
    doc.para(_summary(log))
    doc.table(rung_table(log))
    doc.heading("Decisions, in the order they were made", level=3)
    frame = decision_table(log, rows)
    doc.table(frame.head(MAX_ROWS))
    if len(frame) > MAX_ROWS:
        doc.para(f"({len(frame) - MAX_ROWS} more in the study's decision log, "
                 f"`scheduler/search_{DECISIONS_FILE}`)")
    front = validation_front(rows, decided, metrics, modes)
    doc.heading("Validation Pareto front of the search, trials stopped early marked", level=3)
    if front.empty:
        doc.para("(no search trial reported every objective)")
        return
    doc.para("Each search trial at its last validation report (a trial stopped early at the "
             "step it was stopped: less training than the finished ones). `on front`: not "
             "dominated by any other trial here. A trial stopped early that is on this front "
             "is one the scheduler stopped although nothing dominated it at its last report.")
    doc.table(front)
    lost = front[(front["status"] != "finished") & front["on front"]]
    if len(lost):
        doc.para("Stopped early yet on the front: " + ", ".join(f"`{t}`" for t in lost["trial"]))
    if out is not None and len(metrics) >= 2:
        doc.image(front_plot(front, metrics[:2], Path(out)))


def _summary(log: dict[str, Any]) -> str:
    objs = ", ".join(f"`{m}` ({mode})" for m, mode in zip(log["metrics"], log["modes"]))
    rungs = ", ".join(f"{m:g}" for m in log.get("milestones", []))
    eta = log.get("reduction_factor", 2)
    return (f"MO-ASHA over {objs}: at each rung ({log.get('time_attr', 'step')} {rungs}) a "
            f"trial is ranked with the trials recorded there before it ({log.get('tie_break')}) "
            f"and continues when its place is within ASHA's top 1/{eta:g} cutoff. `front` 0 = "
            "not dominated at that rung; `dominated by` lists the rung's trials at least as "
            "good on every objective and better on one.")


def rung_table(log: dict[str, Any]) -> pd.DataFrame:
    """Per rung: trials decided, promoted, stopped (stopped while on the first front)."""
    out = []
    for rung in sorted({d["rung"] for d in log["decisions"]}):
        at = [d for d in log["decisions"] if d["rung"] == rung]
        stopped = [d for d in at if d["decision"] == "stopped"]
        out.append({"rung (step)": int(rung) if float(rung).is_integer() else rung,
                    "decided": len(at), "promoted": len(at) - len(stopped),
                    "stopped": len(stopped),
                    "stopped on first front": sum(d["front"] == 0 for d in stopped)})
    return pd.DataFrame(out)


def why(d: dict[str, Any], eta: float = 2) -> str:
    """One decision in words."""
    where = f"place {d['place']} of {d['of']}"
    if d["decision"] == "promoted":
        if d["of"] == 1:
            return "first at this rung"
        return f"front {d['front']}, {where}: within the top 1/{eta:g}"
    if d["dominated_by"]:
        names = ", ".join(f"`{t}`" for t in d["dominated_by"][:6])
        more = f" and {len(d['dominated_by']) - 6} more" if len(d["dominated_by"]) > 6 else ""
        return f"dominated by {names}{more} ({where})"
    tie = (f"crowding distance {d['crowding']:.3g}" if np.isfinite(d["crowding"]) else
           "an extreme of the front like others ahead of it, then the objectives in order")
    return (f"on the rung's first front but {where}: the tie-break inside the front ({tie}) "
            f"put it below the top 1/{eta:g}")


def decision_table(log: dict[str, Any], rows: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """One row per decision: rung, trial, objective values, decision, front, why."""
    names = {r["trial_id"]: r.get("config_id", "") for r in rows}
    eta = log.get("reduction_factor", 2)
    out = []
    for d in log["decisions"]:
        row = {"rung": d["rung"], "trial": d["trial_id"], "config": names.get(d["trial_id"], "")}
        row.update({m: d["values"].get(m) for m in log["metrics"]})
        row.update({"decision": d["decision"], "front": d["front"], "why": why(d, eta)})
        out.append(row)
    return pd.DataFrame(out)


def validation_front(rows: Sequence[dict[str, Any]], decided: list[dict[str, Any]],
                     metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """Search trials at their last validation report: status (finished / stopped early at
    step s / other), objective values, and whether on the front of all of them."""
    stop_at = {d["trial_id"]: d["rung"] for d in decided if d["decision"] == "stopped"}
    pts = [r for r in rows if r.get("phase", "search") == "search"
           and all(m in r["metrics"] for m in metrics)]
    if not pts:
        return pd.DataFrame()
    values = np.array([[r["metrics"][m] for m in metrics] for r in pts], dtype=float)
    dominated = dominance_matrix(orient(values, modes)).any(axis=0)
    out = []
    for r, v, dom in zip(pts, values, dominated):
        tid = r["trial_id"]
        if tid in stop_at:
            status = f"stopped early at step {stop_at[tid]:g}"
        elif r["status"] == "FINISHED":
            status = "finished"
        else:
            status = r["status"].lower()
        out.append({"trial": tid, "config": r.get("config_id", ""), "status": status,
                    **dict(zip(metrics, v)), "on front": not bool(dom)})
    frame = pd.DataFrame(out)
    return frame.sort_values(["on front", metrics[0]], ascending=[False, modes[0] == "min"],
                             kind="stable").reset_index(drop=True)


def front_plot(front: pd.DataFrame, metrics: list[str], out: Path) -> Path:
    """The first two objectives: finished trials (dots), stopped early (crosses), the front
    in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hescape.atomic import atomic_path

    m1, m2 = metrics
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for stopped, marker, label in ((False, "o", "finished"), (True, "x", "stopped early")):
        part = front[front["status"].str.startswith("stopped") == stopped]
        for on, colour in ((True, "#d1495b"), (False, "#8a8a8a")):
            sel = part[part["on front"] == on]
            if len(sel):
                ax.scatter(sel[m1], sel[m2], marker=marker, c=colour,
                           label=f"{label}{', on front' if on else ''}")
    ax.set_xlabel(m1, fontsize=8)
    ax.set_ylabel(m2, fontsize=8)
    ax.set_title("Search trials at their last validation report", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "moasha_front.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
