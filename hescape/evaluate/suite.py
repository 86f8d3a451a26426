"""The registered probes: each is one function plus its ``@register_probe`` declaration.

Feature-set probes take ``(feats, data)`` and run on every feature set (the trained
embeddings and the baselines), so the model and its baselines share one protocol; pair
probes take ``(data)`` and use both towers. To add a probe, add one decorated function here
(``knn_label`` is the worked example). Registration happens on import (``probe_specs()``).
Whole-set products (retrieval, BLEEP, kNN label) run on this process's GPU when it has one
(``similarity.default_engine``), else in numpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score

from hescape.evaluate.probe_spec import (  # noqa: F401 - PROBES re-exported, filled here
    PER_DONOR_COLUMNS,
    PROBES,
    EvalData,
    ProbeResult,
    register_probe,
)
from hescape.evaluate.similarity import default_engine
from hescape.metrics.hest import HestUnavailable, hest_probe
from hescape.metrics.mixing import MIXING_KEYS, mixing_metrics
from hescape.metrics.mutation import mutation_probe
from hescape.metrics.pearson import per_donor_means
from hescape.metrics.probes import (
    label_probe,
    present,
    retrieval_expression_probe,
    ridge_per_donor_probe,
)
from hescape.metrics.retrieval import (
    cross_modal_retrieval,
    fixed_gallery_retrieval,
    recall_by_donor,
    retrieval_ranks,
    topk_blocked,
)

NAN = float("nan")
KNN_K = 15  # neighbours of the kNN label probe


# ----------------------------------------------------------------------- pair probes
@register_probe(
    name="retrieval", scope="pair",
    metrics=("r{k}_{dir}", "mean_rank_{dir}", "median_rank_{dir}", "r{k}_{dir}_within_donor",
             "mean_rank_{dir}_within_donor", "inbatch{B}_r{k}_{dir}", "retrieval_n"),
    headline=("r1_img2gene", "r5_img2gene", "r10_img2gene", "r5_gene2img",
              "inbatch{B}_r5_img2gene"),
)  # fmt: skip
def retrieval(data: EvalData) -> ProbeResult:
    """Whole-held-out-set, within-donor and in-batch retrieval; per-donor whole-set recalls."""
    te, cfg, engine = data.test_idx, data.cfg, default_engine()
    ranks = retrieval_ranks(data.img[te], data.gene[te], cfg.block_size, engine=engine)
    m = cross_modal_retrieval(data.img[te], data.gene[te], donors=data.donors(te), ks=cfg.ks,
                              block_size=cfg.block_size, inbatch_size=cfg.inbatch_size,
                              inbatch_repeats=cfg.inbatch_repeats, seed=cfg.seed,
                              precomputed_ranks=ranks, engine=engine)  # fmt: skip
    per = pd.DataFrame(recall_by_donor(ranks, data.donors(te), cfg.ks), columns=PER_DONOR_COLUMNS)
    return ProbeResult(metrics=m, per_donor=per, ranks=ranks)


@register_probe(
    name="retrieval_gallery", scope="pair",
    metrics=("r{k}_{dir}_gallery{G}", "mean_rank_{dir}_gallery{G}"),
    headline=("r5_img2gene_gallery{G}",),
)  # fmt: skip
def retrieval_gallery(data: EvalData) -> ProbeResult:
    """Recall@k with a fixed-size gallery (``eval.fixed_gallery``), NaN when too few spots."""
    te, cfg = data.test_idx, data.cfg
    try:
        m = fixed_gallery_retrieval(data.img[te], data.gene[te], size=cfg.fixed_gallery,
                                    draws=cfg.fixed_gallery_draws, ks=cfg.ks, seed=cfg.seed,
                                    block_size=cfg.block_size)  # fmt: skip
    except ValueError as exc:
        g = cfg.fixed_gallery
        names = [f"{s}_{d}_gallery{g}" for d in ("img2gene", "gene2img")
                 for s in [*(f"r{k}" for k in sorted(set(cfg.ks))), "mean_rank"]]  # fmt: skip
        return ProbeResult(metrics=dict.fromkeys(names, NAN), note=str(exc))
    return ProbeResult(metrics=m)


@register_probe(
    name="bleep", scope="pair", needs_expression=True,
    metrics=("bleep_pearson_mean", "bleep_pearson_median", "bleep_n_genes", "bleep_n_donors",
             "bleep_n_skipped_constant", "bleep_k"),
    headline=("bleep_pearson_mean",),
)  # fmt: skip
def bleep(data: EvalData) -> ProbeResult:
    """BLEEP-style expression: mean expression of the top-k training spots (img -> gene)."""
    tr, te, cfg = data.train_idx, data.test_idx, data.cfg
    m, table = retrieval_expression_probe(
        data.gene[tr], data.expr_log[tr], data.img[te], data.expr_log[te],
        test_donors=data.donors(te), gene_names=data.gene_names, k=cfg.bleep_k,
        n_top=cfg.probe_top_genes, block_size=cfg.block_size, engine=default_engine(),
    )  # fmt: skip
    per = per_donor_means(table, "bleep_pearson_mean")
    return ProbeResult(metrics=m, per_donor=per, tables={"per_gene": table})


# -------------------------------------------------------------- expression probes
@register_probe(
    name="ridge_per_donor", needs_expression=True, predicts_expression=True,
    metrics=("ridge_per_donor_pearson_mean", "ridge_per_donor_pearson_median",
             "ridge_per_donor_pca_dim", "ridge_per_donor_n_genes", "ridge_per_donor_n_donors",
             "ridge_per_donor_n_skipped_constant"),
    tasks={"expression Pearson (per-donor ridge)": "ridge_per_donor_pearson_mean"},
    headline=("ridge_per_donor_pearson_mean",),
)  # fmt: skip
def ridge_per_donor(feats: np.ndarray, data: EvalData) -> ProbeResult | None:
    """Ridge on PCA of the features, Pearson per held-out donor (``eval.probe_protocol``)."""
    tr, te, cfg = data.train_idx, data.test_idx, data.cfg
    if cfg.probe_protocol == "hest":
        return None
    m, table = ridge_per_donor_probe(
        feats[tr], data.expr_log[tr], feats[te], data.expr_log[te], test_donors=data.donors(te),
        gene_names=data.gene_names, n_top=cfg.probe_top_genes, pca=cfg.probe_pca,
        alpha=cfg.probe_alpha,
    )  # fmt: skip
    per = per_donor_means(table, "ridge_per_donor_pearson_mean")
    return ProbeResult(metrics=m, per_donor=per, tables={"per_gene": table})


HEST_METRICS = ("hest_pearson_mean", "hest_pearson_median", "hest_pearson_std", "hest_pca_dim",
                "hest_n_genes", "hest_n_train", "hest_n_test")  # fmt: skip


@register_probe(
    name="hest", needs_expression=True, predicts_expression=True, metrics=HEST_METRICS,
    tasks={"expression Pearson (HEST)": "hest_pearson_mean"}, headline=("hest_pearson_mean",),
)  # fmt: skip
def hest(feats: np.ndarray, data: EvalData) -> ProbeResult | None:
    """HEST-Benchmark's exact recipe (``hescape.metrics.hest``); NaN with the reason when it cannot run."""
    tr, te, cfg = data.train_idx, data.test_idx, data.cfg
    if cfg.probe_protocol == "per_donor":
        return None
    if data.counts is None:
        return ProbeResult(metrics=dict.fromkeys(HEST_METRICS, NAN),
                           note="no raw counts: HEST's targets are log1p of raw counts")  # fmt: skip
    try:
        m, table, per = hest_probe(feats[tr], data.counts[tr], feats[te], data.counts[te],
                                   gene_names=data.gene_names, test_donors=data.donors(te),
                                   n_top=cfg.probe_top_genes, seed=cfg.seed)  # fmt: skip
    except HestUnavailable as exc:
        return ProbeResult(metrics=dict.fromkeys(HEST_METRICS, NAN), note=str(exc))
    note = None
    if not np.isfinite(m["hest_pearson_mean"]):
        constant = table.loc[table["pearson"].isna(), "gene"].tolist()
        note = f"genes constant on the test split (HEST's mean is undefined): {constant[:5]}"
    return ProbeResult(metrics=m, per_donor=per, tables={"per_gene": table}, note=note)


