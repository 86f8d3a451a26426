"""Expression normalisation + batch correction variants, stain normalisation, and the cache."""

from hescape.preprocess.cache import prepare, variant_key
from hescape.preprocess.expression import (
    PreparedExpression,
    apply_expression_variant,
    normalize_log1p,
)
from hescape.preprocess.measure import measure_variant
from hescape.preprocess.stain import MacenkoNormalizer, hed_jitter

__all__ = [
    "MacenkoNormalizer",
    "PreparedExpression",
    "apply_expression_variant",
    "hed_jitter",
    "measure_variant",
    "normalize_log1p",
    "prepare",
    "variant_key",
]
