"""Everything a study needs that can be checked before it starts, all problems at once.

- ``endpoint_problems(cfg, address)``: the MLflow tracking store, the artifact store and the
  Ray address answer (``hescape.endpoints``: a short timeout each, nothing written);
- ``data_problems(cfg, paired)``: the dataset against the config, on every split the study
  uses (the dataset's own and each donor fold): the label / mutation columns, donors and
  spots per part against the batch size, the validation metrics and the mixing metrics,
  batches on the training side for a batch correction, the split file.

``--dry-run`` and ``run_study`` both run them before anything is written; one
``ConfigError`` lists every problem (``refuse``).
"""

from __future__ import annotations

import os
from typing import Any

from hescape.config import ConfigError, StudyConfig
from hescape.endpoints import artifact_problem, ray_address_problem, tracking_problem
from hescape.tracking import ARTIFACT_LOCATION_ENV


def refuse(source: str, problems: list[str], what: str) -> None:
    """Raise one ConfigError listing ``problems`` (nothing when there are none)."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s) with {what}; nothing was "
                          f"written:\n{lines}")


def tracking_setting(cfg: StudyConfig) -> tuple[str, str] | None:
    """(setting, URI) of an explicitly configured tracking store (None: sqlite default)."""
    for setting, value in (("mlflow.tracking_uri", cfg.mlflow.tracking_uri),
                           ("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))):
        if value is not None and value.strip():
            return setting, value.strip()
    return None


def endpoint_problems(cfg: StudyConfig, address: str | None) -> list[str]:
    """Probe the study's external endpoints (each with a short timeout)."""
    problems = []
    tracking = tracking_setting(cfg)
    if tracking is not None:
        problems.append(tracking_problem(tracking[1], setting=tracking[0]))
    for setting, value in (("mlflow.artifact_location", cfg.mlflow.artifact_location),
                           (ARTIFACT_LOCATION_ENV, os.environ.get(ARTIFACT_LOCATION_ENV))):
        if value is not None and value.strip():
            problems.append(artifact_problem(value.strip(), setting=setting))
            break
    problems.append(ray_address_problem(address))
    return [p for p in problems if p]


def data_problems(cfg: StudyConfig, paired: Any) -> list[str]:
    """What in ``paired`` (a ``PairedData``) keeps the study ``cfg`` from running."""
    from hescape.data.errors import DataError
    from hescape.data.splits import with_fold
    from hescape.study.shared import fold_config, study_folds

    obs = paired.adata.obs
    where = f"data.path={paired.path}"
    columns = ", ".join(map(str, obs.columns))
    problems: list[str] = []
    d = cfg.data
    if d.label_key is not None and d.label_key not in obs.columns:
        problems.append(f"data.label_key={d.label_key!r} is not an obs column of {where} "
                        f"(columns: {columns}): name a label column, or set data.label_key: "
                        "null for unlabelled data (label probes are then skipped)")
    if d.batch_key not in obs.columns:
        problems.append(f"data.batch_key={d.batch_key!r} is not an obs column of {where}")
    if d.split.file and d.path:
        problems.append(f"data.split.file={d.split.file} is set but data.path names an "
                        "imported dataset, whose donor split was fixed at import: re-import with "
                        "--split-file (hescape data import-... --split-file), or remove "
                        "data.split.file")
    k = cfg.eval.donor_folds
    n_donors = obs["donor"].astype(str).nunique()
    if k and k > n_donors:
        problems.append(f"eval.donor_folds={k} needs at least {k} donors; {where} has "
                        f"{n_donors}: lower eval.donor_folds or set it to null")
        return problems
    for fold in study_folds(cfg):
        try:
            on = with_fold(paired, fold_config(cfg, fold))
        except (DataError, ValueError) as exc:
            problems.append(f"donor fold {fold}: {exc}")
            continue
        problems += _split_problems(cfg, on, "the dataset's split" if fold is None
                                    else f"donor fold {fold}")
    return list(dict.fromkeys(problems))


def _split_problems(cfg: StudyConfig, paired: Any, label: str) -> list[str]:
    import numpy as np

    from hescape.preprocess.spec import get_method
    from hescape.study.space import enumerate_sections

    obs = paired.adata.obs
    out: list[str] = []
    n = {part: len(paired.indices(part)) for part in ("train", "val", "test")}
    donors = {part: list(paired.split.get(part, [])) for part in ("train", "val", "test")}
    counts = ", ".join(f"{p} {len(donors[p])} donor(s)/{n[p]} spots" for p in n)
    hint = ("the split is fixed when the dataset is imported or simulated (--val-fraction, "
            "--test-fraction, --split-file); more donors give every part one")
    if not donors["train"] or n["train"] == 0:
        out.append(f"{label}: no training donors ({counts}); {hint}")
    if not donors["val"] or n["val"] == 0:
        out.append(f"{label}: no validation donors ({counts}): model selection reads "
                   f"{cfg.train.best_metric} on them; {hint}")
    if not donors["test"] or n["test"] == 0:
        out.append(f"{label}: no test donors ({counts}): the evaluation reads them; {hint}")
    per_worker = n["train"] // max(1, cfg.train.num_workers)
    batch = cfg.train.batch_size
    if n["train"] and per_worker < batch:
        out.append(f"{label}: {n['train']} training spots over {cfg.train.num_workers} "
                   f"worker(s) give {per_worker} per worker < train.batch_size={batch}: no full "
                   f"batch; set train.batch_size <= {max(2, per_worker)}")
    for part in ("val", "test"):
        if 0 < n[part] < 2:
            out.append(f"{label}: the {part} part holds {n[part]} spot(s); retrieval and "
                       "mixing metrics need at least 2")
    if cfg.data.batch_key in obs.columns and n["train"]:
        batches = obs[cfg.data.batch_key].astype(str).to_numpy()[paired.indices("train")]
        n_batches = len(np.unique(batches))
        for section in enumerate_sections(cfg.sweep, cfg.model_dump(),
                                          "preprocess.expression") or []:
            method = str(section.get("method", "none"))
            try:
                spec = get_method(method)
            except ValueError:
                continue
            if spec.needs_batches and n_batches < 2:
                out.append(f"{label}: preprocess.expression.method={method} corrects for "
                           f"batch ({cfg.data.batch_key}) but the training donors hold "
                           f"{n_batches} batch: it needs >= 2 training batches; use "
                           "data.batch_key: slide (several slides per donor), more training "
                           "donors, or a method without batch correction (none, pca)")
    return out
