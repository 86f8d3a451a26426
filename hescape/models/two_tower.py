"""The two-tower model: image and gene encoders -> projections -> L2-normalised embeddings.

``forward`` returns a dict whose keys are the loss's arguments (open_clip style)::

    img_emb, gene_emb   B x embed_dim, unit norm
    logit_scale         scalar, log-space (the loss uses exp), clamped to [0, ln 100]
    logit_bias          scalar (SigLIP) or None (CLIP)
    donor_logits        {tower: B x n_donors} for towers in model.adversary.towers (empty if off)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hescape.config import LossConfig, ModelConfig
from hescape.losses.spec import LOSSES
from hescape.models.adversary import DonorClassifier
from hescape.models.gene import create_gene_encoder
from hescape.models.heads import create_projection
from hescape.models.image import create_image_encoder

MAX_LOGIT_SCALE = math.log(100.0)


class TwoTower(nn.Module):
    """Image tower + gene tower + learnable temperature (+ SigLIP bias, donor adversary)."""

    def __init__(
        self,
        model: ModelConfig,
        loss: LossConfig,
        *,
        gene_in_dim: int,
        n_donors: int,
        feature_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = create_image_encoder(model.image)
        self.gene_encoder = create_gene_encoder(
            model.gene, gene_in_dim, feature_names=feature_names
        )
        self.image_proj = create_projection(
            model.projection, self.image_encoder.out_dim, model.embed_dim
        )
        self.gene_proj = create_projection(
            model.projection, self.gene_encoder.out_dim, model.embed_dim
        )
        init_scale = math.log(1.0 / loss.init_temperature)
        self.logit_scale = nn.Parameter(
            torch.tensor(init_scale), requires_grad=loss.learn_temperature
        )
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(loss.siglip_init_bias)))
            if LOSSES.get(loss.name).learns_bias
            else None
        )
        adv = model.adversary
        towers = sorted(set(adv.towers)) if adv.enabled else []
        self.adversaries = nn.ModuleDict(
            {t: DonorClassifier(model.embed_dim, n_donors, adv.hidden_dim) for t in towers}
        )
        self.embed_dim = model.embed_dim

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the raw ``logit_scale`` parameter into [0, ln 100] in place (as open_clip
        does after each optimiser step). The clamp in ``forward`` alone has zero gradient
        outside the range, so a parameter pushed past ln 100 would never come back."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    @property
    def image_frozen(self) -> bool:
        """True when the image backbone does not train (its features can be cached)."""
        return self.image_encoder.mode == "frozen"

    def encode_image(
        self, image: Tensor | None = None, *, features: Tensor | None = None
    ) -> Tensor:
        """Unit-norm image embedding from normalised images or precomputed backbone features."""
        if (image is None) == (features is None):
            raise ValueError(
                "pass exactly one of image= (B x 3 x S x S) or features= (B x out_dim)"
            )
        feats = self.image_encoder(image) if features is None else features
        return F.normalize(self.image_proj(feats), dim=-1)

    def encode_gene(self, gene: Tensor) -> Tensor:
        """Unit-norm gene embedding."""
        return F.normalize(self.gene_proj(self.gene_encoder(gene)), dim=-1)

    def forward(
        self,
        *,
        gene: Tensor,
        image: Tensor | None = None,
        image_features: Tensor | None = None,
        adv_weight: float = 0.0,
    ) -> dict[str, Tensor | None | dict[str, Tensor]]:
        """Both embeddings, temperature, bias and donor logits (see module docstring)."""
        img_emb = self.encode_image(image, features=image_features)
        gene_emb = self.encode_gene(gene)
        embs = {"image": img_emb, "gene": gene_emb}
        donor_logits = {t: head(embs[t], adv_weight) for t, head in self.adversaries.items()}
        return {
            "img_emb": img_emb,
            "gene_emb": gene_emb,
            "logit_scale": clamp_scale(self.logit_scale),
            "logit_bias": self.logit_bias,
            "donor_logits": donor_logits,
        }


def clamp_scale(scale: Tensor) -> Tensor:
    """``scale`` clamped to [0, ln 100], bounds in its own dtype: at exactly the (float32)
    bound the gradient still flows (a float64 bound compares the rounded-up float32 value
    as outside and zeroes the gradient)."""
    return scale.clamp(scale.new_tensor(0.0), scale.new_tensor(MAX_LOGIT_SCALE))


def build_model(
    model: ModelConfig,
    loss: LossConfig,
    *,
    gene_in_dim: int,
    n_donors: int,
    feature_names: list[str] | None = None,
) -> TwoTower:
    """Build the :class:`TwoTower` for a study's model and loss config."""
    return TwoTower(
        model, loss, gene_in_dim=gene_in_dim, n_donors=n_donors, feature_names=feature_names
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over trainable params: decay on >=2-D weights; none on 1-D params
    (biases, norm scales), ``logit_scale`` or ``logit_bias``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.split(".")[-1] in ("logit_scale", "logit_bias")
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
