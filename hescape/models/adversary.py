"""Donor-adversarial head: an MLP donor classifier and two ways to push the encoder with it.

The classifier always learns to predict the donor at full strength (plain cross-entropy);
what reaches the embedding depends on the objective (``model.adversary.objective``):

``reverse`` (default, Ganin & Lempitsky 2015): gradient reversal. The gradient of the
    classifier's cross-entropy reaching the embedding is multiplied by ``-weight``, so the
    encoder *maximises* the classifier's loss. Measured on the simulator this often scrambles
    the donor labels (the classifier's own accuracy falls below chance) while a fresh linear
    probe still decodes the donor.
``confusion`` (domain confusion, Tzeng et al. 2015): the classifier trains with cross-entropy
    on the DETACHED embedding (so it stays a strong adversary and its parameters get gradient
    only from that), and the encoder is trained to make that classifier's prediction uniform:
    ``weight * mean_i CE(uniform, softmax(f(e_i)))`` through the classifier with detached
    parameters (``torch.func.functional_call``). Maximum entropy is reached only when the
    classifier cannot tell donors apart, not when it is confidently wrong.

Measured on the strong-donor simulator (product path as tests/evaluate/test_acceptance.py, 14
fits per setting): ``confusion`` never pushed the classifier below chance nor made donors
more separable, but with the default MLP head its effect is small (fresh-probe donor accuracy
-0.00..-0.04, training-donor iLISI +0.05..+0.07); ``reverse`` at weight 1 removes more on
average (probe -0.05..-0.12, iLISI +0.16..+0.23) and occasionally scrambles (classifier at
0.06 with 4 donors). With a linear or input-standardised classifier ``reverse`` made donors
MORE separable (probe 0.76 -> 0.89..0.98) while ``confusion`` did not. Neither changed
held-out-donor iLISI or retrieval consistently. Hence ``reverse`` stays the default.

With ``weight = 0`` both objectives only monitor: the classifier still trains, so its
accuracy measures how much donor identity the embedding carries, and the encoder is not
pushed.

Training-loop use (unchanged by the objective)::

    out = model(gene=g, image=x, adv_weight=adversary_weight(step, cfg.model.adversary))
    loss = contrastive(...) + donor_loss(out["donor_logits"], donor_ids)
    loss.backward()

``adversary_weight`` returns an :class:`AdversaryWeight`: the float lambda tagged with the
objective, which is how the objective reaches the heads (a plain float means ``reverse``).
For ``confusion`` the head's logits carry the encoder's uniform-target term in their
backward: ``donor_loss`` (cross-entropy) gives the classifier its gradient, and the backward
of the logits adds ``weight * (softmax - 1/K) / B`` on the encoder side. That term assumes
what the loop does: ``donor_loss``'s output enters the loss with coefficient 1 and one
``backward`` (no loss scaling). Its value is not part of the reported loss:
``train/adv_loss`` is the classifier's cross-entropy for both objectives.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from hescape.config import AdversaryConfig

OBJECTIVES = ("reverse", "confusion")


class AdversaryWeight(float):
    """Lambda of the donor adversary (a float) tagged with its ``objective``."""

    __slots__ = ("objective",)

    def __new__(cls, value: float, objective: str = "reverse") -> AdversaryWeight:
        if objective not in OBJECTIVES:
            raise ValueError(f"adversary objective must be one of {OBJECTIVES}, got {objective!r}")
        self = super().__new__(cls, value)
        self.objective = objective
        return self

    def __reduce__(self) -> tuple[Any, tuple[float, str]]:
        return (AdversaryWeight, (float(self), self.objective))

    def __repr__(self) -> str:
        return f"AdversaryWeight({float(self)!r}, {self.objective!r})"


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


class _Confusion(torch.autograd.Function):
    """Forward: the classifier's logits (on the detached embedding), unchanged. Backward: their
    gradient goes to the classifier as is, and the encoder-side logits (same values, computed
    with detached classifier parameters) get ``weight * d/dz mean_i CE(uniform, softmax(z_i))
    = weight * (softmax(z) - 1/K) / B``."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, enc_logits: Tensor, weight: float) -> Tensor:
        ctx.weight = float(weight)
        ctx.save_for_backward(enc_logits)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (enc_logits,) = ctx.saved_tensors
        prob = torch.softmax(enc_logits.float(), dim=1)
        n, k = prob.shape
        enc_grad = (ctx.weight / n) * (prob - 1.0 / k)
        return grad, enc_grad.to(enc_logits.dtype), None


def confusion_loss(logits: Tensor) -> Tensor:
    """Mean cross-entropy of ``softmax(logits)`` to the uniform distribution (min: uniform)."""
    return -F.log_softmax(logits.float(), dim=1).mean(dim=1).mean()


class DonorClassifier(nn.Module):
    """MLP predicting the donor (or slide) from an embedding; the objective (reverse or
    confusion, see the module docstring) comes with the weight passed to ``forward``."""

    def __init__(self, in_dim: int, n_donors: int, hidden_dim: int = 64) -> None:
        super().__init__()
        if n_donors < 2:
            raise ValueError(f"the donor adversary needs >= 2 donors in training, got {n_donors}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n_donors)
        )

    def forward(self, emb: Tensor, weight: float = 0.0) -> Tensor:
        if getattr(weight, "objective", "reverse") == "reverse":
            return self.net(grad_reverse(emb, weight))
        logits = self.net(emb.detach())  # the classifier learns from its CE only
        if float(weight) == 0.0 or not (emb.requires_grad and torch.is_grad_enabled()):
            return logits
        frozen = {name: p.detach() for name, p in self.net.named_parameters()}
        enc_logits = functional_call(self.net, frozen, (emb,))  # gradient to the encoder only
        return _Confusion.apply(logits, enc_logits, float(weight))


def adversary_weight(step: int, cfg: AdversaryConfig) -> AdversaryWeight:
    """Lambda at ``step`` tagged with ``cfg.objective``: 0 when disabled, linear warm-up to
    ``cfg.weight`` over warmup_steps."""
    if not cfg.enabled or cfg.weight == 0.0:
        value = 0.0
    elif cfg.warmup_steps <= 0:
        value = float(cfg.weight)
    else:
        value = float(cfg.weight) * min(1.0, max(0, step) / cfg.warmup_steps)
    return AdversaryWeight(value, cfg.objective)


def donor_loss(donor_logits: dict[str, Tensor], donors: Tensor) -> Tensor:
    """Sum of the per-tower donor cross-entropies (0 when there is no adversary). With the
    ``confusion`` objective the encoder's uniform-target term rides on the logits' backward."""
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
