"""Downstream probes on frozen embeddings: expression (HEST / BLEEP), mutation, spot label.

All probes fit on training rows (or training folds) only. Expression probes follow the
HEST-Benchmark protocol: the top highly variable genes are chosen on the TRAINING rows
(variance of log-normalised expression, ties to the lower gene index), Pearson r per gene
within each held-out donor, mean / median over genes, averaged over donors (see
``pearson.py``). The mutation probe aggregates patches per slide/donor and cross-validates
with folds grouped by donor, so no donor is ever on both sides of a fold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hescape.evaluate.pearson import pearson_by_donor
from hescape.evaluate.retrieval import topk_blocked


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


def expression_probe(
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
    """HEST-Benchmark probe: StandardScaler -> PCA -> Ridge onto the train-HVG expression.

    Returns ``probe_*`` metrics (see ``pearson_by_donor``) and a per-gene x donor table.
    """
    _check_expr(train_emb, train_expr, gene_names, "train")
    _check_expr(test_emb, test_expr, gene_names, "test")
    genes = top_variable_genes(train_expr, n_top)
    n_comp = max(1, min(pca, len(train_emb) - 1, train_emb.shape[1]))
    model = make_pipeline(StandardScaler(), PCA(n_comp, random_state=0), Ridge(alpha=alpha))
    model.fit(train_emb, train_expr[:, genes])
    pred = model.predict(test_emb)
    names = [str(gene_names[g]) for g in genes]
    metrics, table = pearson_by_donor(pred, test_expr[:, genes], test_donors, names, "probe")
    metrics["probe_pca_components"] = float(n_comp)
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
) -> tuple[dict[str, float], pd.DataFrame]:
    """BLEEP-style probe: predict a test spot as the mean expression of its top-``k``
    training spots, retrieved image -> gene embedding (cross-modal). Metrics ``bleep_*``."""
    _check_expr(train_gene_emb, train_expr, gene_names, "train")
    _check_expr(test_img_emb, test_expr, gene_names, "test")
    genes = top_variable_genes(train_expr, n_top)
    idx, _ = topk_blocked(test_img_emb, train_gene_emb, k, block_size)
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
    """
    tr, te = present(train_labels), present(test_labels)
    y_tr = np.asarray(train_labels, dtype=object)[tr].astype(str)
    y_te = np.asarray(test_labels, dtype=object)[te].astype(str)
    if len(np.unique(y_tr)) < 2:
        raise ValueError("label_probe: the training rows hold fewer than 2 label values")
    if y_te.size == 0:
        raise ValueError("label_probe: no labelled test rows")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
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


# ------------------------------------------------------------------------- mutation
def donor_folds(
    group_donors: np.ndarray, group_labels: np.ndarray, cv_folds: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """CV folds over groups (slides/donors), grouped by donor.

    Stratified group k-fold (seeded) with ``min(cv_folds, smallest class)`` splits when there
    are more than ``cv_folds`` donors and that is >= 2; otherwise leave-one-donor-out.
    """
    donors, labels = np.asarray(group_donors), np.asarray(group_labels)
    n_donors = len(np.unique(donors))
    if n_donors < 2:
        raise ValueError(f"mutation probe needs >= 2 donors for grouped CV, got {n_donors}")
    x = np.zeros((len(donors), 1))
    n_splits = min(cv_folds, int(np.unique(labels, return_counts=True)[1].min()))
    if n_donors <= cv_folds or n_splits < 2:
        splitter = LeaveOneGroupOut().split(x, labels, donors)
    else:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splitter = cv.split(x, labels, donors)
    return [(np.asarray(tr), np.asarray(te)) for tr, te in splitter]


def _groups(emb: np.ndarray, group_ids, labels, donors) -> dict:
    """One row per group: label and donor (must be constant within the group), patch rows."""
    frame = pd.DataFrame(
        {
            "group": np.asarray(group_ids).astype(str),
            "label": np.asarray(labels, dtype=object),
            "donor": np.asarray(donors).astype(str),
        }
    )
    if not (len(frame) == len(emb)):
        raise ValueError(f"mutation probe: {len(emb)} embedding rows but {len(frame)} ids")
    frame = frame[present(frame["label"])]
    frame["label"] = frame["label"].astype(str)
    per = frame.groupby("group", sort=True).agg(
        label=("label", "nunique"), donor=("donor", "nunique")
    )
    bad = per.index[(per["label"] > 1) | (per["donor"] > 1)]
    if len(bad):
        raise ValueError(
            f"mutation probe: group {bad[0]!r} mixes labels or donors; use a slide/donor-level "
            "label column and group by slide or donor"
        )
    first = frame.groupby("group", sort=True).first()
    positions = frame.groupby("group", sort=True).indices
    rows = [frame.index.to_numpy()[positions[g]] for g in first.index]
    return {"label": first["label"].to_numpy(), "donor": first["donor"].to_numpy(), "rows": rows}


def _fold_proba(emb, rows, y, tr, te, n_classes, aggregate, seed) -> np.ndarray:
    if aggregate == "attention":
        from hescape.evaluate.mil import fit_predict_mil

        bags = [emb[r] for r in rows]
        return fit_predict_mil(
            [bags[i] for i in tr], y[tr], [bags[i] for i in te], n_classes, seed=seed
        )
    means = np.stack([emb[r].mean(axis=0) for r in rows])
    model = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed),
    )
    model.fit(means[tr], y[tr])
    proba = np.zeros((len(te), n_classes))
    proba[:, model.classes_] = model.predict_proba(means[te])
    return proba


