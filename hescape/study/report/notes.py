"""What the study report says besides its tables: the reading guide, the protocol strata
(``saw_heldout``), preprocessing warnings, the mutation probe's power, metric names.

Metric names come from the probe registry (``hescape.evaluate.probe_spec``) when it
imports; the fallbacks below are the names it declares, for reports of older studies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hescape.config import StudyConfig

# ---------------------------------------------------------------------- protocols (saw_heldout)
INDUCTIVE, TRANSDUCTIVE, UNRECORDED = "inductive", "transductive", "protocol not recorded"
PROTOCOL_SENTENCE = (
    "**Protocols.** A *transductive* trial's preprocessing (e.g. transductive Harmony, ComBat "
    "over all donors) was fitted with the held-out donors' expression (`saw_heldout` = true); "
    "an *inductive* trial's was fitted on training donors only and the held-out donors were "
    "mapped afterwards. Transductive numbers are not comparable with inductive ones, so every "
    "leaderboard, ablation and effect table below is split by protocol and nothing is ranked "
    "across the two."
)


def protocol_of(row: dict[str, Any]) -> str:
    """inductive / transductive / not recorded, from the ``saw_heldout`` tag."""
    value = str(row.get("saw_heldout", "")).lower()
    return {"true": TRANSDUCTIVE, "false": INDUCTIVE}.get(value, UNRECORDED)


def by_protocol(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per protocol (inductive first), only protocols that occur."""
    out: dict[str, list[dict[str, Any]]] = {INDUCTIVE: [], TRANSDUCTIVE: [], UNRECORDED: []}
    for row in rows:
        out[protocol_of(row)].append(row)
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------------- metric names
FALLBACK_NAMES: dict[str, list[str]] = {
    "mutation": ["mutation_auroc", "mutation_auroc_ci_low", "mutation_auroc_ci_high",
                 "mutation_auroc_pvalue", "mutation_underpowered", "mutation_n_donors",
                 "mutation_n_donors_min_class", "mutation_n_encoder_donors"],
    "mixing": ["ilisi", "kbet", "kbet_global", "graph_connectivity", "silhouette_batch",
               "silhouette_label", "nmi_kmeans", "ari_kmeans", "n_batches"],
}
FALLBACK_TASKS = {"expression pearson (HEST)": "hest_pearson_mean",
                  "expression pearson (per donor)": "ridge_per_donor_pearson_mean",
                  "label bal. acc.": "label_balanced_accuracy",
                  "mutation AUROC": "mutation_auroc", "batch mixing iLISI": "ilisi",
                  "bio NMI (KMeans)": "nmi_kmeans"}
FALLBACK_HEADLINE = ("test/r5_img2gene", "test/r5_gene2img", "test/img/hest_pearson_mean",
                     "test/img/ridge_per_donor_pearson_mean", "test/img/mutation_auroc",
                     "test/gene/ilisi", "test/gene/kbet")


def probe_names(cfg: StudyConfig | None = None) -> dict[str, list[str]]:
    """``{probe: [metric names]}`` from the probe registry, else the fallback names."""
    try:
        from hescape.evaluate.probe_spec import metric_names

        names = metric_names(None if cfg is None else cfg.eval)
    except (ImportError, AttributeError):
        return dict(FALLBACK_NAMES)
    return {**FALLBACK_NAMES, **names}


def comparison_tasks() -> dict[str, str]:
    """Contrastive-vs-baselines rows ``{label: metric}`` from the registry (or fallback)."""
    try:
        from hescape.evaluate.probe_spec import comparison_tasks as tasks

        return dict(tasks()) or dict(FALLBACK_TASKS)
    except (ImportError, AttributeError):
        return dict(FALLBACK_TASKS)


