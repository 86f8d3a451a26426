"""Donor adversary: gradient reversal, warm-up, accuracy vs chance, and that it works.

The effect test trains on the project's simulator (``hescape.data.simulate_expression``,
strong donor effect) with synthetic donor-free image features that carry the spot state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from hescape.config import AdversaryConfig, LossConfig, ModelConfig, SimulateConfig
from hescape.losses import create_loss
from hescape.models import (
    accuracy_vs_chance,
    adversary_weight,
    build_model,
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


def _donor_probe_accuracy(seed: int, lam: float, steps: int = 400) -> float:
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
        out = model(gene=gene[b], image_features=feats[b], adv_weight=lam)
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
