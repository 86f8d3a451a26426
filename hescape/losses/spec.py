"""The contrastive losses a config can name (``loss.name``): light specs, no torch.

Each spec points at its ``nn.Module`` class with a :class:`~hescape.lazy.Ref` (imported by
``hescape.losses.create_loss``) and says whether the model must learn a logit bias for it
(SigLIP). To add a loss: the module in ``contrastive.py`` (``pair_loss(img, gene, scale, bias)`` of a
``_GatheredLoss``, so negatives are gathered across workers) and one ``LOSSES.add`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from hescape.lazy import Ref
from hescape.registry import Registry


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """A contrastive loss: ``build(rank=, world_size=)`` and whether it needs ``logit_bias``."""

    name: str
    summary: str
    build: Ref
    learns_bias: bool = False


LOSSES: Registry[LossSpec] = Registry("loss")

LOSSES.add(LossSpec(name="clip", summary="symmetric InfoNCE (CLIP)",
                    build=Ref("hescape.losses.contrastive:ClipLoss")))  # fmt: skip
LOSSES.add(LossSpec(name="siglip", summary="pairwise sigmoid loss with a learnt bias (SigLIP)",
                    build=Ref("hescape.losses.contrastive:SigLipLoss"), learns_bias=True))  # fmt: skip