def headline_keys(cfg: StudyConfig) -> list[str]:
    """Test-split headline keys: retrieval (whole set, fixed gallery, in-batch), expression
    probes, mutation, mixing first, then the registry's other headlines; no flags."""
    g = getattr(cfg.eval, "fixed_gallery", 1000)
    first = ["test/r5_img2gene", "test/r5_gene2img", f"test/r5_img2gene_gallery{g}",
             f"test/inbatch{cfg.eval.inbatch_size}_r5_img2gene", "test/img/hest_pearson_mean",
             "test/img/ridge_per_donor_pearson_mean", "test/bleep_pearson_mean",
             "test/img/mutation_auroc", "test/img/mutation_auroc_pvalue", "test/gene/ilisi",
             "test/gene/kbet"]
    try:
        from hescape.evaluate.probe_spec import headline_keys as keys

        found = list(keys("test", cfg.eval))
    except (ImportError, AttributeError):
        found = list(FALLBACK_HEADLINE)
    return [k for k in dict.fromkeys([*first, *found]) if not k.endswith("_underpowered")]


MIXING_INFO = {"n_batches", "n_labels", "subsample_n", "subsample_seed", "knn_capped"}


def mixing_figures(cfg: StudyConfig | None = None) -> set[str]:
    """Names of the mixing figures (not their bookkeeping: batch counts, subsample size)."""
    names = probe_names(cfg)
    return {m for probe, ms in names.items() if "mix" in probe for m in ms} - MIXING_INFO


def split_key(key: str) -> tuple[str, str | None, str]:
    """``split/[features/]metric`` -> (split, features or None, metric)."""
    parts = key.split("/")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[-1]


def companions(key: str, mixing: set[str]) -> list[str]:
    """Keys printed beside ``key``: the batch count beside a mixing figure, the PCA
    dimension beside an expression-probe figure."""
    split, features, metric = split_key(key)
    prefix = f"{split}/{features}/" if features else f"{split}/"
    if metric in mixing:
        return [prefix + "n_batches"]
    probe = re.match(r"^(hest|ridge_per_donor)_pearson_(mean|median)$", metric)
    return [f"{prefix}{probe.group(1)}_pca_dim"] if probe else []


# ---------------------------------------------------------------------- reading guide
_GLOSSARY = [
    (r"^r\d+_(img2gene|gene2img)$",
     "`r{k}_img2gene` / `r{k}_gene2img`: **whole-set** Recall@k. Each held-out spot queries "
     "ALL held-out spots of the other modality; chance is k / (number of held-out spots), so "
     "the figure falls with dataset size."),
    (r"_gallery\d+$",
     "`r{k}_{dir}_gallery{G}`: Recall@k in galleries of a **fixed size** G of held-out spots "
     "(seeded samples, averaged): comparable across datasets of different sizes."),
    (r"^inbatch\d+_",
     "`inbatch{B}_r{k}_{dir}`: HESCAPE's **in-batch** protocol (random batches of B held-out "
     "spots); comparable with HESCAPE's figures, not with the whole-set figure."),
    (r"^hest_pearson",
     "`hest_pearson_mean`: the exact **HEST-Benchmark** recipe (StandardScaler, PCA 256, Ridge, "
     "log1p targets, Pearson per gene on the concatenated held-out split, mean over genes); "
     "blank where features or training rows are fewer than 256. PCA dim in `hest_pca_dim`."),
    (r"^ridge_per_donor_pearson",
     "`ridge_per_donor_pearson_mean`: NOT HEST: our per-donor variant (Pearson per gene within "
     "each held-out donor, mean over donors; PCA dim actually used in `ridge_per_donor_pca_dim`)."),
    (r"^bleep_pearson",
     "`bleep_pearson_mean`: BLEEP-style expression prediction (mean expression of the k "
     "training spots retrieved image -> gene), per-donor Pearson."),
    (r"^mutation_auroc$",
     "`mutation_auroc`: donor-level mutation probe, mean of per-fold AUROCs, with a donor "
     "bootstrap CI and a label-permutation p-value; blank when underpowered. Its CV includes "
     "the donors the encoder trained on (see the mutation section)."),
    (r"^(ilisi|kbet|kbet_global|graph_connectivity|silhouette_batch|silhouette_label)$",
     "`ilisi`, `kbet` (per label), `kbet_global`, `graph_connectivity`, `silhouette_batch`, "
     "`silhouette_label`: scib-metrics' definitions (its Benchmarker's neighbour lists, exact "
     "neighbours) on the held-out donors, in [0, 1], higher is better; the number of batches "
     "mixed is printed beside each (`n_batches`)."),
    (r"^(nmi|ari)_kmeans$",
     "`nmi_kmeans` / `ari_kmeans`: NMI / ARI of a KMeans clustering against the labels; not "
     "scib's Leiden NMI."),
    (r"^(knn_)?label_balanced_accuracy$",
     "`label_balanced_accuracy` (linear probe) / `knn_label_balanced_accuracy` (kNN): "
     "spot-level label prediction, fitted on training donors, scored on held-out donors."),
]


