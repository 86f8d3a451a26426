"""Expression preprocessing methods (registry of specs), stain normalisation, and the cache.

Exports load lazily (PEP 562): ``hescape.config`` imports ``hescape.preprocess.spec`` to
build the ``preprocess.expression`` schema, which must not pull in scipy-heavy modules,
scikit-learn, scvi-tools or torch.
"""

from __future__ import annotations

from hescape.lazy import lazy_exports

_EXPORTS = {
    "MacenkoNormalizer": "stain",
    "MethodSpec": "spec",
    "PreparedExpression": "expression",
    "apply_expression_variant": "expression",
    "get_method": "spec",
    "hed_jitter": "stain",
    "measure_variant": "measure",
    "method_names": "spec",
    "normalize_log1p": "expression",
    "prepare": "cache",
    "variant_key": "cache",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
