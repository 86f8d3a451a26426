"""Evaluation: retrieval, probes (a registry: ``probe_spec.PROBES``), batch mixing, baselines,
plots, pipeline.

Names are imported lazily so ``import hescape.evaluate`` stays cheap (no torch, no umap).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cross_modal_retrieval": "retrieval",
    "rank_of_true": "retrieval",
    "topk_blocked": "retrieval",
    "fixed_gallery_retrieval": "retrieval",
    "ridge_per_donor_probe": "probes",
    "retrieval_expression_probe": "probes",
    "label_probe": "probes",
    "hest_probe": "hest",
    "mutation_probe": "mutation",
    "EvalData": "probe_spec",
    "PROBES": "suite",  # importing suite registers the built-in probes
    "probe_specs": "probe_spec",
    "register_probe": "probe_spec",
    "mixing_metrics": "mixing",
    "evaluate_embeddings": "pipeline",
    "evaluate_checkpoint": "checkpoint_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hescape.evaluate' has no attribute {name!r}")
    module = importlib.import_module(f"hescape.evaluate.{_EXPORTS[name]}")
    return getattr(module, name)