def reading_guide(keys: set[str], primary: str) -> list[str]:
    """Bullets of the "how to read this report" section for the metric keys present."""
    metrics = {split_key(k)[2] for k in keys}
    if primary.startswith("val/"):
        selection = (f"**Selection reads validation donors only.** TPE/random search, ASHA and "
                     f"the top-k seed re-runs rank trials by `{primary}`; the test donors "
                     "(`test/...`) are evaluated once per trial, at the end, from its best "
                     "checkpoint, and never feed a selection.")
    else:
        selection = (f"**This study selected on `{primary}`, not on a validation metric**: "
                     "where that is a test metric, its test figures are optimistic (the "
                     "search saw them).")
    out = [
        selection,
        "Keys read `split/metric` (both towers: retrieval, BLEEP) or `split/features/metric` "
        "with features `img` / `gene` / `joint` (the trained towers), `baseline_frozen` (the "
        "image encoder before contrastive training), `baseline_pca` (PCA of expression).",
    ]
    out += [text for pattern, text in _GLOSSARY if any(re.search(pattern, m) for m in metrics)]
    out.append("Factor effects: difference to the reference level on the held-out (test) "
               "donors with a 95% interval over donors and training seeds; \"not "
               "distinguishable\" where it covers 0, \"needs replicates\" (no verdict) where "
               "a level ran once and seed variation is unmeasured. They describe the "
               "configurations run here, not a population of studies.")
    return out


# ---------------------------------------------------------------------- preprocessing
def preprocessing_warnings(rows: Sequence[dict[str, Any]], shared_work: dict | None) -> list[str]:
    """Variants that stopped on their epoch cap (scVI) or did not converge (Harmony), from
    the precomputed variants' ``info`` and the trials' ``hescape.preprocess_converged`` tag."""
    out = []
    for v in (shared_work or {}).get("variants", []):
        reason = _unconverged(v.get("info") or {}, str(v.get("method")))
        if reason:
            out.append(f"Preprocessing variant `{v.get('method')}` "
                       f"(`{str(v.get('cache_key', ''))[:12]}`) {reason}")
    flagged: dict[str, list[str]] = {}
    for r in rows:
        if str(r.get("preprocess_converged", "")).lower() == "false":
            reason = (_unconverged(r.get("preprocess_info") or {}, str(r.get("preprocess")))
                      or "did not converge.")
            flagged.setdefault(f"`{r.get('preprocess', '?')}` {reason}", []).append(r["trial_id"])
    out += [f"Trials {', '.join(f'`{t}`' for t in tids)}: preprocessing {reason}"
            for reason, tids in flagged.items()]
    return out


def _unconverged(info: dict[str, Any], method: str) -> str | None:
    if info.get("stopped_on_cap"):
        return (f"stopped on its epoch cap ({info.get('epochs_run', '?')} of "
                f"{info.get('max_epochs', '?')} epochs) before early stopping fired: it may not "
                "have converged, so comparing it with converged corrections is unfair. Raise "
                f"`preprocess.expression.{method if method in ('scvi', 'drvi') else 'scvi'}"
                ".max_epochs` (null = scvi-tools' own rule).")
    if info.get("converged") is False:
        what = "Harmony" if method == "harmony" else "it"
        return (f"did not converge ({what} hit its iteration limit): its corrected space is "
                "not a finished correction, so comparing it with converged ones is unfair.")
    return None


