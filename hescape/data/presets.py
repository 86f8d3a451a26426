"""Named simulator sizes: dry-run a study at the size of a real panel before the data arrives.

HESCAPE panels (Gindra et al., "A Large-Scale Benchmark of Cross-Modal Learning for
Histology and Gene Expression in Spatial Transcriptomics", arXiv 2508.01490): 6 gene panels,
54 donors in total. Gene panel sizes are the ``input_genes`` of the panel configs in
github.com/peng-lab/hescape (``experiments/configs/datamodule/*.yaml``): breast 280,
colon (bowel) 322, lung-healthy 343, multi-tissue 377, immuno-oncology 380, 5K 5001.
Image encoders see 224 px patches there (``src/hescape/constants.py``: 256/512 px crops
resized to 224), hence ``patch_size`` 224.

Not stated per panel in what we could read: donors and spots per donor. The presets assume
14 donors (the issue's "14+ donors") x 8,000 spots (112,000 spots: "tens to hundreds of
thousands"); override them (``--n-donors``, ``--spots-per-donor``) with your panel's numbers.
At 224 px every spot costs 147 KiB of patch store (112k spots: ~16 GiB on disk).

The ``scale-*`` presets are the sizes of ``benchmarks/panel_scaling.py``: 16 donors, 380
genes (the largest of the five targeted panels), 64 px patches, N spots in total.
"""

from __future__ import annotations

from typing import Any

from hescape.config import SimulateConfig

HESCAPE_DONORS = 14
HESCAPE_SPOTS_PER_DONOR = 8000
HESCAPE_PATCH = 224
HESCAPE_GENES = {"breast": 280, "colon": 322, "lung-healthy": 343, "multi-tissue": 377,
                 "immuno-oncology": 380, "5k": 5001}
SCALE_DONORS = 16
SCALE_GENES = 380
SCALE_PATCH = 64


def scale_fields(n_spots: int, *, n_donors: int = SCALE_DONORS, n_genes: int = SCALE_GENES,
                 patch_size: int = SCALE_PATCH) -> dict[str, Any]:
    """SimulateConfig fields of a panel of about ``n_spots`` spots over ``n_donors`` donors."""
    if n_spots < 10 * n_donors:
        raise ValueError(f"n_spots={n_spots}: need at least 10 spots per donor "
                         f"({10 * n_donors} for {n_donors} donors)")
    return {"n_donors": n_donors, "spots_per_donor": n_spots // n_donors, "n_genes": n_genes,
            "patch_size": patch_size}


def _presets() -> dict[str, dict[str, Any]]:
    out = {f"hescape-{panel}": {"n_donors": HESCAPE_DONORS,
                                "spots_per_donor": HESCAPE_SPOTS_PER_DONOR,
                                "n_genes": genes, "patch_size": HESCAPE_PATCH}
           for panel, genes in HESCAPE_GENES.items()}
    for label, n in (("10k", 10_000), ("50k", 50_000), ("200k", 200_000)):
        out[f"scale-{label}"] = scale_fields(n)
    return out


PRESETS: dict[str, dict[str, Any]] = _presets()


def preset_names() -> list[str]:
    """Names of the presets, in order."""
    return list(PRESETS)


def preset_config(name: str, **overrides: Any) -> SimulateConfig:
    """The SimulateConfig of preset ``name`` with ``overrides`` (SimulateConfig fields) on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset {name!r}; choose one of {preset_names()}")
    return SimulateConfig(**{**PRESETS[name], **overrides})


def store_bytes(cfg: SimulateConfig) -> int:
    """Size of the patch store this config writes (uint8 N x S x S x 3)."""
    return cfg.n_donors * cfg.spots_per_donor * cfg.patch_size ** 2 * 3


def preset_table() -> str:
    """One line per preset: donors, spots, genes, patch size, patch store size."""
    lines = [f"{'preset':26s} {'donors':>6s} {'spots':>9s} {'genes':>6s} {'px':>4s} {'store':>9s}"]
    for name in PRESETS:
        cfg = preset_config(name)
        n = cfg.n_donors * cfg.spots_per_donor
        lines.append(f"{name:26s} {cfg.n_donors:6d} {n:9,d} {cfg.n_genes:6d} "
                     f"{cfg.patch_size:4d} {store_bytes(cfg) / 2**30:7.1f} GiB")
    return "\n".join(lines)
