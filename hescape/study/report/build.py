"""Study report: the answer per swept factor first (``answer``), how to read it, warnings, leaderboards, factor effects with CIs, ablation,
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
from hescape.study import baselines, confirm, lineage, run_view
from hescape.study.folds import merge_folds
from hescape.study.report import answer, notes, plots, trial_plots
from hescape.study.report.document import Document
from hescape.study.report.effects import NEEDS_REPLICATES, BootstrapSettings
from hescape.study.report.tables import (
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
    rows = trial_table(ref, study_dir=Path(study_dir))
    baselines.attach(rows, baselines.read(Path(study_dir)))  # evaluated once per study
    if shared_work is None:  # a re-report: the precomputed variants as the study logged them
        shared_work = parent_shared_work(ref)
    per_donor, problems = per_donor_tables(ref, Path(study_dir), finished(rows))
    metrics, modes = objectives(cfg)
    pictures = trial_plots.draw_best(ref, Path(study_dir), rows, cfg, metrics[0], modes[0],
                                     report_dir=out)
    # donor cross-validation: the fold trials of a configuration and seed are one replicate
    rows, per_donor, fold_notes = merge_folds(rows, per_donor, cfg.eval.donor_folds)
    problems = [*problems, *fold_notes]
    doc, frames = build_report(
        cfg, rows, out=out, shared_work=shared_work, per_donor=per_donor, problems=problems,
        history=lambda run_id, key: metric_history(ref, run_id, key),
        settings=settings or BootstrapSettings(seed=cfg.eval.seed), embeddings=pictures,
        plan=confirm.read_plan(Path(study_dir)))
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
    embeddings: dict[str, list[Path]] | None = None, plan: dict[str, Any] | None = None,
) -> tuple[Document, dict[str, pd.DataFrame]]:
    """The report document and its csv tables (``leaderboard``, ``effects``) from trial rows
    (``trial_table``) and per-donor tables (``per_donor_tables``); PNGs go to ``out``.
    ``embeddings``: the best trials' embedding UMAPs (``trial_plots.draw_best``); ``plan``:
    the confirm phase's plan (``confirm.read_plan``), which names each factor's
    sub-experiment."""
    metrics, modes = objectives(cfg)
    strata = notes.by_protocol(rows)
    doc = Document(f"Study `{cfg.name}`")
    effect_rows = (effect_table(rows, per_donor, cfg, settings, plan) if per_donor
                   else effect_table([], {}, cfg, settings))
    _answer(doc, effect_rows, metrics[0], plan, cfg, bool(per_donor))
    doc.heading("How to read this report")
    doc.bullets(notes.reading_guide({k for r in rows for k in r["metrics"]}, metrics[0]))
    doc.para(notes.PROTOCOL_SENTENCE)
    _summary(doc, rows, strata)
    _warnings(doc, rows, shared_work, strata, problems)
    keys = [k for k in notes.headline_keys(cfg) if any(k in r["metrics"] for r in rows)]
    board = _leaderboards(doc, rows, strata, metrics[0], modes[0], keys[:MAX_COLUMNS])
    effects = _effects(doc, rows, per_donor or {}, effect_rows, settings, out)
    tables = _ablations(doc, strata, list(dict.fromkeys([*metrics, *keys[:6]])), rows)
    _baselines(doc, strata, cfg)
    _mutation(doc, rows, cfg)
    _variants(doc, shared_work)
    pictures = _pareto(doc, strata, metrics, modes, out)
    from hescape.study.report.moasha import moasha_section, study_decisions  # issue 21
    moasha_section(doc, rows, study_decisions(out.parent), cfg, out=out)  # out = <study>/report
    _failed(doc, rows)
    pictures += plots.ablation_plots(tables, metrics[0], out)
    curve = plots.learning_curves(rows, metrics[0], out, history) if history else None
    if pictures or curve:
        doc.heading("Plots")
        for path in [*pictures, *([curve] if curve else [])]:
            doc.image(path)
    _embedding_plots(doc, rows, embeddings or {})
    doc.heading("Config")
    doc.code(json.dumps(cfg.model_dump(), indent=1)[:6000])
    return doc, {"leaderboard": board, "effects": effects}


def _summary(doc: Document, rows: Rows, strata: dict[str, list]) -> None:
    n = {s: sum(r["status"] == s for r in rows) for s in ("FINISHED", "FAILED", "KILLED")}
    stopped = sum(r.get("outcome") == run_view.STOPPED for r in rows)
    by = ", ".join(f"{len(v)} {k}" for k, v in strata.items())
    doc.para(f"Trials: {len(rows)} ({n['FINISHED']} finished, {n['FAILED']} failed, "
             f"{stopped} stopped early by the scheduler, {n['KILLED'] - stopped} interrupted); "
             f"protocols: {by or '-'}."
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


def _answer(doc: Document, table: pd.DataFrame, objective: str, plan, cfg: StudyConfig,
            have_per_donor: bool) -> None:
    doc.heading("The answer: what each swept factor does")
    if not cfg.sweep or not cfg.sweep.params:
        doc.para("This study sweeps no factor: it answers no comparison (see the leaderboard).")
        return
    if not have_per_donor:
        doc.para(f"No verdict on any factor: {NO_PER_DONOR}.")
        return
    items = answer.answer_items(table, objective, plan, cfg.eval.donor_folds)
    if not items:
        doc.para("No factor has two levels with per-donor results in one protocol: no "
                 "comparison to make.")
        return
    doc.para("Per factor: each level against the reference level (the searched best "
             "configuration's value in the confirm phase, else the base config's), on the "
             "held-out donors, with 95% intervals spanning donors and training seeds. "
             "\"matters\": some interval excludes 0. Details and method: *Factor effects*.")
    reason = answer.no_verdict_reason(table)
    if reason:
        doc.warning(reason)
    doc.bullets(items)


def _effects(doc: Document, rows: Rows, per_donor, table: pd.DataFrame, settings,
             out: Path) -> pd.DataFrame:
    doc.heading("Factor effects (held-out donors, 95% CI)")
    done = finished(rows)
    if not per_donor:
        doc.para(f"{NO_PER_DONOR} (no trial's evaluation wrote `eval/per_donor.csv`).")
        return table
    doc.para(
        "Each row: the level's value minus the reference level's (the base config's value, "
        "else the first level) on the test donors. The 95% interval carries both sources "
        "of variation a claim about the factor spans: the held-out donors and the training "
        "runs (seeds; for a marginal comparison also the configurations): a random-effects "
        "variance (donor x level, run-to-run and residual spreads) with a t-type quantile "
        "calibrated by simulation (false claims 3-7% at 3-20 donors and 2-5 seeds; "
        "docs/measurements.md). *Paired* (a grid): trials matched on seed and the other "
        "factors form blocks, the other factors' effects cancel, and the spread over blocks "
        "carries the seed variation. *Controlled*: the trials share the other factors (a "
        "sweep over seeds, the confirm phase); the seeds are the replicates. *Marginal* "
        "(TPE/random: the levels also differ in factors the search chose): the "
        "configurations are the replicates; a comparison of what was run, not a controlled "
        "one. \"needs replicates\": a level with one run (or too few blocks) leaves seed "
        "variation unmeasured, so no verdict is given, and the row says what to run. Recalls "
        "are weighted by each donor's spots (the whole-set figure), Pearson figures are a "
        f"plain mean over donors. Fewer than {settings.min_donors} held-out donors give no "
        "CI. \"not distinguishable\": the interval covers 0; the row gives the seeds (and "
        "donors) that would resolve a difference of the observed size.")
    stopped = sum(r["status"] == "KILLED" for r in rows)
    if stopped:
        doc.para(f"{stopped} trial(s) were stopped early (ASHA, on validation donors) and are "
                 "not in the effects: a level whose weak trials were stopped is flattered.")
    missing = len(done) - sum(r["trial_id"] in per_donor for r in done)
    if missing:
        doc.para(f"{missing} of {len(done)} finished trial(s) have no per-donor table and "
                 "are left out of the effects.")
    if table.empty:
        doc.para("No factor has two levels with per-donor results in one protocol.")
        return table
    strata = dict.fromkeys(table["protocol"])
    designs = {"controlled": "controlled, replicated comparisons",
               "marginal": "marginal comparisons of the search (not controlled)"}
    for proto in strata:
        part = table[table["protocol"] == proto]
        kinds = [k for k in designs if (part["comparison"] == k).any()]
        if len(kinds) < 2:
            _protocol_heading(doc, "Effects", proto, strata, level=3)
            doc.table(fmt_effects(part))
            continue
        for kind in kinds:
            _protocol_heading(doc, f"Effects, {designs[kind]}", proto, strata, level=3)
            doc.table(fmt_effects(part[part["comparison"] == kind]))
    short = int((table["verdict"] == NEEDS_REPLICATES).sum())
    if short:
        doc.para(f"{short} of {len(table)} comparison(s) have no verdict (needs replicates): "
                 "where a level ran once, seed variation is not measured. Run each level "
                 "with >= 3 seeds (`sweep.seeds` in a grid) or, after a TPE/random search, the "
                 "confirm phase (`sweep.confirm`: the best configuration at each level, "
                 "`sweep.confirm.seeds` seeds each).")
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
               **({"fold": v["fold"]} if any(w.get("fold") is not None for w in variants)
                  else {}),
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


def _embedding_plots(doc: Document, rows: Rows, pictures: dict[str, list[Path]]) -> None:
    """The best trials' held-out embeddings in 2-D (drawn at report time, not per trial)."""
    if not pictures:
        return
    names = {r["trial_id"]: r.get("name") or r["trial_id"] for r in rows}
    doc.heading("Held-out embeddings of the best trials")
    doc.para("2-D layouts (UMAP) of the test donors' embeddings, for the best trials by the "
             "first objective (validation); other trials keep their embeddings in "
             "`eval/embeddings.h5ad`.")
    for trial_id, paths in pictures.items():
        doc.heading(names.get(trial_id, trial_id), level=3)
        for path in paths:
            doc.image(path)


def _failed(doc: Document, rows: Rows) -> None:
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:
        doc.heading("Failed trials")
        doc.bullets([f"`{r['trial_id']}` {r['config_id']}: {r['error'][:300]}" for r in failed])