def mixing_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Trials whose mixing figures rest on a neighbour graph smaller than scib's."""
    capped = [r["trial_id"] for r in rows
              if any(k.endswith("/knn_capped") and v == 1.0 for k, v in r["metrics"].items())]
    if not capped:
        return []
    return [f"Trials {', '.join(f'`{t}`' for t in capped)}: mixing figures measured on fewer "
            "than 91 rows (`knn_capped`), so their neighbour graphs are smaller than "
            "scib-metrics' 15/50/90: treat those figures as under-powered."]


# ---------------------------------------------------------------------- mutation probe
def _features_with(row: dict[str, Any], metric: str) -> list[str]:
    found = []
    for key in row["metrics"]:
        split, features, name = split_key(key)
        if split == "test" and features and name == metric:
            found.append(features)
    return sorted(found, key=lambda f: (f not in ("img", "gene", "joint"), f))


def has_mutation(row: dict[str, Any]) -> bool:
    return any(split_key(k)[2].startswith("mutation_") for k in row["metrics"]
               if k.startswith("test/"))


def underpowered(row: dict[str, Any]) -> bool:
    """The row's mutation probe could not answer: flagged, or no AUROC where it ran."""
    m = row["metrics"]
    sets = _features_with(row, "mutation_underpowered") or _features_with(row, "mutation_n_donors")
    return any(m.get(f"test/{fs}/mutation_underpowered") == 1.0
               or f"test/{fs}/mutation_auroc" not in m for fs in sets)


def underpowered_sentence(rows: Sequence[dict[str, Any]], cfg: StudyConfig) -> str:
    """``underpowered: N donors per class (needs >= M)`` for the given rows."""
    counts = [v for r in rows for k, v in r["metrics"].items()
              if k.startswith("test/") and k.endswith("/mutation_n_donors_min_class")]
    need = getattr(cfg.eval, "mutation_min_donors_per_class", None)
    have = f"{int(min(counts))} donor(s)" if counts else "too few donors"
    needs = f">= {need}" if need is not None else "more"
    return (f"underpowered: {have} per class (needs {needs}, and >= 2 per class in "
            "every training fold); no AUROC, and no comparison with the baselines or with "
            "HESCAPE's claim, is reported.")


def _cell(m: dict[str, float], fs: str) -> str:
    auc = m.get(f"test/{fs}/mutation_auroc")
    if auc is None:
        return ""
    lo, hi = m.get(f"test/{fs}/mutation_auroc_ci_low"), m.get(f"test/{fs}/mutation_auroc_ci_high")
    p = m.get(f"test/{fs}/mutation_auroc_pvalue")
    text = f"{auc:.3f}"
    text += f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else " (no CI)"
    return text + (f" p={p:.3g}" if p is not None else " (no p-value)")


def mutation_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One record per powered trial: AUROC [95% CI] p per feature set."""
    recs = []
    for r in rows:
        if underpowered(r):
            continue
        sets = _features_with(r, "mutation_auroc")
        recs.append({"trial": r["trial_id"], "protocol": protocol_of(r), "config": r["config_id"],
                     **{fs: _cell(r["metrics"], fs) for fs in sets}})
    return recs


def encoder_donors_sentence(rows: Sequence[dict[str, Any]]) -> str:
    """Which donors trained the encoder, and what that means for the mutation probe."""
    splits = {tuple((k, tuple(v)) for k, v in sorted((r.get("split") or {}).items()))
              for r in rows}
    splits.discard(())
    n_seen = sorted({int(v) for r in rows for k, v in r["metrics"].items()
                     if k.endswith("/mutation_n_encoder_donors")})
    seen = (f" ({'/'.join(map(str, n_seen))} of the probe's donors)" if n_seen else "")
    tail = (f": their images were seen by the encoder during contrastive training{seen}, "
            "so the AUROC is not a held-out-donor figure.")
    if len(splits) != 1:
        return ("The mutation probe's cross-validation includes the donors the encoder "
                "trained on (tag `hescape.split` of each trial)" + tail)
    split = dict(splits.pop())
    parts = "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in split.items())
    return (f"The encoder trained on donors {', '.join(split.get('train', [])) or '-'} "
            f"(`hescape.split`: {parts}). The mutation probe's cross-validation includes these "
            "training donors" + tail)
