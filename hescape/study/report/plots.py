"""Study report figures: factor effects with CIs, ablation bars per protocol, learning
curves, Pareto front. PNGs written atomically; matplotlib with the Agg backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hescape.atomic import atomic_path

COLORS = ("#5b8db8", "#d1495b", "#8a8a8a")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    """Lay out ``fig`` and write it to ``path`` atomically (``hescape.atomic``)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def effect_plots(effects: pd.DataFrame, out: Path) -> list[Path]:
    """Per factor: difference to the reference with its 95% CI per level, one panel per
    metric, protocols and designs (controlled / marginal) side by side (never pooled)."""
    if effects.empty:
        return []
    plt = _pyplot()
    paths = []
    for factor, frame in effects.groupby("factor", sort=True):
        metrics = list(dict.fromkeys(frame["metric"]))[:4]
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(5.0, 3.6 * len(metrics)), 3.4),
                                 squeeze=False)
        frame = frame.assign(series=frame["protocol"] + (
            ", " + frame["comparison"] if "comparison" in frame else ""))
        protocols = list(dict.fromkeys(frame["series"]))
        for ax, metric in zip(axes[0], metrics):
            sub = frame[frame["metric"] == metric]
            levels = list(dict.fromkeys(sub["level"]))
            for j, proto in enumerate(protocols):
                p = sub[sub["series"] == proto].set_index("level").reindex(levels)
                x = np.arange(len(levels)) + (j - (len(protocols) - 1) / 2) * 0.2
                err = np.vstack([p["delta"] - p["ci_low"], p["ci_high"] - p["delta"]])
                ax.errorbar(x, p["delta"], yerr=np.nan_to_num(err), fmt="o", capsize=4,
                            color=COLORS[j % len(COLORS)], label=proto)
            ax.axhline(0, color="#444", lw=0.8)
            ax.set_xticks(range(len(levels)), [str(v) for v in levels], rotation=20, fontsize=8)
            ref = ", ".join(dict.fromkeys(sub["reference"]))
            ax.set_title(f"{metric}\nvs {ref}", fontsize=8)
            ax.set_ylabel("difference (95% CI)", fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{factor}: difference to reference (held-out donors)", fontsize=8)
        paths.append(save(fig, out / f"effect_{_slug(factor)}.png"))
    plt.close("all")
    return paths


def ablation_plots(tables: dict[str, dict[str, pd.DataFrame]], metric: str, out: Path
                   ) -> list[Path]:
    """Per factor: mean +/- sd of ``metric`` per level, one bar group per protocol."""
    plt = _pyplot()
    paths = []
    factors = sorted({f for per in tables.values() for f in per})
    for factor in factors:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        levels: list[str] = []
        for per in tables.values():
            if factor in per:
                levels += [str(i) for i in per[factor].index if str(i) not in levels]
        drawn = False
        for j, (proto, per) in enumerate(tables.items()):
            df = per.get(factor)
            if df is None or (metric, "mean") not in df.columns:
                continue
            df = df.set_axis([str(i) for i in df.index]).reindex(levels)
            x = np.arange(len(levels)) + (j - (len(tables) - 1) / 2) * 0.35
            ax.bar(x, df[(metric, "mean")], width=0.33, yerr=df[(metric, "std")].fillna(0),
                   capsize=3, color=COLORS[j % len(COLORS)], label=proto)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xticks(range(len(levels)), levels, rotation=20, fontsize=8)
        ax.set_title(f"{metric} by {factor} (mean ± sd)", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(save(fig, out / f"ablation_{_slug(factor)}.png"))
    plt.close("all")
    return paths


def learning_curves(rows: Sequence[dict[str, Any]], key: str, out: Path,
                    history: Callable[[str, str], list[tuple[int, float]]]) -> Path | None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    drawn = 0
    for r in rows[:40]:
        hist = history(r["run_id"], key)
        if hist:
            ax.plot(*zip(*hist), alpha=0.7, lw=1)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title("learning curves (validation donors)", fontsize=9)
    path = save(fig, out / "learning_curves.png")
    plt.close("all")
    return path


def pareto_plot(rows: Sequence[dict[str, Any]], metrics: tuple[str, str], front: set[str],
                out: Path, name: str) -> Path:
    plt = _pyplot()
    m1, m2 = metrics
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for r in rows:
        if m1 in r["metrics"] and m2 in r["metrics"]:
            on = r["trial_id"] in front
            ax.scatter(r["metrics"][m1], r["metrics"][m2], c=COLORS[1] if on else "#999")
    ax.set_xlabel(m1, fontsize=8)
    ax.set_ylabel(m2, fontsize=8)
    ax.set_title(f"Pareto front (red), {name} trials", fontsize=9)
    path = save(fig, out / f"pareto_{_slug(name)}.png")
    plt.close("all")
    return path
