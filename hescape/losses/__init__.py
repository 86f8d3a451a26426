"""Contrastive losses: the registry of names (``spec``, light) and the torch modules
(``contrastive``: CLIP / SigLIP with negatives gathered across workers). Lazy exports."""

from __future__ import annotations

from hescape.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "LOSSES": "spec",
    "LossSpec": "spec",
    "create_loss": "contrastive",
    "ClipLoss": "contrastive",
    "SigLipLoss": "contrastive",
    "gather_with_grad": "contrastive",
})
