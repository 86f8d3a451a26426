"""Where a trial stands on disk, so a restored trial does only what remains.

A trial's directory (``<study>/trials/<trial_id>``) holds its training checkpoints
(``train/checkpoint_*``, each with the metrics of its report in ``meta.json``) and, once its
evaluation is logged to MLflow, ``eval/logged.json``. From these ``read_progress`` tells a
restored trial: the step it stands at, whether training is over (last step reached or early
stopped), its best checkpoint, and the evaluation if it was already logged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hescape import atomic
from hescape.config import StudyConfig

LOGGED = "logged.json"


@dataclass
class TrialProgress:
    """A trial's state on disk (``step`` 0 = nothing trained yet)."""

    step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # the newest checkpoint's report
    training_done: bool = False
    best_checkpoint: Path | None = None
    evaluation: dict[str, float] | None = None  # logged evaluation metrics, if any

    def fit_result(self) -> Any:
        """A ``FitResult`` for a trial whose training is over (nothing left to train)."""
        from hescape.train import FitResult

        return FitResult(metrics=dict(self.metrics), best_checkpoint=self.best_checkpoint)


def _meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None  # a checkpoint cut short is skipped, as load_checkpoint does
    return meta if (path / "model.pt").is_file() else None


def read_progress(run_dir: Path, cfg: StudyConfig) -> TrialProgress:
    """The progress of the trial in ``run_dir`` (checkpoints under ``run_dir/train``)."""
    from hescape.train.checkpoint import list_checkpoints

    tc = cfg.train
    metas = [(p, m) for p in list_checkpoints(Path(run_dir) / "train")
             if (m := _meta(p)) is not None]
    out = TrialProgress(evaluation=read_evaluation(run_dir))
    if not metas:
        return out
    newest, meta = metas[0]
    out.step = int(meta.get("step", 0))
    out.metrics = dict(meta.get("metrics", {}))
    out.training_done = out.step >= tc.max_steps or bool(out.metrics.get("early_stopped"))
    sign = 1.0 if tc.best_mode == "max" else -1.0

    def score(item: tuple[Path, dict[str, Any]]) -> float:
        value = float(item[1].get("metrics", {}).get(tc.best_metric, math.nan))
        return sign * value if math.isfinite(value) else -math.inf

    # oldest first, stable: ties go to the earlier checkpoint, as in the uninterrupted run
    out.best_checkpoint = max(reversed(metas), key=score)[0]
    return out


def read_evaluation(run_dir: Path) -> dict[str, float] | None:
    """The evaluation metrics already logged to MLflow, or None."""
    try:
        return json.loads((Path(run_dir) / "eval" / LOGGED).read_text())
    except (OSError, ValueError):
        return None


def mark_evaluation_logged(run_dir: Path, metrics: dict[str, float]) -> None:
    """Record (atomically) that ``metrics`` and the artifacts are in MLflow."""
    atomic.write_json(Path(run_dir) / "eval" / LOGGED, metrics, indent=None)
