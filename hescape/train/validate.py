"""Validation during training: loss and whole-set retrieval on the validation donors, and
how well a linear probe still predicts the donor from each embedding (vs chance)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from hescape.config import StudyConfig
from hescape.losses import create_loss
from hescape.train.device import Compute
from hescape.train.embed import compute_embeddings

PROBE_MAX_ROWS = 2000


class RunningMeans:
    """Means of the training-step scalars between two evaluations (no per-step sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.adv_hits: dict[str, float] = defaultdict(float)
        self.adv_rows = 0

    def add(self, out: dict[str, Any], donors: torch.Tensor, **scalars: torch.Tensor) -> None:
        scalars["temperature"] = 1.0 / out["logit_scale"].detach().float().exp()
        for name, value in scalars.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1
        for tower, logits in out["donor_logits"].items():
            self.adv_hits[tower] += float((logits.argmax(1) == donors).sum())
        if out["donor_logits"]:
            self.adv_rows += len(donors)

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        names = {"loss": "train/loss", "contrastive": "train/contrastive",
                 "adv": "train/adv_loss", "temperature": "train/temperature"}
        out = {names.get(k, f"train/{k}"): float(v) / n for k, v in self.sums.items()}
        for tower, hits in self.adv_hits.items():
            out[f"train/adv_acc_{tower}"] = hits / max(self.adv_rows, 1)
        return out


def embed_rows(model: torch.nn.Module, data: Any, rows: np.ndarray, cfg: StudyConfig, *,
               compute: Compute, loss_fn: Any = None) -> dict[str, Any]:
    """``compute_embeddings`` of ``rows`` of the training inputs, in batches of
    ``train.batch_size`` (``loss``: mean contrastive loss over those batches)."""
    source = ({"features": data.features} if data.features is not None
              else {"images": data.paired.patches, "stain": data.stain})
    return compute_embeddings(model, compute=compute, gene_x=data.gene_x, rows=rows,
                              batch_size=cfg.train.batch_size, loss_fn=loss_fn, **source)


def donor_probe(emb: np.ndarray, donors: np.ndarray, *, seed: int = 0) -> tuple[float, float]:
    """Cross-validated logistic-regression donor accuracy and chance (majority share)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, counts = np.unique(donors, return_counts=True)
    chance = float(counts.max() / counts.sum())
    folds = int(min(3, counts.min()))
    if len(counts) < 2 or folds < 2:
        return float("nan"), chance
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, emb, donors, cv=cv).mean()), chance


def _probe_rows(data: Any, seed: int) -> tuple[np.ndarray, float]:
    """Validation rows when they span >= 2 donors, else a fixed sample of training rows."""
    donors = data.donor_names
    rows, heldout = data.val_idx, 1.0
    if len(np.unique(donors[rows])) < 2:
        rows, heldout = data.train_idx, 0.0
    if len(rows) > PROBE_MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, PROBE_MAX_ROWS, replace=False))
    return rows, heldout


def validate(model: torch.nn.Module, data: Any, cfg: StudyConfig, *,
             compute: Compute) -> dict[str, float]:
    """``val/loss``, ``val/<retrieval keys>``, ``val/donor_acc_{img,gene}``, ``val/donor_chance``.

    Donor predictability is probed on the validation donors when there are >= 2 of them,
    else on a fixed sample of training spots (``val/donor_probe_heldout`` says which).
    """
    from hescape.metrics.retrieval import cross_modal_retrieval

    ec = cfg.eval
    loss_fn = create_loss(cfg.loss)
    emb = embed_rows(model, data, data.val_idx, cfg, compute=compute, loss_fn=loss_fn)
    img, gene = emb["img"], emb["gene"]
    metrics = {"val/loss": emb["loss"]}
    retrieval = cross_modal_retrieval(
        img, gene, donors=data.donor_names[data.val_idx], ks=ec.ks, block_size=ec.block_size,
        inbatch_size=ec.inbatch_size, inbatch_repeats=ec.inbatch_repeats, seed=ec.seed)
    metrics.update({f"val/{k}": float(v) for k, v in retrieval.items()})
    rows, heldout = _probe_rows(data, ec.seed)
    if heldout == 0.0:
        emb = embed_rows(model, data, rows, cfg, compute=compute)
        img, gene = emb["img"], emb["gene"]
    else:
        img, gene = img[np.searchsorted(data.val_idx, rows)], gene[np.searchsorted(data.val_idx, rows)]
    for name, vectors in (("img", img), ("gene", gene)):
        acc, chance = donor_probe(vectors, data.donor_names[rows], seed=ec.seed)
        metrics[f"val/donor_acc_{name}"] = acc
    metrics["val/donor_chance"] = chance
    metrics["val/donor_probe_heldout"] = heldout
    return metrics
