"""Embedding UMAPs of a study's best trials, drawn once at report time.

A trial's evaluation writes its held-out embeddings (``trials/<id>/eval/embeddings.h5ad``)
but not their 2-D layouts: UMAP is the costliest plot and nobody reads it for every trial.
The report draws them for the ``eval.umap_top_trials`` best finished trials, ranked by the
study's first objective (a validation metric: selection never reads test donors), logs them
to each trial's child run under ``eval/`` and shows them in the report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hescape.config import StudyConfig

EMBEDDINGS = "embeddings.h5ad"


def best_trials(rows: list[dict[str, Any]], metric: str, mode: str, k: int) -> list[dict]:
    """The ``k`` finished trials with the best ``metric`` (NaN/absent last, ties by id)."""
    def score(row: dict[str, Any]) -> tuple[float, str]:
        value = row["metrics"].get(metric, math.nan)
        if not math.isfinite(value):
            return (math.inf, row["trial_id"])
        return (-value if mode == "max" else value, row["trial_id"])

    done = [r for r in rows if r["status"] == "FINISHED"]
    return sorted(done, key=score)[:k]


def draw(study_dir: Path, row: dict[str, Any], cfg: StudyConfig) -> list[Path]:
    """The UMAPs of one trial from its saved embeddings (existing PNGs are reused)."""
    import anndata as ad

    from hescape.evaluate.pipeline import plot_embeddings

    folder = Path(study_dir) / "trials" / row["trial_id"] / "eval"
    path = folder / EMBEDDINGS
    if not path.is_file():
        return []
    done = sorted(folder.glob("umap_*.png")) + sorted(folder.glob("pca_*.png"))
    if done:
        return done
    adata = ad.read_h5ad(path)
    embs = {name: adata.obsm[name] for name in ("img", "gene", "joint") if name in adata.obsm}
    arts = plot_embeddings(folder, embs, adata.obs, cfg=cfg.eval,
                           keys=["donor", cfg.data.batch_key, cfg.data.label_key])
    return sorted(arts.values())


def draw_best(ref: Any, study_dir: Path, rows: list[dict[str, Any]], cfg: StudyConfig,
              metric: str, mode: str, *, report_dir: Path) -> dict[str, list[Path]]:
    """``{trial_id: PNGs}`` for the best trials, copied into ``report_dir`` (the Markdown
    report links files beside it); each trial's PNGs are also logged to its run."""
    import shutil

    from hescape.study import lineage

    if not cfg.eval.plots or cfg.eval.umap_top_trials == 0:
        return {}
    out: dict[str, list[Path]] = {}
    for row in best_trials(rows, metric, mode, cfg.eval.umap_top_trials):
        pictures = draw(study_dir, row, cfg)
        if not pictures:
            continue
        if ref is not None and row.get("run_id"):
            lineage.log_artifacts(ref, row["run_id"], {p.stem: p for p in pictures},
                                  subdir="eval")
        copies = []
        for path in pictures:
            copy = Path(report_dir) / f"{row['trial_id']}_{path.name}"
            shutil.copyfile(path, copy)
            copies.append(copy)
        out[row["trial_id"]] = copies
    return out
