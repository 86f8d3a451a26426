"""Read a study's trials back from MLflow (the source of truth for reports)."""

from __future__ import annotations

import json
from typing import Any

from hescape.study import lineage


def trial_table(ref: lineage.LineageRef, *, phase: str | None = None) -> list[dict[str, Any]]:
    """One row per child run: ids, status, sweep params, final metrics, tags."""
    rows = []
    for run in lineage.child_runs(ref):
        tags = run.data.tags
        if phase and tags.get("hescape.phase") != phase:
            continue
        try:
            sweep = json.loads(tags.get("hescape.sweep_params", "{}"))
        except json.JSONDecodeError:
            sweep = {}
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial_id": tags.get(lineage.TAG_TRIAL, ""),
                "name": tags.get(lineage.TAG_RUN_NAME, ""),
                "status": run.info.status,
                "phase": tags.get("hescape.phase", ""),
                "config_id": tags.get("hescape.config_id", ""),
                "seed": tags.get("hescape.seed", ""),
                "preprocess": tags.get("hescape.preprocess", ""),
                "saw_heldout": tags.get("hescape.preprocess_saw_heldout", ""),
                "error": tags.get("hescape.error", ""),
                "sweep_params": sweep,
                "params": dict(run.data.params),
                "metrics": dict(run.data.metrics),
            }
        )
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def metric_history(ref: lineage.LineageRef, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of one run."""
    client = lineage.MlflowClient(ref.tracking_uri)
    hist = lineage.with_retry(lambda: client.get_metric_history(run_id, key))
    return sorted((m.step, m.value) for m in hist)
