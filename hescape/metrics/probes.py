"""Downstream probes on frozen embeddings: per-donor ridge and BLEEP expression, spot label.

All probes fit on training rows only. The expression probes here choose the top highly
variable genes on the TRAINING rows (variance of library-size-normalised log expression,
ties to the lower gene index) and score Pearson r per gene WITHIN each held-out donor, mean /
median over genes, averaged over donors (``pearson.py``). That is not HEST-Benchmark's
protocol (Pearson on the concatenated test split, log1p of raw counts, fixed PCA 256,
HEST's ridge): ``hest.py`` runs that one. The mutation probe lives in ``mutation.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from hescape.metrics.pearson import pearson_by_donor
from hescape.metrics.retrieval import SimilarityEngine, topk_blocked


# ----------------------------------------------------------------------- expression
def top_variable_genes(train_expr: np.ndarray, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` genes with the highest variance over the given (train) rows."""
    var = np.asarray(train_expr, dtype=np.float64).var(axis=0)
    order = np.lexsort((np.arange(var.size), -var))
    return np.sort(order[: min(n_top, var.size)])


def _check_expr(emb: np.ndarray, expr: np.ndarray, genes: Sequence[str], what: str) -> None:
    if len(emb) != len(expr):
        raise ValueError(f"{what}: {len(emb)} embedding rows but {len(expr)} expression rows")
    if expr.ndim != 2 or expr.shape[1] != len(genes):
        raise ValueError(f"{what}: expression has {expr.shape} but {len(genes)} gene names")


def ridge_per_donor_probe(
    train_emb: np.ndarray,
    train_expr: np.ndarray,
    test_emb: np.ndarray,
    test_expr: np.ndarray,
    *,
    test_donors: Sequence | np.ndarray,
    gene_names: Sequence[str],
    n_top: int = 50,
    pca: int = 256,
    alpha: float = 1.0,
) -> tuple[dict[str, float], pd.DataFrame]:
    """StandardScaler -> PCA (``pca`` components, capped at rows - 1 and feature dims) ->
    Ridge(``alpha``) onto the train-HVG expression, Pearson per held-out donor.

    Returns ``ridge_per_donor_*`` metrics (``pearson_by_donor``; ``_pca_dim`` = the PCA
    dimension actually used) and a per-gene x donor table.
    """
    _check_expr(train_emb, train_expr, gene_names, "train")
    _check_expr(test_emb, test_expr, gene_names, "test")
    genes = top_variable_genes(train_expr, n_top)
    n_comp = max(1, min(pca, len(train_emb) - 1, train_emb.shape[1]))
    model = make_pipeline(StandardScaler(), PCA(n_comp, random_state=0), Ridge(alpha=alpha))
    model.fit(train_emb, train_expr[:, genes])
    pred = model.predict(test_emb)
    names = [str(gene_names[g]) for g in genes]
    metrics, table = pearson_by_donor(
        pred, test_expr[:, genes], test_donors, names, "ridge_per_donor"
    )
    metrics["ridge_per_donor_pca_dim"] = float(n_comp)
    return metrics, table


def retrieval_expression_probe(
    train_gene_emb: np.ndarray,
    train_expr: np.ndarray,
    test_img_emb: np.ndarray,
    test_expr: np.ndarray,
    *,
    test_donors: Sequence | np.ndarray,
    gene_names: Sequence[str],
    k: int = 10,
    n_top: int = 50,
    block_size: int = 1024,
    engine: SimilarityEngine | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """BLEEP-style probe: predict a test spot as the mean expression of its top-``k``
    training spots, retrieved image -> gene embedding (cross-modal). Metrics ``bleep_*``;
    ``engine``: where the retrieval's products run (``retrieval.topk_blocked``)."""
    _check_expr(train_gene_emb, train_expr, gene_names, "train")
    _check_expr(test_img_emb, test_expr, gene_names, "test")
    genes = top_variable_genes(train_expr, n_top)
    idx, _ = topk_blocked(test_img_emb, train_gene_emb, k, block_size, engine=engine)
    pred = train_expr[:, genes][idx].mean(axis=1)
    names = [str(gene_names[g]) for g in genes]
    metrics, table = pearson_by_donor(pred, test_expr[:, genes], test_donors, names, "bleep")
    metrics["bleep_k"] = float(idx.shape[1])
    return metrics, table


# --------------------------------------------------------------------------- labels
def present(labels: Sequence | np.ndarray) -> np.ndarray:
    """Boolean mask of non-missing labels (None, NaN and "" are missing)."""
    s = pd.Series(np.asarray(labels, dtype=object))
    return (s.notna() & (s.astype(str) != "")).to_numpy()


def label_probe(
    train_emb: np.ndarray,
    train_labels: Sequence | np.ndarray,
    test_emb: np.ndarray,
    test_labels: Sequence | np.ndarray,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Spot-level label probe (tissue/state): logistic regression on standardised embeddings.

    Returns ``label_balanced_accuracy``, ``label_macro_f1``, ``label_n_classes`` and
    ``label_n_test``. Rows with a missing label are dropped.

    The fit runs on single-threaded BLAS: L-BFGS makes hundreds of skinny products
    (N x D by D x classes) where BLAS threads only wait on each other (7-60x slower with 2
    threads on 2 shared cores, ``benchmarks/eval_profile.py``), and the figure no longer
    depends on the machine's core count (L-BFGS stops at a tolerance, so another summation
    order stops it elsewhere: 1e-4 to 1e-3 balanced accuracy between 1 and 2 threads).
    """
    tr, te = present(train_labels), present(test_labels)
    y_tr = np.asarray(train_labels, dtype=object)[tr].astype(str)
    y_te = np.asarray(test_labels, dtype=object)[te].astype(str)
    if len(np.unique(y_tr)) < 2:
        raise ValueError("label_probe: the training rows hold fewer than 2 label values")
    if y_te.size == 0:
        raise ValueError("label_probe: no labelled test rows")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    with threadpool_limits(limits=1, user_api="blas"):  # see the docstring
        model.fit(np.asarray(train_emb)[tr], y_tr)
        pred = model.predict(np.asarray(test_emb)[te])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # test split may lack some classes
        bacc = balanced_accuracy_score(y_te, pred)
    return {
        "label_balanced_accuracy": float(bacc),
        "label_macro_f1": float(f1_score(y_te, pred, average="macro", zero_division=0)),
        "label_n_classes": float(len(np.unique(y_tr))),
        "label_n_test": float(y_te.size),
    }
