"""Donor-adversarial head: gradient reversal + MLP donor classifier.

The classifier always learns to predict the donor at full strength (plain cross-entropy);
the gradient reaching the embedding is multiplied by ``-weight``. With ``weight = 0`` the
classifier still trains, so its accuracy measures how much donor identity the embedding
carries, without pushing the encoder.

Reversal can scramble donors (the head's accuracy below chance while a fresh probe still
decodes them), so judge the adversary by the gene embedding's batch mixing
(``test/gene/ilisi``) and a probe, not by ``donor_acc`` alone; measurements in
docs/measurements.md.

Training-loop use::

    out = model(gene=g, image=x, adv_weight=adversary_weight(step, cfg.model.adversary))
    loss = contrastive(...) + donor_loss(out["donor_logits"], donor_ids)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hescape.config import AdversaryConfig


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = float(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: Tensor, weight: float) -> Tensor:
    """Identity forward; backward multiplies the gradient by ``-weight``."""
    return _GradReverse.apply(x, weight)


class DonorClassifier(nn.Module):
    """MLP predicting the donor (or slide) from an embedding, behind gradient reversal."""

    def __init__(self, in_dim: int, n_donors: int, hidden_dim: int = 64) -> None:
        super().__init__()
        if n_donors < 2:
            raise ValueError(f"the donor adversary needs >= 2 donors in training, got {n_donors}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n_donors)
        )

    def forward(self, emb: Tensor, weight: float = 0.0) -> Tensor:
        return self.net(grad_reverse(emb, weight))


def adversary_weight(step: int, cfg: AdversaryConfig) -> float:
    """Lambda at ``step``: 0 when disabled, linear warm-up to ``cfg.weight`` over warmup_steps."""
    if not cfg.enabled or cfg.weight == 0.0:
        return 0.0
    if cfg.warmup_steps <= 0:
        return float(cfg.weight)
    return float(cfg.weight) * min(1.0, max(0, step) / cfg.warmup_steps)


def donor_loss(donor_logits: dict[str, Tensor], donors: Tensor) -> Tensor:
    """Sum of the per-tower donor cross-entropies (0 when there is no adversary)."""
    if not donor_logits:
        return torch.zeros((), device=donors.device)
    return sum(F.cross_entropy(logits, donors) for logits in donor_logits.values())


@torch.no_grad()
def accuracy_vs_chance(logits: Tensor, donors: Tensor) -> dict[str, float]:
    """Donor accuracy, chance (majority-class rate) and their ratio (1.0 = no donor signal)."""
    donors = donors.long()
    acc = (logits.argmax(dim=1) == donors).float().mean().item()
    counts = torch.bincount(donors)
    chance = (counts.max().float() / counts.sum().clamp_min(1)).item()
    return {"donor_acc": acc, "donor_chance": chance, "donor_acc_over_chance": acc / chance}
