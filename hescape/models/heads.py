"""Projection heads: encoder features -> ``embed_dim`` (before L2 normalisation)."""

from __future__ import annotations

from torch import nn

from hescape.registry import Registry

PROJECTIONS: Registry[nn.Module] = Registry("projection head")


@PROJECTIONS.register("linear")
def _linear(in_dim: int, embed_dim: int) -> nn.Module:
    return nn.Linear(in_dim, embed_dim)


@PROJECTIONS.register("mlp")
def _mlp(in_dim: int, embed_dim: int) -> nn.Module:
    hidden = max(in_dim, embed_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))


def create_projection(kind: str, in_dim: int, embed_dim: int) -> nn.Module:
    """A projection head by name (``linear`` or ``mlp``)."""
    return PROJECTIONS.create(kind, in_dim, embed_dim)
