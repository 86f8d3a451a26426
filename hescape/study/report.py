"""Study report: how to read it, warnings, leaderboards, factor effects with CIs, ablation,
contrastive vs baselines, the mutation probe's power, preprocessing variants, Pareto
front, plots. Read cold, it makes no claim its numbers cannot carry: tables are split by
protocol (``saw_heldout``), underpowered probes say so, effects carry CIs or say why not.

Written under ``<storage>/<study>/report/`` as report.md, a self-contained report.html
(renders in MLflow's artifact viewer), effects.csv, leaderboard.csv and PNGs, and logged
to the study's parent MLflow run under ``report/``. ``write_report`` is also what
``study/run.py --report`` calls for a finished study.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from hescape import atomic
from hescape.config import StudyConfig
from hescape.study import lineage
from hescape.study import report_notes as notes
from hescape.study import report_plots as plots
from hescape.study.document import Document
from hescape.study.effects import BootstrapSettings
from hescape.study.report_tables import (
    KEY_METRICS,
    MAX_COLUMNS,
    ablation,
    baseline_comparison,
    effect_table,
    finished,
    fmt_ablation,
    fmt_effects,
    leaderboard,
    pareto_front,
    with_companions,
)
from hescape.study.results import (
    metric_history,
    parent_shared_work,
    per_donor_tables,
    trial_table,
)
from hescape.study.tuner import objectives

History = Callable[[str, str], list[tuple[int, float]]]
Rows = Sequence[dict[str, Any]]
NO_PER_DONOR = "no per-donor results: CIs unavailable"

__all__ = ["KEY_METRICS", "ablation", "baseline_comparison", "build_report", "leaderboard",
           "pareto_front", "write_report"]


def write_report(
    ref: lineage.LineageRef, study_dir: Path, cfg: StudyConfig, shared_work: dict | None = None,
    *, settings: BootstrapSettings | None = None,
) -> Path:
    """Write report.md/.html, effects.csv, leaderboard.csv and plots; log them to the parent
    run under ``report/``. ``shared_work`` None: read the parent run's ``shared_work.json``.
    Returns the report directory."""
    out = Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_table(ref)
    if shared_work is None:  # a re-report: the precomputed variants as the study logged them
        shared_work = parent_shared_work(ref)
    per_donor, problems = per_donor_tables(ref, Path(study_dir), finished(rows))
    doc, frames = build_report(
        cfg, rows, out=out, shared_work=shared_work, per_donor=per_donor, problems=problems,
        history=lambda run_id, key: metric_history(ref, run_id, key),
        settings=settings or BootstrapSettings(seed=cfg.eval.seed))
    atomic.write_text(out / "report.md", doc.markdown())
    atomic.write_text(out / "report.html", doc.html())
    for name, frame in frames.items():
        with atomic.atomic_path(out / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
    client = lineage.MlflowClient(ref.tracking_uri)
    lineage.with_retry(lambda: client.log_artifacts(ref.parent_run_id, str(out), "report"))
    return out


def build_report(
    cfg: StudyConfig, rows: Rows, *, out: Path, shared_work: dict | None = None,
    per_donor: dict[str, pd.DataFrame] | None = None, problems: Sequence[str] = (),
    history: History | None = None, settings: BootstrapSettings = BootstrapSettings(),
) -> tuple[Document, dict[str, pd.DataFrame]]:
    """The report document and its csv tables (``leaderboard``, ``effects``) from trial rows
    (``trial_table``) and per-donor tables (``per_donor_tables``); PNGs go to ``out``."""
    metrics, modes = objectives(cfg)
    strata = notes.by_protocol(rows)
    doc = Document(f"Study `{cfg.name}`")
    doc.heading("How to read this report")
    doc.bullets(notes.reading_guide({k for r in rows for k in r["metrics"]}, metrics[0]))
    doc.para(notes.PROTOCOL_SENTENCE)
    _summary(doc, rows, strata)
    _warnings(doc, rows, shared_work, strata, problems)
    keys = [k for k in notes.headline_keys(cfg) if any(k in r["metrics"] for r in rows)]
    board = _leaderboards(doc, rows, strata, metrics[0], modes[0], keys[:MAX_COLUMNS])
    effects = _effects(doc, rows, per_donor or {}, cfg, settings, out)
    tables = _ablations(doc, strata, list(dict.fromkeys([*metrics, *keys[:6]])), rows)
    _baselines(doc, strata, cfg)
    _mutation(doc, rows, cfg)
    _variants(doc, shared_work)
    pictures = _pareto(doc, strata, metrics, modes, out)
    _failed(doc, rows)
    pictures += plots.ablation_plots(tables, metrics[0], out)
    curve = plots.learning_curves(rows, metrics[0], out, history) if history else None
    if pictures or curve:
        doc.heading("Plots")
        for path in [*pictures, *([curve] if curve else [])]:
            doc.image(path)
    doc.heading("Config")
    doc.code(json.dumps(cfg.model_dump(), indent=1)[:6000])
    return doc, {"leaderboard": board, "effects": effects}


def _summary(doc: Document, rows: Rows, strata: dict[str, list]) -> None:
    n = {s: sum(r["status"] == s for r in rows) for s in ("FINISHED", "FAILED", "KILLED")}
    by = ", ".join(f"{len(v)} {k}" for k, v in strata.items())
    doc.para(f"Trials: {len(rows)} ({n['FINISHED']} finished, {n['FAILED']} failed, "
             f"{n['KILLED']} stopped early by ASHA or interrupted); protocols: {by or '-'}."
             + (f" All trials are {next(iter(strata))}." if len(strata) == 1 else ""))


def _warnings(doc: Document, rows: Rows, shared_work, strata, problems: Sequence[str]) -> None:
    found = []
    if notes.INDUCTIVE in strata and notes.TRANSDUCTIVE in strata:
        found.append("This study mixes inductive and transductive preprocessing. The search "
                     "(TPE/ASHA) ranked them together on validation donors; the tables below "
                     "never do.")
    if notes.UNRECORDED in strata:
        found.append(f"{len(strata[notes.UNRECORDED])} trial(s) have no "
                     "`hescape.preprocess_saw_heldout` tag: their protocol is unknown and they "
                     "are shown apart.")
    found += notes.preprocessing_warnings(rows, shared_work)
    found += notes.mixing_warnings(finished(rows))
    found += list(problems)
    for text in found:
        doc.warning(text)


def _protocol_heading(doc: Document, title: str, proto: str, strata: dict, level=2) -> None:
    """``title``, naming the protocol when the study has more than one."""
    doc.heading(f"{title}: {proto} trials" if len(strata) > 1 else title, level)


def _leaderboards(doc: Document, rows: Rows, strata, metric: str, mode: str, keys) -> pd.DataFrame:
    boards = []
    for proto, group in strata.items():
        _protocol_heading(doc, "Leaderboard", proto, strata)
        board = leaderboard(list(group), metric, mode, keys)
        blank = (" A blank mutation AUROC means the probe was underpowered (see the mutation "
                 "section).") if any("mutation_auroc" in c for c in board.columns) else ""
        doc.para(f"Sorted by the selection objective `{metric}` ({mode}).{blank}")
        doc.table(board.drop(columns="protocol").head(30))
        boards.append(board)
    return pd.concat(boards, ignore_index=True) if boards else pd.DataFrame()


def _effects(doc: Document, rows: Rows, per_donor, cfg, settings, out: Path) -> pd.DataFrame:
    doc.heading("Factor effects (held-out donors, 95% CI)")
    done = finished(rows)
    if not per_donor:
        doc.para(f"{NO_PER_DONOR} (no trial's evaluation wrote `eval/per_donor.csv`).")
        return effect_table([], {}, cfg, settings)
    doc.para(
        "Each row: the level's value minus the reference level's (the base config's value, "
        "else the first level) on the test donors. 95% CI: percentile bootstrap, "
        f"{settings.n_boot} replicates, held-out donors resampled jointly for all trials, "
        "widened for small samples (sqrt(n/(n-1)) t/z, n the fewest resampled units; plain "
        "percentile intervals on 3 donors call pure noise distinguishable in ~23% of studies). "
        "*Paired*: trials matched on seed and the other factors are resampled as blocks, so "
        "shared seed effects cancel. *Unpaired* (TPE/random: levels also differ in factors "
        "TPE chose): configurations are resampled within each level and seeds within each "
        "configuration; a marginal comparison, not a controlled one. Recalls are weighted "
        "by each donor's spots (the whole-set figure), Pearson figures are a plain mean over "
        f"donors. Fewer than {settings.min_donors} held-out donors give no CI; with few "
        "donors the CI is coarse. \"not distinguishable\": the CI covers 0.")
    stopped = sum(r["status"] == "KILLED" for r in rows)
    if stopped:
        doc.para(f"{stopped} trial(s) were stopped early (ASHA, on validation donors) and are "
                 "not in the effects: a level whose weak trials were stopped is flattered.")
    missing = len(done) - sum(r["trial_id"] in per_donor for r in done)
    if missing:
        doc.para(f"{missing} of {len(done)} finished trial(s) have no per-donor table and "
                 "are left out of the effects.")
    table = effect_table(rows, per_donor, cfg, settings)
    if table.empty:
        doc.para("No factor has two levels with per-donor results in one protocol.")
        return table
    strata = dict.fromkeys(table["protocol"])
    for proto in strata:
        _protocol_heading(doc, "Effects", proto, strata, level=3)
        doc.table(fmt_effects(table[table["protocol"] == proto]))
    for path in plots.effect_plots(table, out):
        doc.image(path)
    return table


def _ablations(doc: Document, strata, metrics: list[str], rows: Rows) -> dict[str, dict]:
    doc.heading("Ablation (mean ± sd over seeds and other factors)")
    tables = {proto: ablation(list(group), metrics) for proto, group in strata.items()}
    note = _companion_note(metrics, rows)
    if note:
        doc.para(note)
    for proto, per in tables.items():
        for factor, df in per.items():
            _protocol_heading(doc, f"`{factor}`", proto, strata, level=3)
            doc.table(fmt_ablation(df), index=True)
    return tables


def _companion_note(keys: Sequence[str], rows: Rows) -> str:
    """"Beside these figures: ..." with the batch count / PCA dimension of each figure."""
    parts = []
    for key in keys:
        for comp in with_companions([key], rows)[1:]:
            values = sorted({int(r["metrics"][comp]) for r in rows if comp in r["metrics"]})
            span = str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
            what = "batches" if comp.endswith("n_batches") else "PCA dim"
            parts.append(f"`{key}`: {what} {span}")
    return ("Beside these figures: " + "; ".join(parts) + ".") if parts else ""


def _baselines(doc: Document, strata, cfg: StudyConfig) -> None:
    for proto, group in strata.items():
        table = baseline_comparison(list(group))
        if table.empty:
            continue
        _protocol_heading(doc, "Contrastive training vs baselines (held-out donors, "
                          "finished trials, mean ± sd)", proto, strata)
        doc.para("`contrastive img`/`gene`/`joint`: the trained embeddings; `frozen img`: the "
                 "image encoder before contrastive training; `pca expr`: PCA of expression. "
                 "Higher is better on every row.")
        doc.table(table, index=True)
        with_mut = [r for r in finished(group) if notes.has_mutation(r)]
        if with_mut and all(notes.underpowered(r) for r in with_mut):
            doc.para("Mutation rows: " + notes.underpowered_sentence(with_mut, cfg))
        elif with_mut:
            doc.para("HESCAPE reported that contrastive training helps mutation prediction and "
                     "hurts expression prediction; read the mutation rows with their CIs and "
                     "p-values in the mutation section before agreeing.")


def _mutation(doc: Document, rows: Rows, cfg: StudyConfig) -> None:
    with_mut = [r for r in finished(rows) if notes.has_mutation(r)]
    if not with_mut:
        return
    doc.heading("Mutation probe")
    doc.para(notes.encoder_donors_sentence(with_mut))
    powered = notes.mutation_rows(with_mut)
    weak = [r for r in with_mut if notes.underpowered(r)]
    if powered:
        doc.para("AUROC (mean of per-fold AUROCs) [95% donor-bootstrap CI] and label-permutation "
                 "p-value, per feature set:")
        doc.table(pd.DataFrame(powered).fillna(""))
    if weak:
        prefix = "Mutation probe" if not powered else f"{len(weak)} other trial(s)"
        doc.para(f"{prefix}: " + notes.underpowered_sentence(weak, cfg))


def _variants(doc: Document, shared_work: dict | None) -> None:
    variants = (shared_work or {}).get("variants") or []
    if not variants:
        return
    doc.heading("Preprocessing variants before training")
    recs = []
    for v in variants:
        info = v.get("info") or {}
        rec = {"variant": v["method"], "protocol": notes.protocol_of(v),
               "measured_on": _measured_on(v.get("measured_on")),
               "n_batches": v.get("n_batches", ""), "fit": _fit_status(info)}
        rec.update({k.split("/")[-1]: x for k, x in (v.get("metrics") or {}).items()
                    if isinstance(x, (int, float)) and not isinstance(x, bool)
                    and k.split("/")[-1] not in ("subsample_seed", "n_batches")})
        recs.append(rec)
    doc.para("Mixing and biology figures of each variant's output before any training, on "
             "the donors in `measured_on`, with the number of batches they mix.")
    doc.table(pd.DataFrame(recs))


def _measured_on(value: Any) -> str:
    """``{"part": "test", "donors": [...], "n_rows": 60}`` (or a donor list) -> text."""
    if isinstance(value, dict):
        donors = ", ".join(map(str, value.get("donors", [])))
        rows = f", {value['n_rows']} rows" if "n_rows" in value else ""
        return f"{value.get('part', '?')}: {donors}{rows}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


def _fit_status(info: dict[str, Any]) -> str:
    if info.get("stopped_on_cap"):
        return f"stopped on cap ({info.get('epochs_run', '?')}/{info.get('max_epochs', '?')} ep)"
    if info.get("early_stopped"):
        return f"early-stopped ({info.get('epochs_run', '?')} ep)"
    if "converged" in info:
        return "converged" if info["converged"] else "NOT converged"
    return ""


def _pareto(doc: Document, strata, metrics: list[str], modes: list[str], out: Path) -> list:
    if len(metrics) < 2:
        return []
    pictures = []
    for proto, group in strata.items():
        front = pareto_front(list(group), metrics, modes)
        _protocol_heading(doc, "Pareto front", proto, strata)
        doc.para(", ".join(f"`{t}`" for t in front) or "(no trial has every objective)")
        pictures.append(plots.pareto_plot(group, (metrics[0], metrics[1]), set(front), out,
                                          proto))
    return pictures


def _failed(doc: Document, rows: Rows) -> None:
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:
        doc.heading("Failed trials")
        doc.bullets([f"`{r['trial_id']}` {r['config_id']}: {r['error'][:300]}" for r in failed])

