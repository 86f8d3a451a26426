"""A trial's final evaluation: its best checkpoint on the held-out (test) donors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hescape.config import StudyConfig


def evaluate_trial(cfg: StudyConfig, fitted: Any, *, out_dir: Path, paired: Any,
                   prepared: Any = None, features: str | None = None,
                   baselines: bool = True) -> tuple[dict, dict]:
    """``test/...`` metrics and artifact paths of the trial's best checkpoint.

    The same evaluation as ``hescape evaluate`` (``evaluate_trained``): embeddings of train +
    test donors from the best checkpoint (a ``TrainedModel``), on the trial's already loaded
    dataset and inputs, whole-set retrieval, probes and mixing metrics. ``baselines=False``
    when the study evaluates them once (``hescape.study.baselines``); the embeddings' UMAPs
    are drawn by the study report for its best trials, not here.
    """
    from hescape.evaluate.checkpoint_eval import evaluate_trained
    from hescape.train.device import resolve_device
    from hescape.train.trained import TrainedModel

    if fitted.best_checkpoint is None:
        raise RuntimeError("training produced no checkpoint to evaluate (max_steps < eval_every?)")
    trained = TrainedModel.load(fitted.best_checkpoint)
    return evaluate_trained(
        trained, paired, out_dir=out_dir, prepared=prepared, features=features,
        label_key=cfg.data.label_key, mutation_key=cfg.data.mutation_key,
        baselines=baselines, embedding_plots=False,
        device=str(resolve_device(cfg.train.use_gpu)), progress=False,
    )
