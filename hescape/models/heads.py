"""Projection heads: encoder features -> ``embed_dim`` (before L2 normalisation).

Named by ``model.projection``; the specs are in ``hescape.models.spec.PROJECTIONS``.
"""

from __future__ import annotations

from torch import nn

from hescape.models.spec import PROJECTIONS


def linear(in_dim: int, embed_dim: int) -> nn.Module:
    return nn.Linear(in_dim, embed_dim)


def mlp(in_dim: int, embed_dim: int) -> nn.Module:
    hidden = max(in_dim, embed_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))


def create_projection(kind: str, in_dim: int, embed_dim: int) -> nn.Module:
    """A projection head by name (``PROJECTIONS``: ``linear`` or ``mlp``)."""
    return PROJECTIONS.get(kind).build.load()(in_dim, embed_dim)
