"""Gene encoders and projection heads a config can name: light specs (no torch).

Config validation reads these registries (names, and which preprocessing output kinds a
gene encoder accepts) without importing torch; each spec points at its builder with a
:class:`~hescape.lazy.Ref`, imported only when a model is built (``hescape.models.gene``,
``hescape.models.heads``). Image encoders are named by the presets in
``hescape.models.presets`` (or any timm architecture).

To add a gene encoder: its ``nn.Module`` and a builder ``(cfg, in_dim, feature_names) ->
module`` in ``gene.py``, and one ``GENE_ENCODERS.add(GeneEncoderSpec(...))`` here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hescape.lazy import Ref
from hescape.preprocess.spec import KINDS, method_names, section_facts
from hescape.registry import Registry

BOTH = frozenset({"expression", "features"})


@dataclass(frozen=True, kw_only=True)
class GeneEncoderSpec:
    """A gene encoder: its builder and the preprocessing output kinds it accepts
    (``hescape.preprocess.spec.KINDS``)."""

    name: str
    summary: str
    accepts: frozenset[str]
    build: Ref  # -> (cfg: GeneEncoderConfig, in_dim: int, feature_names) -> nn.Module with out_dim


@dataclass(frozen=True, kw_only=True)
class ProjectionSpec:
    """A projection head ``encoder features -> embed_dim``: ``build(in_dim, embed_dim)``."""

    name: str
    summary: str
    build: Ref


GENE_ENCODERS: Registry[GeneEncoderSpec] = Registry("gene encoder")
PROJECTIONS: Registry[ProjectionSpec] = Registry("projection head")

GENE_ENCODERS.add(GeneEncoderSpec(
    name="mlp", summary="MLP", accepts=BOTH, build=Ref("hescape.models.gene:build_mlp")))
GENE_ENCODERS.add(GeneEncoderSpec(
    name="latent_mlp", summary="input LayerNorm + residual MLP (PCs, latents)", accepts=BOTH,
    build=Ref("hescape.models.gene:build_latent_mlp")))
GENE_ENCODERS.add(GeneEncoderSpec(
    name="transformer", summary="gene tokens with binned non-negative expression values",
    accepts=frozenset({"expression"}), build=Ref("hescape.models.gene:build_transformer")))
# what a saved encoder accepts is its own (checked when it runs: the inner encoder's guard)
GENE_ENCODERS.add(GeneEncoderSpec(
    name="frozen_pretrained", summary="a saved gene encoder, frozen", accepts=BOTH,
    build=Ref("hescape.models.gene:build_frozen_pretrained")))

PROJECTIONS.add(ProjectionSpec(
    name="linear", summary="one linear layer", build=Ref("hescape.models.heads:linear")))
PROJECTIONS.add(ProjectionSpec(
    name="mlp", summary="Linear, GELU, Linear", build=Ref("hescape.models.heads:mlp")))


def gene_input_problem(gene: Any, expression: Mapping[str, Any]) -> str | None:
    """Why encoder ``gene.name`` cannot take the output of the ``preprocess.expression``
    section ``expression`` (a plain dict), or None when it can."""
    kind, _ = section_facts(expression)
    spec = GENE_ENCODERS.get(gene.name)
    if kind in spec.accepts:
        return None
    method = expression.get("method", "none")
    encoders = [s.name for s in GENE_ENCODERS.entries() if kind in s.accepts]
    producers = [m for m in method_names() if section_facts({"method": m})[0] in spec.accepts]
    takes = " or ".join(KINDS[k] for k in sorted(spec.accepts))
    return (f"model.gene.name={gene.name!r} takes {takes}, but preprocess.expression.method="
            f"{method!r} outputs {KINDS[kind]}; use model.gene.name {' / '.join(encoders)}, or "
            f"a preprocessing method whose output it takes ({', '.join(producers)} with "
            "default options)")
