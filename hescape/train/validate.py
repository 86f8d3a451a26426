"""Validation during training: loss and whole-set retrieval on the validation donors, and
how well a linear probe still predicts the donor from each embedding (vs chance); plus the
cheap objectives a study names (``val_objectives``: validation mixing and expression probe)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from hescape.config import StudyConfig
from hescape.losses import create_loss
from hescape.train.device import Compute
from hescape.train.embed import compute_embeddings
from hescape.train.val_objectives import objective_inputs, objective_metrics, requested

PROBE_MAX_ROWS = 2000


CURVE_KEY = "train_curve"  # a report's learning-curve points: [[step, {train/...: mean}], ...]


def curve_every(tc: Any) -> int:
    """Steps per learning-curve point (``train.log_every``; default ``eval_every // 10``)."""
    return tc.log_every or max(1, tc.eval_every // 10)


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
    """``val/loss``, ``val/<retrieval keys>``, ``val/donor_acc_{img,gene}``, ``val/donor_chance``
    (+ the ``val_objectives`` the study names, e.g. ``val/gene/ilisi``).

    Donor predictability is probed on the validation donors when there are >= 2 of them,
    else on a fixed sample of training spots (``val/donor_probe_heldout`` says which).
    Two parts: ``validation_inputs`` (the model's forward passes) and
    ``validation_metrics`` (numpy / scikit-learn only; the stacked trainer runs it in
    worker processes).
    """
    return validation_metrics(validation_inputs(model, data, cfg, compute=compute), cfg.eval)


def validation_inputs(model: torch.nn.Module, data: Any, cfg: StudyConfig, *,
                      compute: Compute) -> dict[str, Any]:
    """What ``validation_metrics`` needs: validation embeddings, loss and donors, and the
    embeddings and donors of the donor probe's rows, and what the requested cheap objectives
    read (``val_objectives.objective_inputs``) (plain arrays: picklable)."""
    loss_fn = create_loss(cfg.loss)
    emb = embed_rows(model, data, data.val_idx, cfg, compute=compute, loss_fn=loss_fn)
    rows, heldout = _probe_rows(data, cfg.eval.seed)
    if heldout == 0.0:
        probe = embed_rows(model, data, rows, cfg, compute=compute)
        probe_img, probe_gene = probe["img"], probe["gene"]
    else:
        at = np.searchsorted(data.val_idx, rows)
        probe_img, probe_gene = emb["img"][at], emb["gene"][at]
    return {"img": emb["img"], "gene": emb["gene"], "loss": emb["loss"],
            "donors": data.donor_names[data.val_idx], "probe_img": probe_img,
            "probe_gene": probe_gene, "probe_donors": data.donor_names[rows],
            "heldout": heldout, "objectives": objective_inputs(data, cfg, requested(cfg))}


def validation_metrics(inputs: dict[str, Any], ec: Any) -> dict[str, float]:
    """The metrics of ``validate`` from ``validation_inputs`` (``ec``: the eval section)."""
    from hescape.metrics.retrieval import cross_modal_retrieval

    metrics = {"val/loss": inputs["loss"]}
    retrieval = cross_modal_retrieval(
        inputs["img"], inputs["gene"], donors=inputs["donors"], ks=ec.ks,
        block_size=ec.block_size, inbatch_size=ec.inbatch_size,
        inbatch_repeats=ec.inbatch_repeats, seed=ec.seed)
    metrics.update({f"val/{k}": float(v) for k, v in retrieval.items()})
    for name in ("img", "gene"):
        acc, chance = donor_probe(inputs[f"probe_{name}"], inputs["probe_donors"], seed=ec.seed)
        metrics[f"val/donor_acc_{name}"] = acc
    metrics["val/donor_chance"] = chance
    metrics["val/donor_probe_heldout"] = inputs["heldout"]
    metrics.update(objective_metrics(inputs, inputs.get("objectives", {}), ec))
    return metrics
