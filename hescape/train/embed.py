"""Embeddings from a trained TwoTower: arrays in, unit-norm numpy embeddings out.

``compute_embeddings`` is what the training loop's validation and ``hescape evaluate`` use;
``embed_split`` rebuilds everything from a checkpoint and embeds one part of a dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hescape.train.dataset import images_to_input


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def iter_outputs(
    model: torch.nn.Module, *, gene_x: np.ndarray, images: np.ndarray | None = None,
    features: np.ndarray | None = None, rows: np.ndarray | None = None,
    batch_size: int = 256, device: torch.device | str = "cpu", stain: Any = None,
) -> Iterator[dict[str, Any]]:
    """Model outputs (eval mode, no grad) over row-aligned arrays, batch by batch.

    ``images`` is uint8 N x H x W x 3 (encoded here) or ``features`` the cached backbone
    features; ``gene_x`` is the prepared expression of the same rows. ``rows`` selects
    rows (read batch by batch, so a memmapped patch store is never loaded whole).
    """
    if (images is None) == (features is None):
        raise ValueError("compute embeddings from exactly one of images= or features=")
    net = _unwrap(model).eval()
    dev = torch.device(device)
    bf16 = dev.type == "cuda"
    rows = np.arange(len(gene_x)) if rows is None else np.asarray(rows)
    for start in range(0, len(rows), batch_size):
        sl = rows[start:start + batch_size]
        gene = torch.as_tensor(np.asarray(gene_x[sl], dtype=np.float32), device=dev)
        kwargs: dict[str, Any] = {"gene": gene}
        if features is not None:
            kwargs["image_features"] = torch.as_tensor(
                np.asarray(features[sl], dtype=np.float32), device=dev)
        else:
            kwargs["image"] = images_to_input(images[sl], net.image_encoder, stain=stain).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            yield net(**kwargs)


def compute_embeddings(
    model: torch.nn.Module, *, gene_x: np.ndarray, images: np.ndarray | None = None,
    features: np.ndarray | None = None, rows: np.ndarray | None = None,
    batch_size: int = 256, device: torch.device | str = "cpu", stain: Any = None,
) -> dict[str, np.ndarray]:
    """``dict(img, gene)``: float32 unit-norm embeddings of aligned rows (all or ``rows``)."""
    img, gene = [], []
    for out in iter_outputs(model, gene_x=gene_x, images=images, features=features, rows=rows,
                            batch_size=batch_size, device=device, stain=stain):
        img.append(out["img_emb"].float().cpu().numpy())
        gene.append(out["gene_emb"].float().cpu().numpy())
    return {"img": np.concatenate(img), "gene": np.concatenate(gene)}


def embed_split(
    ckpt_dir: str | Path, paired: Any, part: str, *, batch_size: int = 256,
    device: str = "cpu", progress: bool = False,
) -> dict[str, np.ndarray]:
    """Embed the ``part`` ("train"/"val"/"test") of ``paired`` with a checkpoint's model.

    Returns ``dict(img, gene, index)`` (``index``: obs rows). The prepared expression comes
    from the preprocessing cache (computed if missing); image features from the feature
    cache when the checkpoint trained on it and it exists, else the patches are encoded.
    """
    from hescape.train.checkpoint import load_model
    from hescape.train.inputs import fit_stain, prepare_expression

    model, cfg, meta = load_model(ckpt_dir)
    prepared = prepare_expression(cfg, paired, progress=progress)
    if list(prepared.feature_names) != list(meta.get("feature_names") or prepared.feature_names):
        raise ValueError(f"{ckpt_dir}: the prepared expression's features differ from the "
                         "checkpoint's (different preprocessing or gene panel)")
    rows = paired.indices(part)
    feats_path = meta.get("features_path")
    source: dict[str, Any]
    if feats_path and Path(feats_path).is_file():
        source = {"features": np.load(feats_path, mmap_mode="r")}
    else:
        source = {"images": paired.patches, "stain": fit_stain(cfg, paired)}
    emb = compute_embeddings(model.to(device), gene_x=prepared.X, rows=rows,
                             batch_size=batch_size, device=device, **source)
    return {**emb, "index": rows}
