"""Gene encoders: registry matrix, transformer panel limit, frozen_pretrained checkpoints,
the input kinds each accepts."""

from __future__ import annotations

import pytest
import torch

from hescape.config import GeneEncoderConfig
from hescape.models import (
    GENE_ENCODERS,
    UnsafeCheckpointError,
    create_gene_encoder,
    save_gene_encoder,
)

SMALL = {"hidden_dim": 16, "n_layers": 2, "n_heads": 2, "n_bins": 8, "dropout": 0.0}


def _encoder(name: str, in_dim: int, tmp_path, **kw):
    cfg = GeneEncoderConfig(name=name, **{**SMALL, **kw})
    if name == "frozen_pretrained":
        inner = GeneEncoderConfig(name="mlp", **SMALL)
        ckpt = save_gene_encoder(
            create_gene_encoder(inner, in_dim), tmp_path / "enc.pt", inner, in_dim
        )
        cfg = cfg.model_copy(update={"checkpoint": str(ckpt)})
    return create_gene_encoder(cfg, in_dim)


@pytest.mark.parametrize("name", GENE_ENCODERS.names())
def test_every_gene_encoder_builds_runs_and_backprops(name: str, tmp_path) -> None:
    enc = _encoder(name, 12, tmp_path)
    x = torch.rand(4, 12) * (torch.rand(4, 12) > 0.3)
    out = enc(x)
    assert out.shape == (4, enc.out_dim) and torch.isfinite(out).all()
    if name == "frozen_pretrained":
        assert not any(p.requires_grad for p in enc.parameters())
    else:
        out.sum().backward()
        assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_unknown_gene_encoder_suggests() -> None:
    assert GENE_ENCODERS.problem("mlp") is None
    assert "Did you mean 'transformer'" in GENE_ENCODERS.problem("transfomer")


def test_transformer_panel_limit_is_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match="max_genes=10.*n_top_genes"):
        _encoder("transformer", 11, tmp_path, max_genes=10)


def test_transformer_bins_are_per_spot() -> None:
    enc = _encoder("transformer", 4, None)
    x = torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 10.0, 20.0, 40.0]])
    bins = enc.bin_values(x)
    assert bins[0, 0] == 0 and bins[0, -1] == enc.n_bins - 1
    assert torch.equal(bins[0], bins[1])  # library size does not shift bins


def test_frozen_pretrained_roundtrip_and_checks(tmp_path) -> None:
    inner = GeneEncoderConfig(name="latent_mlp", **SMALL)
    src = create_gene_encoder(inner, 6).eval()
    names = [f"PC{i}" for i in range(6)]
    path = save_gene_encoder(src, tmp_path / "g.pt", inner, 6, feature_names=names)
    cfg = GeneEncoderConfig(name="frozen_pretrained", checkpoint=str(path))
    enc = create_gene_encoder(cfg, 6, feature_names=names)
    x = torch.randn(3, 6)
    torch.testing.assert_close(enc(x), src(x))
    with pytest.raises(ValueError, match="6 input features"):
        create_gene_encoder(cfg, 7)
    with pytest.raises(ValueError, match="feature names differ"):
        create_gene_encoder(cfg, 6, feature_names=[f"G{i}" for i in range(6)])


def test_frozen_pretrained_missing_or_unsafe(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model.gene.checkpoint"):
        create_gene_encoder(GeneEncoderConfig(name="frozen_pretrained"), 5)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_gene_encoder(
            GeneEncoderConfig(name="frozen_pretrained", checkpoint=str(tmp_path / "x.pt")), 5
        )
    bad = tmp_path / "bad.pt"
    torch.save({"format": "hescape-gene-encoder/1", "obj": torch.nn.Linear(2, 2)}, bad)
    with pytest.raises(UnsafeCheckpointError):
        create_gene_encoder(GeneEncoderConfig(name="frozen_pretrained", checkpoint=str(bad)), 5)


# ------------------------------------------- encoder x preprocessing output (issue 12 item 4)
def test_transformer_refuses_negative_input_instead_of_binning_it_to_zero() -> None:
    enc = _encoder("transformer", 4, None)
    with pytest.raises(ValueError, match="negative values.*mlp or latent_mlp"):
        enc(torch.tensor([[0.5, -1.0, 2.0, 0.0]]))


@pytest.mark.parametrize("name", GENE_ENCODERS.names())
def test_every_encoder_declares_what_it_accepts(name: str) -> None:
    from hescape.preprocess.spec import KINDS

    accepts = GENE_ENCODERS.get(name).accepts
    assert accepts and accepts <= set(KINDS)


def test_config_refuses_transformer_on_signed_features_and_accepts_expression() -> None:
    from hescape.config import ConfigError, validate_config

    for method in ("harmony", "pca", "combat", "scvi"):  # signed features (scVI: latent)
        with pytest.raises(ConfigError, match=f"method='{method}' outputs real-valued"):
            validate_config({"preprocess": {"expression": {"method": method}},
                             "model": {"gene": {"name": "transformer"}}})
    ok = [({"method": "none"}, "transformer"),
          ({"method": "scvi", "scvi": {"output": "normalized"}}, "transformer"),
          ({"method": "harmony"}, "mlp"), ({"method": "scvi"}, "latent_mlp")]
    for expression, gene in ok:
        cfg = validate_config({"preprocess": {"expression": expression},
                               "model": {"gene": {"name": gene}}})
        assert cfg.model.gene.name == gene
