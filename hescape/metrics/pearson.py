"""Per-gene Pearson correlation per held-out donor.

Correlations are computed within each donor and averaged over donors, so between-donor mean
shifts cannot inflate (or deflate) r. (HEST-Benchmark instead correlates on the
concatenated test split: ``hest.py``.)
A gene that is constant within a donor (in truth or prediction) has no Pearson r there: it
is skipped and counted, not reported as 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pearson_columns(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns; NaN where either column is constant."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction and truth shapes differ: {p.shape} vs {t.shape}")
    pc, tc = p - p.mean(axis=0), t - t.mean(axis=0)
    denom = np.sqrt((pc**2).sum(axis=0) * (tc**2).sum(axis=0))
    constant = (np.ptp(p, axis=0) == 0) | (np.ptp(t, axis=0) == 0) | (len(p) < 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(axis=0) / denom
    r[constant] = np.nan
    return np.clip(r, -1.0, 1.0)


def pearson_by_donor(
    pred: np.ndarray,
    true: np.ndarray,
    donors: np.ndarray,
    gene_names: list[str],
    prefix: str,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Per-gene Pearson per donor -> (metrics, long per-gene table).

    Metrics: ``{prefix}_pearson_mean`` / ``_median`` (mean over donors of the per-donor mean /
    median over genes), ``{prefix}_n_genes``, ``{prefix}_n_donors`` and
    ``{prefix}_n_skipped_constant`` (gene x donor pairs skipped). Per-donor values:
    ``per_donor_means(table, f"{prefix}_pearson_mean")``.
    """
    donors = np.asarray(donors)
    if len(donors) != len(true):
        raise ValueError(f"test_donors has {len(donors)} entries for {len(true)} test rows")
    rows, means, medians, skipped = [], [], [], 0
    metrics: dict[str, float] = {}
    for donor in np.unique(donors):
        mask = donors == donor
        r = pearson_columns(pred[mask], true[mask])
        skipped += int(np.isnan(r).sum())
        valid = r[~np.isnan(r)]
        mean = float(valid.mean()) if valid.size else float("nan")
        means.append(mean)
        medians.append(float(np.median(valid)) if valid.size else float("nan"))
        rows.append(
            pd.DataFrame(
                {"gene": gene_names, "donor": str(donor), "pearson": r, "n_spots": int(mask.sum())}
            )
        )
    metrics[f"{prefix}_pearson_mean"] = _nanmean(means)
    metrics[f"{prefix}_pearson_median"] = _nanmean(medians)
    metrics[f"{prefix}_n_genes"] = float(len(gene_names))
    metrics[f"{prefix}_n_donors"] = float(len(means))
    metrics[f"{prefix}_n_skipped_constant"] = float(skipped)
    return metrics, pd.concat(rows, ignore_index=True)


def per_donor_means(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-donor mean over genes of a ``pearson_by_donor`` table -> ``metric, donor, value, n``."""
    rows = []
    for donor, part in table.groupby("donor", sort=True):
        r = part["pearson"].to_numpy(dtype=np.float64)
        value = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
        rows.append((metric, str(donor), value, int(part["n_spots"].iloc[0])))
    return pd.DataFrame(rows, columns=["metric", "donor", "value", "n"])


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
