"""Models: image encoders (timm + presets), gene encoders, heads, donor adversary, TwoTower."""

from __future__ import annotations

from hescape.models.adversary import (
    DonorClassifier,
    accuracy_vs_chance,
    adversary_weight,
    donor_loss,
    grad_reverse,
)
from hescape.models.gene import (
    GENE_ENCODERS,
    create_gene_encoder,
    gene_input_problem,
    load_gene_encoder,
    save_gene_encoder,
)
from hescape.models.image import (
    ImageEncoder,
    check_image_encoder_name,
    create_image_encoder,
    image_presets,
    list_image_encoders,
)
from hescape.models.presets import ImagePreset
from hescape.models.two_tower import TwoTower, build_model, param_groups
from hescape.models.weights import UnsafeCheckpointError


def list_gene_encoders() -> list[str]:
    """Registered gene encoder names."""
    return GENE_ENCODERS.names()


def check_gene_encoder_name(name: str) -> str | None:
    """None when ``name`` is a registered gene encoder, else a message with close matches."""
    return None if name in GENE_ENCODERS else GENE_ENCODERS.unknown_message(name)


__all__ = [
    "DonorClassifier",
    "ImageEncoder",
    "ImagePreset",
    "TwoTower",
    "UnsafeCheckpointError",
    "accuracy_vs_chance",
    "adversary_weight",
    "build_model",
    "check_gene_encoder_name",
    "check_image_encoder_name",
    "create_gene_encoder",
    "create_image_encoder",
    "donor_loss",
    "gene_input_problem",
    "grad_reverse",
    "image_presets",
    "list_gene_encoders",
    "list_image_encoders",
    "load_gene_encoder",
    "param_groups",
    "save_gene_encoder",
]
