"""Gene encoders: the modules and their builders. Each builds an ``nn.Module`` with ``out_dim``.

* ``mlp``          MLP on the preprocessed input (expression or features).
* ``transformer``  one token per gene: gene-identity embedding + binned value embedding,
                   a small TransformerEncoder, CLS pooling. Attention is O(G^2) per spot, so
                   panels are limited to ``max_genes`` (default 2048) genes; select HVGs with
                   ``preprocess.expression.n_top_genes`` or raise ``model.gene.max_genes``.
                   Accepts only non-negative expression with gene columns: negative input
                   raises (it is never clamped into bin 0).
* ``latent_mlp``   tower over preprocessed inputs of any width (PCA/Harmony PCs, scVI latent):
                   input LayerNorm (PC scales differ by orders of magnitude) + residual MLP.
* ``frozen_pretrained``  a gene encoder saved with :func:`save_gene_encoder`, loaded with
                   ``torch.load(weights_only=True)`` from ``model.gene.checkpoint`` and frozen.

The specs (name, accepted preprocessing output kinds, builder) are in
``hescape.models.spec`` (light: config validation reads them without torch); this module
holds the modules and their builders. :func:`~hescape.models.spec.gene_input_problem`
refuses an encoder / preprocessing pair the encoder cannot take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hescape.atomic import atomic_path
from hescape.config import GeneEncoderConfig
from hescape.models.spec import GENE_ENCODERS


def _block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Dropout(dropout)
    )


class MLPEncoder(nn.Module):
    """``n_layers`` x (Linear, LayerNorm, GELU, Dropout)."""

    def __init__(self, in_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * n_layers
        self.net = nn.Sequential(
            *[_block(a, b, dropout) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.out_dim = hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LatentMLPEncoder(nn.Module):
    """Input LayerNorm, a linear stem, then residual (LayerNorm, Linear, GELU) blocks."""

    def __init__(self, in_dim: int, hidden_dim: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.stem = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden_dim),
                nn.Linear(hidden_dim, hidden_dim),
                nn.GELU(),
                nn.Dropout(dropout),
            )
            for _ in range(max(0, n_layers - 1))
        )
        self.out_dim = hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(self.norm_in(x))
        for block in self.blocks:
            h = h + block(h)
        return h


class GeneTransformer(nn.Module):
    """Gene tokens = identity embedding + value-bin embedding; CLS (or mean) pooling.

    Values are binned per spot: 0 stays bin 0, positive values map linearly (relative to the
    spot's maximum) onto bins 1..n_bins-1, so library-size differences do not shift bins.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        hidden_dim: int,
        n_layers: int,
        n_heads: int,
        n_bins: int,
        dropout: float,
        max_genes: int,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        if n_genes > max_genes:
            raise ValueError(
                f"gene encoder 'transformer': the panel has {n_genes} genes, above "
                f"model.gene.max_genes={max_genes} (attention cost grows with genes^2). Select "
                "highly variable genes with preprocess.expression.n_top_genes, or raise max_genes."
            )
        if hidden_dim % n_heads:
            raise ValueError(
                f"gene encoder 'transformer': hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}"
            )
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.n_bins, self.pooling = n_bins, pooling
        self.gene_emb = nn.Embedding(n_genes, hidden_dim)
        self.value_emb = nn.Embedding(n_bins, hidden_dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        layer = nn.TransformerEncoderLayer(
            hidden_dim,
            n_heads,
            dim_feedforward=2 * hidden_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.register_buffer("gene_ids", torch.arange(n_genes), persistent=False)
        self.out_dim = hidden_dim

    def bin_values(self, x: Tensor) -> Tensor:
        """Per-spot binning of non-negative expression into ``n_bins`` integer bins.

        Negative input raises: it is not expression (signed PCs, latents, corrected values
        belong to ``mlp``/``latent_mlp``), and clamping would turn it into bin 0 silently.
        """
        if bool((x < 0).any()):
            raise ValueError(
                f"gene encoder 'transformer' bins non-negative expression but got negative "
                f"values (min {float(x.min()):.3g}): the preprocessing output is signed "
                "features; use model.gene.name mlp or latent_mlp, or preprocess.expression."
                "method none"
            )
        scale = x.amax(dim=1, keepdim=True).clamp_min(1e-8)
        bins = 1 + torch.floor((x / scale) * (self.n_bins - 2) + 1e-6).long()
        return torch.where(x > 0, bins.clamp(1, self.n_bins - 1), torch.zeros_like(bins))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.gene_emb(self.gene_ids)[None] + self.value_emb(self.bin_values(x))
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        h = self.norm(self.encoder(h))
        return h[:, 0] if self.pooling == "cls" else h[:, 1:].mean(dim=1)


# builders named by the specs in hescape.models.spec: (cfg, in_dim, feature_names) -> module
def build_mlp(cfg: GeneEncoderConfig, in_dim: int, feature_names: list[str] | None) -> nn.Module:
    return MLPEncoder(in_dim, cfg.hidden_dim, cfg.n_layers, cfg.dropout)


def build_latent_mlp(cfg: GeneEncoderConfig, in_dim: int,
                     feature_names: list[str] | None) -> nn.Module:  # fmt: skip
    return LatentMLPEncoder(in_dim, cfg.hidden_dim, cfg.n_layers, cfg.dropout)


def build_transformer(cfg: GeneEncoderConfig, in_dim: int,
                      feature_names: list[str] | None) -> nn.Module:  # fmt: skip
    return GeneTransformer(
        in_dim,
        hidden_dim=cfg.hidden_dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_bins=cfg.n_bins,
        dropout=cfg.dropout,
        max_genes=cfg.max_genes,
    )


def build_frozen_pretrained(cfg: GeneEncoderConfig, in_dim: int,
                            feature_names: list[str] | None) -> nn.Module:  # fmt: skip
    return load_gene_encoder(cfg.checkpoint, in_dim, feature_names=feature_names)


def _build(cfg: GeneEncoderConfig, in_dim: int, feature_names: list[str] | None) -> nn.Module:
    return GENE_ENCODERS.get(cfg.name).build.load()(cfg, in_dim, feature_names)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def create_gene_encoder(
    cfg: GeneEncoderConfig, in_dim: int, *, feature_names: list[str] | None = None
) -> nn.Module:
    """Build the gene encoder ``cfg.name`` for inputs of width ``in_dim``; ``.out_dim`` is set.

    ``cfg.frozen`` freezes any encoder; ``frozen_pretrained`` is always frozen.
    """
    if in_dim < 1:
        raise ValueError(f"gene encoder {cfg.name!r}: input width must be >= 1, got {in_dim}")
    if feature_names is not None and len(feature_names) != in_dim:
        raise ValueError(f"{len(feature_names)} feature names for {in_dim} input columns")
    encoder = _build(cfg, in_dim, feature_names)
    if cfg.frozen or cfg.name == "frozen_pretrained":
        _freeze(encoder)
    return encoder


def save_gene_encoder(
    encoder: nn.Module,
    path: str | Path,
    cfg: GeneEncoderConfig,
    in_dim: int,
    *,
    feature_names: list[str] | None = None,
) -> Path:
    """Save an encoder so ``frozen_pretrained`` can load it (tensors + plain data only)."""
    if cfg.name == "frozen_pretrained":
        raise ValueError("save the underlying encoder config, not 'frozen_pretrained'")
    path = Path(path)
    payload = {
        "format": "hescape-gene-encoder/1",
        "config": cfg.model_dump(),
        "in_dim": int(in_dim),
        "feature_names": list(feature_names) if feature_names is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read_checkpoint(path: str | Path | None) -> dict[str, Any]:
    if not path:
        raise FileNotFoundError(
            "gene encoder 'frozen_pretrained' needs model.gene.checkpoint: /path/to/encoder.pt "
            "(written by hescape.models.gene.save_gene_encoder)"
        )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"gene encoder checkpoint not found: {path} (set model.gene.checkpoint)"
        )
    from hescape.models.weights import safe_torch_load

    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != "hescape-gene-encoder/1":
        raise ValueError(f"{path}: not a gene encoder checkpoint written by save_gene_encoder")
    return payload


def load_gene_encoder(
    path: str | Path | None, in_dim: int, *, feature_names: list[str] | None = None
) -> nn.Module:
    """Load a saved gene encoder (weights_only) and check it fits the data's features."""
    payload = _read_checkpoint(path)
    if payload["in_dim"] != in_dim:
        raise ValueError(
            f"{path}: encoder was trained on {payload['in_dim']} input features, the data has "
            f"{in_dim}; use the same preprocessing/gene panel as when it was saved"
        )
    saved = payload.get("feature_names")
    if saved is not None and feature_names is not None and list(saved) != list(feature_names):
        diff = [a for a, b in zip(saved, feature_names, strict=True) if a != b][:5]
        raise ValueError(
            f"{path}: feature names differ from the saved encoder's (first differences: {diff})"
        )
    cfg = GeneEncoderConfig.model_validate(payload["config"])
    encoder = _build(cfg, in_dim, feature_names)
    encoder.load_state_dict(payload["state_dict"], strict=True)
    return encoder