# ------------------------------------------------------------------- label probes
@register_probe(
    name="label", obs=("label",),
    metrics=("label_balanced_accuracy", "label_macro_f1", "label_n_classes", "label_n_test"),
    tasks={"label bal. acc.": "label_balanced_accuracy", "label macro F1": "label_macro_f1"},
    headline=("label_balanced_accuracy",),
)  # fmt: skip
def label(feats: np.ndarray, data: EvalData) -> ProbeResult:
    """Spot-level label probe: logistic regression on standardised features."""
    tr, te, key = data.train_idx, data.test_idx, data.label_key
    m = label_probe(feats[tr], data.column(key, tr), feats[te], data.column(key, te),
                    seed=data.cfg.seed)  # fmt: skip
    return ProbeResult(metrics=m)


@register_probe(
    name="knn_label", obs=("label",),
    metrics=("knn_label_balanced_accuracy", "knn_label_macro_f1", "knn_label_k",
             "knn_label_n_test"),
    tasks={"label bal. acc. (kNN)": "knn_label_balanced_accuracy"},
)  # fmt: skip
def knn_label(feats: np.ndarray, data: EvalData) -> ProbeResult:
    """A held-out spot takes the majority label of its ``KNN_K`` nearest training spots
    (cosine); a tied vote goes to the tied label met first in neighbour order."""
    tr, te = data.train_idx, data.test_idx
    y_tr, y_te = data.column(data.label_key, tr), data.column(data.label_key, te)
    ok_tr, ok_te = present(y_tr), present(y_te)
    if not ok_tr.any() or not ok_te.any():
        raise ValueError("knn_label: no labelled training or held-out rows")
    classes, codes = np.unique(y_tr[ok_tr].astype(str), return_inverse=True)
    idx, _ = topk_blocked(feats[te][ok_te], feats[tr][ok_tr], KNN_K, data.cfg.block_size,
                          engine=default_engine())
    votes, k = codes[idx], idx.shape[1]
    score = np.zeros((len(idx), len(classes)))
    for j in range(k):  # one vote each, plus a tie-break below one vote: earlier = closer
        np.add.at(score, (np.arange(len(idx)), votes[:, j]), 1.0)
    first = np.full((len(idx), len(classes)), k, dtype=np.float64)
    for j in reversed(range(k)):
        first[np.arange(len(idx)), votes[:, j]] = j
    pred = classes[np.argmax(score - first / (k + 1), axis=1)]
    truth = y_te[ok_te].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # held-out rows may lack some classes
        bacc = balanced_accuracy_score(truth, pred)
    return ProbeResult(metrics={
        "knn_label_balanced_accuracy": float(bacc),
        "knn_label_macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "knn_label_k": float(k), "knn_label_n_test": float(len(truth)),
    })  # fmt: skip


