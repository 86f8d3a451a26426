"""TwoTower: normalised embeddings, temperature clamp, SigLIP bias, param groups, config check."""

from __future__ import annotations

import math

import pytest
import torch

from hescape.config import ConfigError, LossConfig, ModelConfig, load_config
from hescape.models import build_model, param_groups

TINY = {
    "image": {"name": "tiny_cnn", "mode": "finetune"},
    "gene": {"hidden_dim": 16, "n_layers": 1},
    "embed_dim": 8,
}


def _model(loss: str = "clip", **over):
    cfg = ModelConfig.model_validate({**TINY, **over})
    return build_model(cfg, LossConfig(name=loss), gene_in_dim=10, n_donors=3)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_outputs(loss: str) -> None:
    model = _model(loss, adversary={"enabled": True, "towers": ["image", "gene"]})
    out = model(gene=torch.rand(4, 10), image=torch.randn(4, 3, 32, 32), adv_weight=0.5)
    for key in ("img_emb", "gene_emb"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert (out["logit_bias"] is None) == (loss == "clip")
    if loss == "siglip":
        assert out["logit_bias"].item() == -10.0
    assert set(out["donor_logits"]) == {"image", "gene"}
    assert out["donor_logits"]["gene"].shape == (4, 3)


def test_image_features_path_equals_image_path() -> None:
    model = _model().eval()
    img, gene = torch.randn(3, 3, 32, 32), torch.rand(3, 10)
    feats = model.image_encoder(img)
    a = model(gene=gene, image=img)["img_emb"]
    b = model(gene=gene, image_features=feats)["img_emb"]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        model(gene=gene)


def test_logit_scale_clamped_and_fixed_temperature() -> None:
    model = _model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    out = model(gene=torch.rand(2, 10), image=torch.randn(2, 3, 32, 32))
    assert out["logit_scale"].item() == pytest.approx(math.log(100))
    fixed = build_model(
        ModelConfig.model_validate(TINY),
        LossConfig(learn_temperature=False, init_temperature=0.5),
        gene_in_dim=10,
        n_donors=2,
    )
    assert not fixed.logit_scale.requires_grad
    assert fixed.logit_scale.item() == pytest.approx(math.log(2.0))


def test_param_groups_exclude_scale_bias_norms_and_frozen() -> None:
    model = _model("siglip", image={"name": "tiny_cnn", "mode": "frozen"})
    groups = param_groups(model, 0.05)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(model.logit_scale) in no_decay and id(model.logit_bias) in no_decay
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    for p in model.image_encoder.parameters():  # frozen: in no group
        assert id(p) not in decay | no_decay
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decay | no_decay == trainable


def test_load_config_rejects_misspelt_encoder(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  image:\n    name: unii\n  gene:\n    name: mlpp\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.image.name" in msg and "Did you mean 'uni'" in msg
    assert "model.gene.name" in msg and "'mlp'" in msg
    path.write_text("model:\n  image:\n    name: resnet10t\n")
    assert load_config(path).model.image.name == "resnet10t"


def test_logit_scale_clamped_in_place_stays_learnable() -> None:
    """Issue 12 item 8: past ln 100 the forward clamp has zero gradient; clamping the raw
    parameter after each step keeps it at the bound, where a gradient can bring it back."""
    model = _model()
    opt = torch.optim.SGD([model.logit_scale], lr=1.0)
    cap = math.log(100.0)
    for _ in range(3):  # push the temperature up, hard
        opt.zero_grad()
        (-model(gene=torch.rand(2, 10), image=torch.randn(2, 3, 32, 32))["logit_scale"]).backward()
        opt.step()
        model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(cap)
    opt.zero_grad()
    model(gene=torch.rand(2, 10), image=torch.randn(2, 3, 32, 32))["logit_scale"].backward()
    assert model.logit_scale.grad.item() != 0.0  # at the bound the gradient still flows
    opt.step()
    model.clamp_logit_scale_()
    assert model.logit_scale.item() < cap - 0.25


def test_logit_scale_without_in_place_clamp_gets_stuck() -> None:
    """The failure the in-place clamp prevents: a raw parameter above ln 100 gets no gradient."""
    model = _model()
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    model(gene=torch.rand(2, 10), image=torch.randn(2, 3, 32, 32))["logit_scale"].backward()
    assert model.logit_scale.grad.item() == 0.0
