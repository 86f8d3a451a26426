"""Donor adversary: gradient reversal, domain confusion, warm-up, accuracy vs chance, and that
both objectives work.

The effect tests train on the project's simulator (``hescape.data.simulate_expression``,
strong donor effect) with synthetic donor-free image features that carry the spot state.
"""

from __future__ import annotations

import functools
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from torch.func import functional_call

from hescape.config import AdversaryConfig, LossConfig, ModelConfig, SimulateConfig
from hescape.losses import create_loss
from hescape.models import (
    AdversaryWeight,
    accuracy_vs_chance,
    adversary_weight,
    build_model,
    confusion_loss,
    donor_loss,
    grad_reverse,
)


def test_grad_reverse_flips_and_scales_gradient() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    y = grad_reverse(x, 0.7)
    torch.testing.assert_close(y, x)
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * torch.arange(3.0).expand(5, 3))


def test_adversary_weight_warmup() -> None:
    cfg = AdversaryConfig(enabled=True, weight=2.0, warmup_steps=10)
    assert [adversary_weight(s, cfg) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    assert adversary_weight(100, AdversaryConfig(enabled=False, weight=2.0)) == 0.0
    assert adversary_weight(0, AdversaryConfig(enabled=True, weight=1.5)) == 1.5


def test_adversary_weight_carries_the_objective() -> None:
    cfg = AdversaryConfig(enabled=True, weight=2.0, warmup_steps=10, objective="confusion")
    w = adversary_weight(5, cfg)
    assert w == 1.0 and w.objective == "confusion"
    assert adversary_weight(5, AdversaryConfig(enabled=True, weight=1.0)).objective == "reverse"
    again = pickle.loads(pickle.dumps(w))  # metrics and configs cross process boundaries
    assert again == 1.0 and again.objective == "confusion"
    with pytest.raises(ValidationError):
        AdversaryConfig(objective="flip")
    with pytest.raises(ValueError, match="objective"):
        AdversaryWeight(1.0, "flip")


def _grad_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate(
        {
            "image": {"name": "tiny_cnn"},
            "gene": {"hidden_dim": 32, "n_layers": 2, "dropout": 0.0},
            "embed_dim": 8,
            "adversary": {"enabled": True, "towers": ["gene"], "hidden_dim": 16},
        }
    )
    model = build_model(cfg, LossConfig(), gene_in_dim=12, n_donors=3)
    gene, feats = torch.randn(20, 12), torch.randn(20, 64)
    donors = torch.randint(0, 3, (20,))
    return model, gene, feats, donors


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    model.zero_grad(set_to_none=True)
    return out


def test_confusion_gradients() -> None:
    """The loop's ``contrastive + donor_loss`` gives: the classifier only the gradient of its
    cross-entropy on the DETACHED embedding; every other parameter the gradient of
    ``contrastive + lambda * CE(uniform, classifier(embedding))`` with the classifier frozen."""
    lam = 0.7
    model, gene, feats, donors = _grad_model()
    loss_fn = create_loss(LossConfig())
    head = model.adversaries["gene"]

    out = model(gene=gene, image_features=feats, adv_weight=AdversaryWeight(lam, "confusion"))
    loss = loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"], out["logit_bias"])
    (loss + donor_loss(out["donor_logits"], donors)).backward()
    got = _grads(model)

    emb = model.encode_gene(gene)  # reference for the classifier: CE on the detached embedding
    F.cross_entropy(head.net(emb.detach()), donors).backward()
    classifier_ref = _grads(model)

    out = model(gene=gene, image_features=feats)  # reference for the encoders
    frozen = {n: p.detach() for n, p in head.net.named_parameters()}
    uniform = confusion_loss(functional_call(head.net, frozen, (out["gene_emb"],)))
    loss = loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"], out["logit_bias"])
    (loss + lam * uniform).backward()
    encoder_ref = _grads(model)

    out = model(gene=gene, image_features=feats)  # contrastive alone, to see the push is real
    loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"], out["logit_bias"]).backward()
    contrastive_only = _grads(model)

    pushed = 0
    for name, grad in got.items():
        if name.startswith("adversaries."):
            torch.testing.assert_close(grad, classifier_ref[name], msg=name)
        else:
            torch.testing.assert_close(grad, encoder_ref[name], msg=name)
            pushed += not torch.allclose(grad, contrastive_only[name])
    assert pushed > 0  # the uniform-target term reaches the gene tower
    # the logits the loop sees (accuracy, train/adv_loss) are the classifier's own
    torch.testing.assert_close(out["donor_logits"]["gene"], head.net(out["gene_emb"]))


def test_confusion_loss_is_minimal_at_uniform_and_zero_weight_only_monitors() -> None:
    assert confusion_loss(torch.zeros(4, 3)).item() == pytest.approx(math.log(3))
    assert confusion_loss(torch.tensor([[5.0, 0.0, 0.0]])).item() > math.log(3)
    model, gene, feats, donors = _grad_model(1)
    out = model(gene=gene, image_features=feats, adv_weight=AdversaryWeight(0.0, "confusion"))
    donor_loss(out["donor_logits"], donors).backward()
    grads = _grads(model)
    assert all(g.abs().sum() == 0 for n, g in grads.items() if not n.startswith("adversaries."))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("adversaries."))


