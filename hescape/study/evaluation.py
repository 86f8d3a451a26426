"""A trial's final evaluation: its best checkpoint on the held-out (test) donors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hescape.config import StudyConfig


def evaluate_trial(cfg: StudyConfig, fitted: Any, *, out_dir: Path) -> tuple[dict, dict]:
    """``test/...`` metrics and artifact paths of the trial's best checkpoint.

    The same function as ``hescape evaluate``: embeddings of train + test donors from the
    best checkpoint, whole-set retrieval, probes, mixing metrics and baselines.
    """
    from hescape.evaluate.checkpoint_eval import evaluate_checkpoint
    from hescape.train.device import resolve_device

    if fitted.best_checkpoint is None:
        raise RuntimeError("training produced no checkpoint to evaluate (max_steps < eval_every?)")
    device = str(resolve_device(cfg.train.use_gpu))
    return evaluate_checkpoint(
        fitted.best_checkpoint, cfg.data.path, out_dir=out_dir,
        label_key=cfg.data.label_key, mutation_key=cfg.data.mutation_key,
        device=device, progress=False,
    )
