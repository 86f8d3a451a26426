"""What a trial's MLflow child run shows in the dashboard: a name that carries the swept levels,
an outcome that does not make early stopping read as a failure, and a metric set that fits
on one screen (the full evaluation stays in the run's ``eval/metrics.json`` artifact, which
``hescape.study.results`` merges back for the report).

Outcomes (tag ``hescape.outcome``):

- ``completed``: trained and evaluated (status FINISHED).
- ``stopped early``: the scheduler (ASHA / MO-ASHA) stopped it at a rung. Status FINISHED, so
  the runs table shows a check mark and not a red cross; ``hescape.stopped_by`` says which
  scheduler at which step. It has no test metrics.
- ``failed``: it raised (status FAILED, the reason in ``hescape.error``).
- ``interrupted``: the driver stopped before the trial ended (status KILLED).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

TAG_OUTCOME = "hescape.outcome"
TAG_STOPPED_BY = "hescape.stopped_by"
COMPLETED, STOPPED, FAILED, INTERRUPTED = "completed", "stopped early", "failed", "interrupted"

# key components that name nothing on their own: the value (or the parent) says what it is
_GENERIC = {"name", "method", "enabled", "value"}
_ABBREV = {"init_temperature": "T", "temperature": "T", "adversary": "adv", "weight": "w",
           "learning_rate": "lr", "embed_dim": "dim", "batch_size": "bs", "hidden_dim": "hid",
           "n_layers": "layers", "weight_decay": "wd", "max_steps": "steps"}
_SEED, _FOLD = "train.seed", "data.fold"

# learning curves (per training report) and headline evaluation metrics shown as MLflow
# metrics; everything else is in eval/metrics.json
CURVE_METRICS = (
    "train/loss", "train/contrastive", "train/adv_loss", "train/temperature", "train/lr",
    "val/loss", "val/r1_img2gene", "val/r5_img2gene", "val/r10_img2gene", "val/r5_gene2img",
    "val/r5_img2gene_within_donor", "val/donor_acc_gene", "val/donor_acc_img",
)  # and sys/* (peak memory, stack size)
HEADLINE_PATTERNS = (
    r"test/r(1|5|10)_img2gene", r"test/r5_gene2img", r"test/r5_img2gene_within_donor",
    r"test/inbatch\d+_r5_img2gene",  # HESCAPE's in-batch protocol, for comparison
    r"test/(gene|img|joint)/ilisi", r"test/joint/(kbet|silhouette_batch)",
    r"test/(gene|img|joint)/label_macro_f1", r"test/joint/nmi_kmeans",
    r"test/bleep_pearson_mean", r"test/img/ridge_per_donor_pearson_mean",
    r"test/(gene|img|joint)/mutation_auroc", r"test/hest_.*pearson_mean",
)
_HEADLINE = re.compile("|".join(f"(?:{p})" for p in HEADLINE_PATTERNS))
BOOKKEEPING = ("step", "epoch")  # resume reads the last logged step
# params every child run shows (filters such as params.`model.gene.name` = 'mlp' work on all);
# the rest of the study's config is on the parent run, the trial's whole config in its
# resolved_config.json artifact
CORE_PARAMS = ("model.image.name", "model.gene.name", "preprocess.expression.method",
               "loss.name", "loss.init_temperature", "train.seed", "train.lr",
               "train.batch_size", "train.max_steps", "data.fold")


def swept_keys(space: Mapping[str, Any]) -> list[str]:
    """The sweep parameters that take more than one value (``sweep.params`` as dicts)."""
    out = []
    for key, spec in space.items():
        spec = dict(spec)
        values = spec.get("values")
        if spec.get("type") != "choice" or len({repr(v) for v in values or []}) > 1:
            out.append(key)
    return out


def short_key(key: str) -> str:
    """``loss.init_temperature`` -> ``T``; ``model.adversary.weight`` -> ``adv.w``."""
    parts = key.split(".")
    last = parts[-1]
    if last in ("weight",) and len(parts) > 1:
        return f"{_ABBREV.get(parts[-2], parts[-2])}.{_ABBREV[last]}"
    if last in _GENERIC and len(parts) > 1:
        return _ABBREV.get(parts[-2], parts[-2])
    return _ABBREV.get(last, last)


def level_text(key: str, value: Any) -> str:
    """One swept level, compactly: a categorical value alone when its key is generic
    (``harmony``, ``clip``), ``adv=on``, ``T=0.07``."""
    if isinstance(value, bool):
        return f"{short_key(key)}={'on' if value else 'off'}"
    if isinstance(value, float):
        return f"{short_key(key)}={value:.3g}"
    if isinstance(value, str) and key.split(".")[-1] in _GENERIC:
        return value
    return f"{short_key(key)}={value}"


def run_name(trial_id: str, params: Mapping[str, Any], swept: Iterable[str], *,
             seed: int, fold: int | None = None) -> str:
    """The child run's name: the levels of the swept factors (in the space's order), the
    seed (and donor fold), then the trial id, e.g. ``harmony clip T=0.07 s1 · 3f2a1c0e``."""
    levels = [level_text(k, params[k]) for k in swept
              if k in params and k not in (_SEED, _FOLD)]
    tail = [f"s{seed}"] + ([f"f{fold}"] if fold is not None else [])
    return f"{' '.join(levels + tail)} · {trial_id}"[:250]


def mlflow_metrics(metrics: Mapping[str, float], required: Iterable[str] = ()) -> dict[str, float]:
    """The part of ``metrics`` logged as MLflow metrics: learning curves, headline test
    metrics, what the scheduler and selection read (``required``), ``sys/*`` (peak memory,
    stack size) and the bookkeeping step."""
    keep = set(CURVE_METRICS) | set(required) | set(BOOKKEEPING)
    return {k: v for k, v in metrics.items()
            if k in keep or k.startswith("sys/") or _HEADLINE.fullmatch(k)}


def child_params(flat: Mapping[str, Any], flat_base: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened trial config's params a child run logs: the core set and every value
    that differs from the study's base config (the swept levels, the seed, the fold)."""
    return {k: v for k, v in flat.items()
            if k in CORE_PARAMS or k not in flat_base or flat_base[k] != v}


def outcome_tags(outcome: str, *, stopped_by: str | None = None) -> dict[str, str]:
    tags = {TAG_OUTCOME: outcome}
    if stopped_by:
        tags[TAG_STOPPED_BY] = stopped_by
    return tags


def outcome(status: str, tags: Mapping[str, str]) -> str:
    """A run's outcome from its status and tags (runs logged before the tag existed:
    KILLED read as interrupted or stopped, FINISHED as completed)."""
    if TAG_OUTCOME in tags:
        return tags[TAG_OUTCOME]
    return {"FINISHED": COMPLETED, "FAILED": FAILED, "KILLED": INTERRUPTED}.get(status,
                                                                              status.lower())


def row_status(status: str, tags: Mapping[str, str]) -> str:
    """The status the report works with: a run the scheduler stopped is ``KILLED`` there
    (not evaluated) whatever its MLflow status."""
    return "KILLED" if tags.get(TAG_OUTCOME) == STOPPED else status
