"""Baselines and the comparison table: frozen image-encoder features and PCA of expression.

Baselines are feature sets like the trained embeddings (``pipeline.feature_sets``), so every
registered probe runs on them with the same protocol. The comparison table answers, per
task, whether contrastive training helped: HESCAPE reports that it helps mutation
classification but hurts expression prediction. PCA of expression is fit on the training
rows only; probes that predict expression skip it (predicting expression from expression is
not a comparison). Task rows come from the probe registry (``ProbeSpec.tasks``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

PCA_COMPONENTS = 30


def pca_expression(expr_log: np.ndarray, train_idx: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised expression, fit on the training rows, applied to all rows."""
    n_comp = max(1, min(PCA_COMPONENTS, expr_log.shape[1], len(train_idx) - 1))
    pca = PCA(n_comp, random_state=seed).fit(expr_log[train_idx])
    return pca.transform(expr_log).astype(np.float32)


def as_baselines(features: np.ndarray | Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Normalise baseline image features: one array means the frozen image encoder's."""
    if features is None:
        return {}
    if isinstance(features, Mapping):
        return {str(k): np.asarray(v) for k, v in features.items()}
    return {"frozen": np.asarray(features)}


def comparison_columns(metrics: Mapping[str, float]) -> dict[str, str]:
    """``{feature set: column}`` present in ``metrics`` (keys ``[{split}/]{features}/{metric}``):
    ``img`` -> contrastive_img, ``gene`` -> contrastive_gene, ``baseline_{name}`` ->
    ``{name}_img``, ``baseline_pca`` -> pca_expr (last)."""
    sets = {k.split("/")[-2] for k in metrics if k.count("/") >= 1}
    cols = {"img": "contrastive_img", "gene": "contrastive_gene"}
    out = {s: c for s, c in cols.items() if s in sets}
    images = sorted(s for s in sets if s.startswith("baseline_") and s != "baseline_pca")
    out.update({s: f"{s.removeprefix('baseline_')}_img" for s in images})
    if "baseline_pca" in sets:
        out["baseline_pca"] = "pca_expr"
    return out


def comparison_table(metrics: Mapping[str, float]) -> pd.DataFrame:
    """Tasks (registry) x feature sets; NaN = not applicable. ``metrics`` keys may carry a
    ``{split}/`` prefix only if all do (e.g. the report strips ``test/`` first)."""
    from hescape.evaluate.probe_spec import comparison_tasks

    columns = comparison_columns(metrics)
    if not columns:
        return pd.DataFrame()
    lookup = {tuple(k.split("/")[-2:]): v for k, v in metrics.items() if k.count("/") >= 1}
    rows = {task: [lookup.get((fs, metric), np.nan) for fs in columns]
            for task, metric in comparison_tasks().items()}  # fmt: skip
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(columns.values()),
                                   dtype=float)  # fmt: skip
    return table.dropna(how="all")