# -------------------------------------------------------------- mutation / mixing
@register_probe(
    name="mutation", obs=("mutation",),
    metrics=("mutation_auroc", "mutation_auroc_ci_low", "mutation_auroc_ci_high",
             "mutation_auroc_pvalue", "mutation_pvalue_exact", "mutation_balanced_accuracy",
             "mutation_underpowered", "mutation_n_donors", "mutation_n_donors_min_class",
             "mutation_n_encoder_donors", "mutation_n_groups", "mutation_n_folds",
             "mutation_n_permutations"),
    tasks={"mutation AUROC": "mutation_auroc", "mutation bal. acc.": "mutation_balanced_accuracy"},
    headline=("mutation_auroc", "mutation_auroc_pvalue", "mutation_underpowered"),
)  # fmt: skip
def mutation(feats: np.ndarray, data: EvalData) -> ProbeResult:
    """Donor-grouped mutation probe over train + held-out rows (its own CV splits donors)."""
    rows, cfg = np.concatenate([data.train_idx, data.test_idx]), data.cfg
    m, note = mutation_probe(
        feats[rows], group_ids=data.obs[data.group_key].to_numpy()[rows],
        labels=data.column(data.mutation_key, rows), donors=data.donors(rows),
        encoder_donors=np.unique(data.donors(data.train_idx)).astype(str),
        cv_folds=cfg.mutation_cv_folds, min_donors_per_class=cfg.mutation_min_donors_per_class,
        n_permutations=cfg.mutation_permutations, seed=cfg.seed,
    )  # fmt: skip
    return ProbeResult(metrics=m, note=note)


@register_probe(
    name="mixing", obs=("batch",), metrics=MIXING_KEYS,
    tasks={"batch mixing iLISI": "ilisi", "bio NMI (k-means)": "nmi_kmeans"},
    headline=("ilisi",),
)  # fmt: skip
def mixing(feats: np.ndarray, data: EvalData) -> ProbeResult:
    """Batch mixing (+ bio conservation with a label column) on the held-out rows; rows
    without a label are left out (``subsample_n`` counts the rows used)."""
    te = data.test_idx
    labels = data.column(data.label_key, te)
    if labels is not None:
        keep = present(labels)
        te, labels = te[keep], labels[keep]
    m = mixing_metrics(feats[te], data.obs[data.batch_key].to_numpy()[te], labels,
                       subsample=data.cfg.mixing_subsample, seed=data.cfg.seed)  # fmt: skip
    return ProbeResult(metrics=m)