def test_reverse_is_the_default_for_a_plain_float_weight() -> None:
    model, gene, feats, donors = _grad_model(2)
    grads = []
    for weight in (0.5, AdversaryWeight(0.5, "reverse")):
        out = model(gene=gene, image_features=feats, adv_weight=weight)
        donor_loss(out["donor_logits"], donors).backward()
        grads.append(_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_accuracy_vs_chance_uses_majority_rate() -> None:
    donors = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0.0]] * 4)
    out = accuracy_vs_chance(logits, donors)
    assert out["donor_acc"] == 0.75 and out["donor_chance"] == 0.75
    assert out["donor_acc_over_chance"] == pytest.approx(1.0)
    assert donor_loss({}, donors).item() == 0.0


def _simulated(seed: int):
    from hescape.data import simulate_expression

    sim = SimulateConfig(n_donors=4, spots_per_donor=150, n_genes=60, donor_effect=3.0, seed=seed)
    adata, _ = simulate_expression(sim)
    counts = np.asarray(adata.X.todense(), dtype=np.float32)
    gene = torch.from_numpy(np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4))
    donor = torch.tensor(
        adata.obs["donor"].astype("category").cat.codes.to_numpy(), dtype=torch.long
    )
    state = torch.as_tensor(adata.obs["state_idx"].to_numpy())
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(int(state.max()) + 1, 64, generator=g)
    feats = protos[state] + 0.3 * torch.randn(len(state), 64, generator=g)  # no donor signal
    return gene, feats, donor


@functools.cache
def _donor_probe_accuracy(
    seed: int, lam: float, objective: str = "reverse", steps: int = 400
) -> float:
    gene, feats, donor = _simulated(seed)
    idx = np.random.default_rng(seed).permutation(len(gene))
    train, test = idx[:400], idx[400:]
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate(
        {
            "image": {"name": "tiny_cnn"},
            "gene": {"hidden_dim": 32, "n_layers": 2, "dropout": 0.0},
            "embed_dim": 16,
            "adversary": {"enabled": True, "towers": ["gene"], "hidden_dim": 32},
        }
    )
    model = build_model(cfg, LossConfig(), gene_in_dim=gene.shape[1], n_donors=4)
    loss_fn = create_loss(LossConfig())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    train_t = torch.as_tensor(train)
    for _ in range(steps):
        b = train_t[torch.randint(0, len(train_t), (64,))]
        out = model(
            gene=gene[b], image_features=feats[b], adv_weight=AdversaryWeight(lam, objective)
        )
        loss = loss_fn(out["img_emb"], out["gene_emb"], out["logit_scale"])
        loss = loss + donor_loss(out["donor_logits"], donor[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        emb = model.eval().encode_gene(gene).numpy()
    probe = LogisticRegression(max_iter=2000).fit(emb[train], donor.numpy()[train])
    return float(probe.score(emb[test], donor.numpy()[test]))


def test_adversary_lowers_donor_predictability_of_gene_embedding() -> None:
    """Held-out linear-probe donor accuracy (chance 0.25), mean over 3 simulator seeds."""
    plain = np.mean([_donor_probe_accuracy(s, 0.0) for s in range(3)])
    adversarial = np.mean([_donor_probe_accuracy(s, 1.0) for s in range(3)])
    assert plain > 0.4  # without the adversary the embedding carries donor identity
    assert adversarial < plain - 0.08, (plain, adversarial)


def test_confusion_lowers_donor_predictability_of_gene_embedding() -> None:
    """Held-out linear-probe donor accuracy (chance 0.25), domain confusion (lambda 2) vs no
    push. Measured while writing, simulator seeds 0-19 (change vs lambda 0): lower on 17 of 20
    seeds, the others +0.00, +0.00, +0.02; mean -0.065 (reverse at lambda 1: -0.13, 19 of 20).
    Every window of 6 consecutive seeds has mean <= -0.037; seeds 0-5 here: -0.097."""
    seeds = range(6)
    plain = [_donor_probe_accuracy(s, 0.0) for s in seeds]
    confused = [_donor_probe_accuracy(s, 2.0, "confusion") for s in seeds]
    assert np.mean(plain) > 0.4
    assert np.mean(confused) < np.mean(plain) - 0.03, (plain, confused)
    # it does not make donors more separable on any seed (gradient reversal can)
    assert max(c - p for c, p in zip(confused, plain)) < 0.05, (plain, confused)
