"""HEST-Benchmark's expression probe, exactly: the one figure here named after HEST.

Checked against mahmoodlab/HEST (``src/hest/bench/benchmark.py::predict_single_split`` and
``BenchmarkConfig``, ``src/hest/bench/trainer.py::train_test_reg``,
``src/hest/bench/st_dataset.py::load_adata``). The PCA step comes from ``BenchmarkConfig``'s
defaults (``dimreduce="PCA"``, ``latent_dim=256``); ``bench_config/bench_config.yaml`` does
not set it (its ``dimreduce`` line is commented out).

- features: ``Pipeline([StandardScaler(), PCA(n_components=256, random_state=seed)])`` fit on
  the training split (in the features' own dtype), applied to the test split; HEST wraps the
  output in ``torch.Tensor``, which rounds it to float32;
- targets: ``log1p`` of the raw counts of the selected genes in float64 (``normalize_adata``
  casts to float64 and only calls ``sc.pp.log1p``: no library-size normalisation, despite
  its docstring);
- ``Ridge(solver="lsqr", alpha=100 / (256 * n_genes), fit_intercept=False, max_iter=1000,
  random_state=seed)`` fit in FLOAT64: sklearn's ``check_array`` sees no numpy dtype on a
  ``torch.Tensor`` (``torch.float32`` has no ``.kind``), so Ridge's
  ``dtype=[float64, float32]`` converts it to float64 (checked with sklearn 1.9, torch 2.14;
  a float32 *numpy* array would stay float32 and lsqr would run in float32, 1e-4 to 4e-4
  away in per-gene Pearson). Prediction multiplies the float32 test features by the float64
  coefficients, i.e. in float64. Here: the PCA output is rounded to float32 and cast back
  to float64 before the ridge, which is the same arithmetic;
- Pearson r per gene (``scipy.stats.pearsonr``) on the CONCATENATED test split, then the
  mean (``pearson_mean``) and standard deviation (``pearson_std``) over genes; a gene
  constant on the test split gives NaN there and so a NaN mean, as in HEST.

``seed`` is HEST's ``--seed`` (``BenchmarkConfig.seed`` defaults to 1; the evaluation passes
``eval.seed``): it seeds PCA, and where sklearn's ``svd_solver="auto"`` picks the
randomized solver (more than 1000 feature dims or fewer than 10 training rows per dim, and
both dims and rows above 320) the seed moves the figure by ~1e-4 (docs/measurements.md).

HEST ships a fixed list of the 50 most variable genes per task (``var_50genes.json``); here
the genes are the ``n_top`` with the highest variance of ``log1p`` counts over the TRAINING
rows. HEST cannot run PCA 256 on fewer than 256 feature dimensions or training rows (sklearn
refuses); ``hest_probe`` raises ``HestUnavailable`` naming which, and the evaluation reports
NaN with that reason instead of a smaller PCA under HEST's name. numpy / sklearn only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from hescape.metrics.pearson import pearson_columns

HEST_PCA_DIM = 256
HEST_ALPHA_NUMERATOR = 100.0
HEST_MAX_ITER = 1000


class HestUnavailable(ValueError):
    """The HEST recipe cannot run on these inputs (too few feature dims or training rows)."""


def log1p_counts(counts: Any, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """Dense float64 ``log1p(counts[rows][:, cols])`` of a dense or scipy-sparse matrix."""
    sub = counts[rows] if cols is None else counts[rows][:, cols]
    dense = sub.toarray() if sparse.issparse(sub) else np.asarray(sub)
    return np.log1p(dense.astype(np.float64))


def log1p_variance(counts: Any, rows: np.ndarray) -> np.ndarray:
    """Per-gene variance of ``log1p(counts)`` over ``rows`` (sparse stays sparse)."""
    sub = counts[rows]
    if sparse.issparse(sub):
        x = sparse.csr_matrix(sub, dtype=np.float64).log1p()
        mean = np.asarray(x.mean(axis=0)).ravel()
        return np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    return np.log1p(np.asarray(sub, dtype=np.float64)).var(axis=0)


def check_hest_inputs(n_train: int, n_features: int) -> None:
    """Raise ``HestUnavailable`` when PCA 256 cannot be fit, saying which side is short."""
    short = []
    if n_features < HEST_PCA_DIM:
        short.append(f"the features have {n_features} dimensions")
    if n_train < HEST_PCA_DIM:
        short.append(f"there are {n_train} training rows")
    if short:
        raise HestUnavailable(
            f"HEST's PCA to {HEST_PCA_DIM} components cannot run: {' and '.join(short)} "
            f"(< {HEST_PCA_DIM}); no HEST figure (a smaller PCA would not be HEST's protocol)"
        )


def hest_genes(train_counts: Any, n_top: int) -> np.ndarray:
    """The ``n_top`` genes with the highest log1p-count variance on the training rows."""
    var = log1p_variance(train_counts, np.arange(train_counts.shape[0]))
    order = np.lexsort((np.arange(var.size), -var))
    return np.sort(order[: min(n_top, var.size)])


def to_hest_tensor_values(x: np.ndarray) -> np.ndarray:
    """What sklearn's Ridge computes with after HEST's ``torch.Tensor(x)``: ``x`` rounded to
    float32, held as float64 (module docstring)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def hest_predict(
    train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray, *, seed: int = 0
) -> np.ndarray:
    """HEST's PCA-256 + ridge prediction of ``test`` targets (see module docstring)."""
    check_hest_inputs(len(train_feats), np.shape(train_feats)[1])
    pipe = Pipeline([("scaler", StandardScaler()),
                     ("PCA", PCA(n_components=HEST_PCA_DIM, random_state=seed))])  # fmt: skip
    # torch.Tensor(...) in HEST: float32 rounding; Ridge then converts the tensor to float64
    x_train = to_hest_tensor_values(pipe.fit_transform(train_feats))
    x_test = to_hest_tensor_values(pipe.transform(test_feats))
    alpha = HEST_ALPHA_NUMERATOR / (x_train.shape[1] * train_y.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False,
                max_iter=HEST_MAX_ITER)  # fmt: skip
    reg.fit(x_train, train_y)
    return reg.predict(x_test)


