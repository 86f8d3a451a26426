"""Training: dataset, frozen-feature cache, checkpoints, the per-worker loop, ``fit``.

Public names are imported lazily (``import hescape.train`` does not pull in torch/timm/ray).
"""

from __future__ import annotations

from hescape.lazy import lazy_exports

_EXPORTS = {
    "fit": "runner",
    "FitResult": "runner",
    "runs_in_process": "runner",
    "train_loop_per_worker": "loop",
    "TrainingError": "loop",
    "get_lr": "schedule",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_model": "checkpoint",
    "list_checkpoints": "checkpoint",
    "CheckpointError": "checkpoint",
    "compute_embeddings": "embed",
    "embed_split": "trained",
    "TrainedModel": "trained",
    "cached_features": "features",
    "use_feature_cache": "features",
    "prepare_inputs": "inputs",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
