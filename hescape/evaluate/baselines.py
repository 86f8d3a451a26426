"""Baselines run through the same probes: frozen image-encoder features and PCA of expression.

The comparison table answers, per task, whether contrastive training helped: HESCAPE reports
that it helps mutation classification but hurts expression prediction. PCA of expression is
fit on the training rows only; it gets no expression probe (predicting expression from
expression is not a comparison).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from hescape.evaluate.suite import EvalData, probe_suite

PCA_COMPONENTS = 30

# task -> (key of the contrastive image / gene embedding, key suffix shared by baselines)
TASKS: dict[str, tuple[str, str, str]] = {
    "expression pearson": ("probe_pearson_mean", "", "probe_pearson_mean"),
    "label bal. acc.": (
        "label_balanced_accuracy",
        "gene_label_balanced_accuracy",
        "label_balanced_accuracy",
    ),
    "label macro F1": ("label_macro_f1", "gene_label_macro_f1", "label_macro_f1"),
    "mutation AUROC": (
        "mutation_auroc_pooled",
        "gene_mutation_auroc_pooled",
        "mutation_auroc_pooled",
    ),
    "mutation bal. acc.": (
        "mutation_balanced_accuracy_pooled",
        "gene_mutation_balanced_accuracy_pooled",
        "mutation_balanced_accuracy_pooled",
    ),
    "batch mixing iLISI": ("img_ilisi", "gene_ilisi", "ilisi"),
    "bio NMI": ("img_nmi", "gene_nmi", "nmi"),
}


def pca_expression(expr_log: np.ndarray, train_idx: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised expression, fit on the training rows, applied to all rows."""
    n_comp = max(1, min(PCA_COMPONENTS, expr_log.shape[1], len(train_idx) - 1))
    pca = PCA(n_comp, random_state=seed).fit(expr_log[train_idx])
    return pca.transform(expr_log).astype(np.float32)


def as_baselines(features: np.ndarray | Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Normalise ``baseline_features``: one array means the frozen image features."""
    if features is None:
        return {}
    if isinstance(features, Mapping):
        return {str(k): np.asarray(v) for k, v in features.items()}
    return {"frozen": np.asarray(features)}


def run_baselines(
    data: EvalData, image_features: np.ndarray | Mapping[str, np.ndarray] | None
) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Probe each image-feature baseline (with expression probe) and PCA of expression.

    Keys: ``baseline_{name}_{probe key}`` and ``baseline_{name}_{mixing key}``.
    """
    metrics: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    n = len(data.obs)
    for name, feats in as_baselines(image_features).items():
        if len(feats) != n:
            raise ValueError(f"baseline {name!r}: {len(feats)} rows, expected {n} (obs order)")
        p = f"baseline_{name}_"
        m, table = probe_suite(feats, data, prefix=p, mix_prefix=p, expression=True)
        metrics.update(m)
        if table is not None:
            tables[name] = table
    if data.expr_log is not None:
        feats = pca_expression(data.expr_log, data.train_idx, seed=data.cfg.seed)
        m, _ = probe_suite(
            feats, data, prefix="baseline_pca_", mix_prefix="baseline_pca_", expression=False
        )
        metrics.update(m)
    return metrics, tables


def comparison_table(metrics: Mapping[str, float], baseline_names: list[str]) -> pd.DataFrame:
    """Tasks x feature sets (contrastive img / gene, each baseline, PCA); NaN = not applicable."""
    columns = ["contrastive_img", "contrastive_gene"] + [f"{b}_img" for b in baseline_names]
    columns.append("pca_expr")
    rows = {}
    for task, (img_key, gene_key, suffix) in TASKS.items():
        values = [
            metrics.get(img_key, np.nan),
            metrics.get(gene_key, np.nan) if gene_key else np.nan,
        ]
        values += [metrics.get(f"baseline_{b}_{suffix}", np.nan) for b in baseline_names]
        values.append(
            np.nan
            if task == "expression pearson"
            else metrics.get(f"baseline_pca_{suffix}", np.nan)
        )
        rows[task] = values
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns, dtype=float)
    return table.dropna(how="all")