def hest_probe(
    train_feats: np.ndarray,
    train_counts: Any,
    test_feats: np.ndarray,
    test_counts: Any,
    *,
    gene_names: Sequence[str],
    test_donors: Sequence | np.ndarray,
    n_top: int = 50,
    seed: int = 0,
) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame]:
    """HEST-Benchmark probe -> (metrics, per-gene table, per-donor table).

    Metrics ``hest_pearson_mean`` / ``_median`` / ``_std`` (over genes, Pearson on the
    concatenated test split), ``hest_pca_dim``, ``hest_n_genes``, ``hest_n_train``,
    ``hest_n_test``. The per-donor table (``metric, donor, value, n``) holds
    ``hest_pearson_mean_within_donor``: the same predictions scored within each donor (a
    breakdown, not a decomposition of the headline).
    """
    if len(train_feats) != train_counts.shape[0] or len(test_feats) != test_counts.shape[0]:
        raise ValueError("hest_probe: feature and count rows differ")
    check_hest_inputs(len(train_feats), np.shape(train_feats)[1])
    genes = hest_genes(train_counts, n_top)
    y_train = log1p_counts(train_counts, np.arange(train_counts.shape[0]), genes)
    y_test = log1p_counts(test_counts, np.arange(test_counts.shape[0]), genes)
    pred = hest_predict(np.asarray(train_feats), y_train, np.asarray(test_feats), seed=seed)
    r = pearson_columns(pred, y_test)
    names = [str(gene_names[g]) for g in genes]
    metrics = {
        "hest_pearson_mean": float(np.mean(r)),
        "hest_pearson_median": float(np.median(r)),
        "hest_pearson_std": float(np.std(r)),
        "hest_pca_dim": float(HEST_PCA_DIM),
        "hest_n_genes": float(len(genes)),
        "hest_n_train": float(len(train_feats)),
        "hest_n_test": float(len(test_feats)),
    }
    table = pd.DataFrame({"gene": names, "donor": "(all test)", "pearson": r,
                          "n_spots": len(y_test)})  # fmt: skip
    return metrics, table, _within_donor(pred, y_test, np.asarray(test_donors))


def _within_donor(pred: np.ndarray, true: np.ndarray, donors: np.ndarray) -> pd.DataFrame:
    rows = []
    for donor in np.unique(donors):
        mask = donors == donor
        r = pearson_columns(pred[mask], true[mask])
        value = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
        rows.append(("hest_pearson_mean_within_donor", str(donor), value, int(mask.sum())))
    return pd.DataFrame(rows, columns=["metric", "donor", "value", "n"])