def _auroc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    if len(np.unique(y)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=np.arange(n_classes)))


def _bacc(y: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def _spread(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if np.isfinite(x)])
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def mutation_probe(
    emb: np.ndarray,
    *,
    group_ids: Sequence | np.ndarray,
    labels: Sequence | np.ndarray,
    donors: Sequence | np.ndarray,
    aggregate: Literal["mean", "attention"] = "mean",
    cv_folds: int = 5,
    seed: int = 0,
    min_donors_for_claim: int = 5,
) -> dict[str, float]:
    """Slide/donor-level probe: aggregate patch embeddings per group (mean pooling or
    attention-MIL), classify with donor-grouped cross-validation.

    Needs no expression (runs on image-only cohorts). Returns ``mutation_auroc_mean/_sd``
    and ``mutation_balanced_accuracy_mean/_sd`` over folds (AUROC only over folds whose
    test side holds every class; ``mutation_auroc_n_folds`` says how many), the same on the
    pooled out-of-fold predictions (``*_pooled``), ``mutation_n_donors``,
    ``mutation_n_groups``, ``mutation_n_folds`` and ``mutation_few_donors`` (1.0 when fewer
    than ``min_donors_for_claim`` donors: read the figures as anecdotal; also warned).
    """
    if aggregate not in ("mean", "attention"):
        raise ValueError(f"aggregate must be 'mean' or 'attention', got {aggregate!r}")
    emb = np.asarray(emb, dtype=np.float32)
    g = _groups(emb, group_ids, labels, donors)
    classes, y = np.unique(g["label"], return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"mutation probe needs >= 2 label values, got {list(classes)}")
    n_donors = len(np.unique(g["donor"]))
    folds = donor_folds(g["donor"], y, cv_folds, seed)
    oof = np.full((len(y), len(classes)), np.nan)
    aucs, baccs = [], []
    for tr, te in folds:
        if len(np.unique(y[tr])) < 2:
            continue  # a training fold with one class cannot be fit; counted via n_folds
        proba = _fold_proba(emb, g["rows"], y, tr, te, len(classes), aggregate, seed)
        oof[te] = proba
        aucs.append(_auroc(y[te], proba, len(classes)))
        baccs.append(_bacc(y[te], proba.argmax(axis=1)))
    done = ~np.isnan(oof[:, 0])
    out = _summary(aucs, baccs, y[done], oof[done], len(classes))
    out.update(
        {
            "mutation_n_donors": float(n_donors),
            "mutation_n_groups": float(len(y)),
            "mutation_n_folds": float(len(baccs)),
            "mutation_few_donors": float(n_donors < min_donors_for_claim),
        }
    )
    if n_donors < min_donors_for_claim:
        warnings.warn(
            f"mutation probe rests on {n_donors} donors (< {min_donors_for_claim}); "
            "treat AUROC / balanced accuracy as anecdotal",
            UserWarning,
            stacklevel=2,
        )
    return out


def _summary(aucs, baccs, y_oof, p_oof, n_classes) -> dict[str, float]:
    auc_m, auc_sd, auc_n = _spread(aucs)
    bacc_m, bacc_sd, _ = _spread(baccs)
    pooled_ok = len(y_oof) > 0
    return {
        "mutation_auroc_mean": auc_m,
        "mutation_auroc_sd": auc_sd,
        "mutation_auroc_n_folds": float(auc_n),
        "mutation_auroc_pooled": _auroc(y_oof, p_oof, n_classes) if pooled_ok else float("nan"),
        "mutation_balanced_accuracy_mean": bacc_m,
        "mutation_balanced_accuracy_sd": bacc_sd,
        "mutation_balanced_accuracy_pooled": (
            _bacc(y_oof, p_oof.argmax(axis=1)) if pooled_ok else float("nan")
        ),
    }
