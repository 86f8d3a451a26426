"""Evaluation orchestration: the probe registry (``probe_spec.PROBES``), the registered
probes (``suite``), the pipeline over feature sets, baselines, plots and checkpoint
evaluation. The metrics themselves live in ``hescape.metrics`` (numpy / scikit-learn).

Names are imported lazily so ``import hescape.evaluate`` stays cheap (no torch, no umap).
"""

from __future__ import annotations

from hescape.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "EvalData": "probe_spec",
    "PROBES": "suite",  # importing suite registers the built-in probes
    "probe_specs": "probe_spec",
    "register_probe": "probe_spec",
    "evaluate_embeddings": "pipeline",
    "evaluate_checkpoint": "checkpoint_eval",
})
