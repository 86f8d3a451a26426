"""Models: image encoders (timm + presets), gene encoders, heads, donor adversary, TwoTower.

Lazy exports: ``hescape.models.spec`` and ``hescape.models.presets`` (what a config can
name) are light; the torch modules load on first access to their names.
"""

from __future__ import annotations

from hescape.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "GENE_ENCODERS": "spec",
    "PROJECTIONS": "spec",
    "GeneEncoderSpec": "spec",
    "gene_input_problem": "spec",
    "IMAGE_PRESETS": "presets",
    "ImagePreset": "presets",
    "check_image_encoder_name": "presets",
    "DonorClassifier": "adversary",
    "accuracy_vs_chance": "adversary",
    "adversary_weight": "adversary",
    "donor_loss": "adversary",
    "grad_reverse": "adversary",
    "create_gene_encoder": "gene",
    "load_gene_encoder": "gene",
    "save_gene_encoder": "gene",
    "ImageEncoder": "image",
    "create_image_encoder": "image",
    "TwoTower": "two_tower",
    "build_model": "two_tower",
    "param_groups": "two_tower",
    "UnsafeCheckpointError": "weights",
})
