"""Pure metrics: retrieval, batch mixing (scib-metrics' definitions, kBET), expression and
label probes, HEST-Benchmark's probe, the mutation probe, Pearson helpers.

numpy / scipy / scikit-learn / pandas only: no torch, no config, nothing from
``hescape.train``, ``hescape.models`` or ``hescape.evaluate`` (the import-layer test checks
it). Inputs are arrays and plain arguments. ``hescape.evaluate`` adapts them to the probe
registry; training validation and preprocessing measurement call them directly.
"""

from __future__ import annotations

from hescape.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "cross_modal_retrieval": "retrieval",
    "fixed_gallery_retrieval": "retrieval",
    "l2_normalize": "retrieval",
    "rank_of_true": "retrieval",
    "topk_blocked": "retrieval",
    "hest_probe": "hest",
    "label_probe": "probes",
    "mixing_metrics": "mixing",
    "mutation_probe": "mutation",
    "retrieval_expression_probe": "probes",
    "ridge_per_donor_probe": "probes",
})
