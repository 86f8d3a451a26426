"""Study report: leaderboard, ablation tables (mean +/- sd over seeds), Pareto front, plots.

Written under ``<storage>/<study>/report/`` as Markdown + HTML + PNG and logged to the
study's parent MLflow run. ``write_report`` is also what ``study/run.py --report`` calls
for a finished study.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hescape.config import StudyConfig
from hescape.study import lineage
from hescape.study.results import metric_history, trial_table
from hescape.study.tuner import objectives

KEY_METRICS = (
    "test/r5_img2gene", "test/r5_gene2img", "test/inbatch64_r5_img2gene",
    "test/probe_pearson_mean", "test/mutation_auroc_pooled", "test/gene_ilisi", "test/gene_kbet",
    "val/r5_img2gene",
)


def leaderboard(rows: list[dict[str, Any]], metric: str, mode: str) -> pd.DataFrame:
    recs = []
    for r in rows:
        rec = {"trial": r["trial_id"], "status": r["status"], "phase": r["phase"],
               "config": r["config_id"], "seed": r["seed"], "saw_heldout": r["saw_heldout"]}
        rec.update({k: r["metrics"].get(k, np.nan) for k in (metric, *KEY_METRICS)})
        recs.append(rec)
    df = pd.DataFrame(recs)
    if df.empty:
        return df
    df = df.loc[:, ~df.columns.duplicated()]
    return df.sort_values(metric, ascending=(mode == "min"), na_position="last")


MAX_LEVELS = 4  # a numeric factor with more distinct values is shown in quantile bins


def ablation(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, pd.DataFrame]:
    """Per sweep factor: mean +/- sd (and n) of each metric per factor level, over seeds.

    A numeric factor sampled continuously (TPE/random: more than ``MAX_LEVELS`` distinct
    values) is grouped in ``MAX_LEVELS - 1`` quantile bins labelled by their range; trials
    where a conditional factor is absent form the ``(base)`` level.
    """
    done = [r for r in rows if r["status"] == "FINISHED"]
    factors = sorted({k for r in done for k in r["sweep_params"] if k != "train.seed"})
    tables = {}
    for factor in factors:
        values = [r["sweep_params"].get(factor) for r in done]
        levels = _levels(values)
        recs = [{"level": level, **{m: r["metrics"].get(m, np.nan) for m in metrics}}
                for level, r in zip(levels, done)]
        df = pd.DataFrame(recs)
        agg = df.groupby("level", sort=False).agg(["mean", "std", "count"])
        tables[factor] = agg.loc[sorted(agg.index, key=_level_order(values, levels))]
    return tables


def _levels(values: list[Any]) -> list[str]:
    """One label per value: itself, or its quantile bin for a many-valued numeric factor."""
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(set(numeric)) <= MAX_LEVELS or len(numeric) != sum(v is not None for v in values):
        return ["(base)" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                for v in values]
    edges = np.quantile(numeric, np.linspace(0, 1, MAX_LEVELS))
    labels = []
    for v in values:
        if v is None:
            labels.append("(base)")
            continue
        i = min(int(np.searchsorted(edges, v, side="right")) - 1, len(edges) - 2)
        labels.append(f"[{edges[i]:.3g}, {edges[i + 1]:.3g}]")
    return labels


def _level_order(values: list[Any], levels: list[str]):
    """Sort key: (base) first, then levels by their smallest value (numbers numerically)."""
    first: dict[str, Any] = {}
    for v, level in zip(values, levels):
        first.setdefault(level, v)

    def key(level: str) -> tuple:
        v = first.get(level)
        if v is None:
            return (0, 0.0, "")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (1, float(v), "")
        return (2, 0.0, str(v))

    return key


def baseline_comparison(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Tasks x feature sets over finished trials (mean ± sd): does contrastive training beat
    the frozen image encoder and PCA of expression on each held-out task?"""
    from hescape.evaluate.baselines import comparison_table

    tables = []
    for r in rows:
        if r["status"] != "FINISHED":
            continue
        m = {k.removeprefix("test/"): v for k, v in r["metrics"].items()
             if k.startswith("test/")}
        names = sorted({k.split("_")[1] for k in m
                        if k.startswith("baseline_") and not k.startswith("baseline_pca_")})
        table = comparison_table(m, names)
        if len(table) and table.shape[1] > 2 and table.iloc[:, 2:].notna().any().any():
            tables.append(table)
    if not tables:
        return pd.DataFrame()
    stacked = pd.concat(tables)
    grouped = stacked.groupby(level=0, sort=False)
    mean, sd, n = grouped.mean(), grouped.std(), grouped.count()
    out = pd.DataFrame(index=mean.index, columns=mean.columns, dtype=object)
    for col in mean.columns:
        out[col] = [("" if c == 0 else f"{a:.3f} ± {b:.3f}" if c > 1 else f"{a:.3f}")
                    for a, b, c in zip(mean[col], sd[col].fillna(0), n[col])]
    out.columns = [c.replace("_", " ") for c in out.columns]
    return out


