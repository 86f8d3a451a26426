"""Run every applicable probe on one feature matrix, so the model and baselines share a protocol."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hescape.config import EvalConfig
from hescape.evaluate.probes import expression_probe, label_probe, mutation_probe, present

MUTATION_CV_FOLDS = 5


@dataclass
class EvalData:
    """Everything about the rows that does not depend on the features being probed."""

    obs: pd.DataFrame
    train_idx: np.ndarray
    test_idx: np.ndarray
    expr_log: np.ndarray | None
    gene_names: list[str] | None
    label_key: str | None
    mutation_key: str | None
    batch_key: str
    cfg: EvalConfig

    def column(self, key: str | None, rows: np.ndarray) -> np.ndarray | None:
        """Values of an obs column on ``rows``, or None when the key is unset or absent."""
        if key is None or key not in self.obs.columns:
            return None
        return self.obs[key].to_numpy()[rows]

    @property
    def group_key(self) -> str:
        """Mutation-probe aggregation unit: slide when recorded, else donor."""
        return "slide" if "slide" in self.obs.columns else "donor"


def run_expression(feats: np.ndarray, data: EvalData) -> tuple[dict[str, float], pd.DataFrame]:
    """HEST-Benchmark expression probe of ``feats`` (train rows -> held-out rows)."""
    tr, te, cfg = data.train_idx, data.test_idx, data.cfg
    return expression_probe(
        feats[tr],
        data.expr_log[tr],
        feats[te],
        data.expr_log[te],
        test_donors=data.obs["donor"].to_numpy()[te],
        gene_names=data.gene_names,
        n_top=cfg.probe_top_genes,
        pca=cfg.probe_pca,
        alpha=cfg.probe_alpha,
    )


def run_label(feats: np.ndarray, data: EvalData) -> dict[str, float]:
    """Spot-level label probe; empty when no label column or too few classes."""
    y_tr, y_te = (
        data.column(data.label_key, data.train_idx),
        data.column(data.label_key, data.test_idx),
    )
    if y_tr is None:
        return {}
    try:
        return label_probe(
            feats[data.train_idx], y_tr, feats[data.test_idx], y_te, seed=data.cfg.seed
        )
    except ValueError as exc:
        warnings.warn(f"label probe skipped: {exc}", UserWarning, stacklevel=2)
        return {}


def run_mutation(feats: np.ndarray, data: EvalData) -> dict[str, float]:
    """Donor-grouped mutation probe over train + test rows (the probe's own CV splits donors)."""
    rows = np.concatenate([data.train_idx, data.test_idx])
    labels = data.column(data.mutation_key, rows)
    if labels is None:
        return {}
    try:
        return mutation_probe(
            feats[rows],
            group_ids=data.obs[data.group_key].to_numpy()[rows],
            labels=labels,
            donors=data.obs["donor"].to_numpy()[rows],
            cv_folds=MUTATION_CV_FOLDS,
            seed=data.cfg.seed,
            min_donors_for_claim=data.cfg.min_donors_for_claim,
        )
    except ValueError as exc:
        warnings.warn(f"mutation probe skipped: {exc}", UserWarning, stacklevel=2)
        return {}


def run_mixing(feats: np.ndarray, data: EvalData) -> dict[str, float]:
    """Batch-mixing (+ bio conservation with a label column) on the held-out rows.

    With a label column, rows without a label are left out (``subsample_n`` records the
    count); too few rows for the neighbourhood metrics skip them with a warning.
    """
    from hescape.evaluate.mixing import mixing_metrics

    te = data.test_idx
    labels = data.column(data.label_key, te)
    if labels is not None:
        keep = present(labels)
        te, labels = te[keep], labels[keep]
    try:
        return mixing_metrics(
            feats[te],
            data.obs[data.batch_key].to_numpy()[te],
            labels,
            subsample=data.cfg.mixing_subsample,
            seed=data.cfg.seed,
        )
    except ValueError as exc:
        warnings.warn(f"mixing metrics skipped: {exc}", UserWarning, stacklevel=2)
        return {}


def probe_suite(
    feats: np.ndarray, data: EvalData, *, prefix: str, mix_prefix: str, expression: bool
) -> tuple[dict[str, float], pd.DataFrame | None]:
    """Expression (optional), label, mutation and mixing metrics of one feature matrix.

    Probe keys get ``prefix``, mixing keys ``mix_prefix``; returns the per-gene table too.
    """
    feats = np.asarray(feats, dtype=np.float32)
    out: dict[str, float] = {}
    table = None
    if expression and data.expr_log is not None:
        m, table = run_expression(feats, data)
        out.update({prefix + k: v for k, v in m.items()})
    for m in (run_label(feats, data), run_mutation(feats, data)):
        out.update({prefix + k: v for k, v in m.items()})
    out.update({mix_prefix + k: v for k, v in run_mixing(feats, data).items()})
    return out, table