def pareto_front(rows: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[str]:
    """Trial ids not dominated on all objectives."""
    pts = [(r["trial_id"], [r["metrics"].get(m) for m in metrics]) for r in rows
           if r["status"] == "FINISHED" and all(m in r["metrics"] for m in metrics)]
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    front = []
    for tid, v in pts:
        vs = [s * x for s, x in zip(sign, v)]
        dominated = any(
            all(s * y >= x for s, y, x in zip(sign, w, vs))
            and any(s * y > x for s, y, x in zip(sign, w, vs))
            for _, w in pts
        )
        if not dominated:
            front.append(tid)
    return front


def _fmt_ablation(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=df.index)
    for metric in df.columns.get_level_values(0).unique():
        m, s, n = df[(metric, "mean")], df[(metric, "std")], df[(metric, "count")]
        out[metric] = [f"{a:.3f} ± {b:.3f} (n={int(c)})" if c > 1 else f"{a:.3f} (n={int(c)})"
                       for a, b, c in zip(m, s.fillna(0), n)]
    return out


def _plots(ref, rows, tables, metric, out: Path, pareto: tuple | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for factor, df in tables.items():
        if (metric, "mean") not in df.columns:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        means, sds = df[(metric, "mean")], df[(metric, "std")].fillna(0)
        ax.bar(range(len(means)), means, yerr=sds, capsize=4, color="#5b8db8")
        ax.set_xticks(range(len(means)), [str(i) for i in means.index], rotation=20)
        ax.set_title(f"{metric} by {factor}", fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
        paths.append(_save(fig, out / f"ablation_{factor.replace('.', '_')}.png"))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in rows[:40]:
        hist = metric_history(ref, r["run_id"], "val/r5_img2gene")
        if hist:
            ax.plot(*zip(*hist), alpha=0.7, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("val/r5_img2gene")
    ax.set_title("learning curves (validation donors)", fontsize=9)
    paths.append(_save(fig, out / "learning_curves.png"))
    if pareto:
        (m1, m2), front = pareto
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for r in rows:
            if m1 in r["metrics"] and m2 in r["metrics"]:
                on = r["trial_id"] in front
                ax.scatter(r["metrics"][m1], r["metrics"][m2], c="#d1495b" if on else "#999")
        ax.set_xlabel(m1)
        ax.set_ylabel(m2)
        ax.set_title("Pareto front (red)", fontsize=9)
        paths.append(_save(fig, out / "pareto.png"))
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def write_report(
    ref: lineage.LineageRef, study_dir: Path, cfg: StudyConfig, shared_work: dict | None = None
) -> Path:
    """Write report.md/.html and plots; log them to the parent run. Returns the report dir."""
    out = Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_table(ref)
    metrics, modes = objectives(cfg)
    board = leaderboard(rows, metrics[0], modes[0])
    shown = [m for m in dict.fromkeys([*metrics, *KEY_METRICS])
             if any(m in r["metrics"] for r in rows)]
    tables = ablation(rows, shown or metrics)
    front = pareto_front(rows, metrics, modes) if len(metrics) > 1 else []
    pareto = ((metrics[0], metrics[1]), front) if len(metrics) > 1 else None
    plots = _plots(ref, rows, tables, metrics[0], out, pareto)
    md = _markdown(cfg, rows, board, tables, front, shared_work, plots)
    _atomic_write(out / "report.md", md)
    _atomic_write(out / "report.html", _html(md, plots))
    board.to_csv(out / "leaderboard.csv", index=False)
    client = lineage.MlflowClient(ref.tracking_uri)
    lineage.with_retry(lambda: client.log_artifacts(ref.parent_run_id, str(out), "report"))
    return out


def _markdown(cfg, rows, board, tables, front, shared_work, plots) -> str:
    n = {s: sum(r["status"] == s for r in rows) for s in ("FINISHED", "FAILED", "KILLED")}
    lines = [f"# Study `{cfg.name}`", "",
             f"Trials: {len(rows)} ({n['FINISHED']} finished, {n['FAILED']} failed, "
             f"{n['KILLED']} stopped early by ASHA or interrupted).", "",
             "Retrieval figures (`r5_*`) are over the WHOLE held-out set; `inbatch64_*` is the "
             "HESCAPE-comparable in-batch figure (random batches of 64) and is not comparable "
             "with the whole-set one.", "", "## Leaderboard", ""]
    lines.append(board.head(30).to_markdown(index=False, floatfmt=".3f") if not board.empty
                 else "(no trials)")
    if shared_work and shared_work.get("variants"):
        lines += ["", "## Preprocessing variants before training", ""]
        pre = pd.DataFrame([{"variant": v["method"], "saw_heldout": v["saw_heldout"],
                             **{k.split("/")[-1]: x for k, x in v["metrics"].items()
                                if isinstance(x, (int, float))}} for v in shared_work["variants"]])
        lines.append(pre.to_markdown(index=False, floatfmt=".3f"))
    comparison = baseline_comparison(rows)
    if not comparison.empty:
        lines += ["", "## Contrastive training vs baselines (held-out donors, finished trials, "
                  "mean ± sd)", "",
                  "`contrastive img`/`gene`: the trained embeddings; `frozen img`: the image "
                  "encoder before contrastive training; `pca expr`: PCA of expression. Higher "
                  "is better on every row; HESCAPE found contrastive training helps mutation "
                  "prediction and hurts expression prediction.", ""]
        lines.append(comparison.to_markdown())
    for factor, df in tables.items():
        lines += ["", f"## Ablation: `{factor}` (mean ± sd over seeds and other factors)", ""]
        lines.append(_fmt_ablation(df).to_markdown())
    if front:
        lines += ["", "## Pareto front", "", ", ".join(front)]
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- `{r['trial_id']}` {r['config_id']}: {r['error'][:300]}" for r in failed]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Config:", "", "```json", json.dumps(cfg.model_dump(), indent=1)[:6000], "```"]
    return "\n".join(lines) + "\n"


def _html(md: str, plots: list[Path]) -> str:
    body = html.escape(md)
    imgs = "".join(f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in plots)
    return (f"<!doctype html><meta charset='utf-8'><title>study report</title>"
            f"<pre style='font-size:13px'>{body}</pre>{imgs}")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
