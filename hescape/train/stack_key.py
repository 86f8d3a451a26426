"""Which head-only configurations can train together as one stacked model.

``stack_key(cfg)`` is the grouping signature of a configuration: configurations with the
same key share the frozen image trunk, the feature-cache file, the prepared expression
variant, the batch size, the device and precision, and their trainable parameters have the
same names and shapes, so ``hescape.train.stacked`` can train them as one stacked model.
``None`` means the configuration cannot be stacked (``stack_problem`` says why) and trains
alone with ``hescape.train.fit``.

The key is built by exclusion: the whole ``StudyConfig`` dump minus the fields listed in
``PER_MEMBER`` (what each member of a stack may set on its own), so a config field added
later separates configurations until someone decides it may differ within a stack.

Per member (``PER_MEMBER``): the training seed (initialisation, data order, dropout masks),
``train.lr``, ``weight_decay``, ``warmup_steps``, ``grad_clip`` (null = no clipping),
``max_steps`` (ragged ends: a member leaves the stack at its last step), ``eval_every``,
``early_stop_patience``, ``best_metric``/``best_mode``, ``keep_checkpoints``;
``loss.init_temperature``, ``loss.siglip_init_bias``; ``model.gene.dropout``;
``model.adversary.weight`` and ``warmup_steps``; the whole ``eval`` section (validation
runs per member with its own settings); and what only concerns bookkeeping or resources
(``name``, ``sweep``, ``mlflow``, ``data.label_key``/``mutation_key``,
``train.cpus_per_worker``, ``gpus_per_trial``, ``in_process``, ``loader_workers``,
``channels_last``, ``max_failures``).

Shared (in the key): the dataset (``data.path``, or the simulator settings when there is
no path; split; batch key), ``storage_dir`` (where the caches live), the whole
``preprocess`` section (expression variant, stain normalisation), ``model.image``,
``model.gene`` but its dropout, ``embed_dim``, ``projection``, ``model.adversary``'s
``enabled``/``towers``/``hidden_dim``, ``loss.name`` and ``learn_temperature`` (they decide
which parameters exist and train), ``train.batch_size``, ``use_gpu``, ``precision``,
``feature_dtype``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from hescape.config import StudyConfig
from hescape.paths import absolute

# gene encoders / projections / losses with a stacked implementation (hescape.train.stack_model)
STACKABLE_GENE_ENCODERS = frozenset({"mlp", "latent_mlp"})
STACKABLE_PROJECTIONS = frozenset({"linear", "mlp"})
STACKABLE_LOSSES = frozenset({"clip", "siglip"})

PER_MEMBER: tuple[str, ...] = (
    "name", "sweep", "mlflow", "eval",
    "data.label_key", "data.mutation_key",
    "train.seed", "train.lr", "train.weight_decay", "train.warmup_steps", "train.grad_clip",
    "train.max_steps", "train.eval_every", "train.early_stop_patience", "train.best_metric",
    "train.best_mode", "train.keep_checkpoints", "train.max_failures",
    "train.cpus_per_worker", "train.gpus_per_trial", "train.in_process",
    "train.loader_workers", "train.channels_last",
    "loss.init_temperature", "loss.siglip_init_bias",
    "model.gene.dropout", "model.adversary.weight", "model.adversary.warmup_steps",
)


def stack_problem(cfg: StudyConfig) -> str | None:
    """None when ``cfg`` can train in a stack, else why it cannot (one sentence)."""
    if cfg.model.image.mode != "frozen":
        return (f"model.image.mode={cfg.model.image.mode}: the image tower trains, so each "
                "trial needs its own trunk (only head-only trials stack)")
    if not cfg.train.feature_cache:
        return "train.feature_cache is off: stacked members read the cached image features"
    if cfg.preprocess.image.stain_augment > 0:
        return (f"preprocess.image.stain_augment={cfg.preprocess.image.stain_augment:g}: the "
                "images change every step, so there are no cached features to share")
    if cfg.train.num_workers != 1:
        return f"train.num_workers={cfg.train.num_workers}: a stack trains in one process"
    if cfg.train.compile:
        return "train.compile is on: the stacked engine runs eager (no compiled equivalent)"
    gene = cfg.model.gene
    if gene.name not in STACKABLE_GENE_ENCODERS:
        return (f"model.gene.name={gene.name}: no stacked implementation (stackable: "
                f"{', '.join(sorted(STACKABLE_GENE_ENCODERS))})")
    if gene.frozen:
        return "model.gene.frozen: a frozen gene encoder is not stacked"
    if cfg.model.projection not in STACKABLE_PROJECTIONS:
        return (f"model.projection={cfg.model.projection}: no stacked implementation "
                f"(stackable: {', '.join(sorted(STACKABLE_PROJECTIONS))})")
    if cfg.loss.name not in STACKABLE_LOSSES:
        return (f"loss.name={cfg.loss.name}: no stacked implementation (stackable: "
                f"{', '.join(sorted(STACKABLE_LOSSES))})")
    return None


def shared_fields(cfg: StudyConfig) -> dict[str, Any]:
    """What every member of a stack must share: the config dump without ``PER_MEMBER``."""
    data = copy.deepcopy(cfg.model_dump(mode="json"))
    for dotted in PER_MEMBER:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    data["storage_dir"] = str(absolute(cfg.storage_dir))
    if cfg.data.path:
        data["data"]["path"] = str(absolute(cfg.data.path))
        data["data"].pop("simulate", None)  # unused when there is a dataset path
    adv = data["model"]["adversary"]
    adv["towers"] = sorted(set(adv["towers"]))
    if not adv["enabled"]:
        adv.pop("towers")
        adv.pop("hidden_dim")
    return data


def stack_key(cfg: StudyConfig) -> str | None:
    """The grouping signature of ``cfg`` (``"stack-<16 hex>"``), or None: not stackable."""
    if stack_problem(cfg) is not None:
        return None
    blob = json.dumps(shared_fields(cfg), sort_keys=True, default=str)
    return "stack-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def key_difference(a: StudyConfig, b: StudyConfig) -> list[str]:
    """Dotted paths of the shared fields where ``a`` and ``b`` differ (why they cannot
    stack together; empty when they can, given both are stackable)."""
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y)):
                walk(x.get(key), y.get(key), f"{path}.{key}" if path else key)
        elif x != y:
            out.append(path)

    walk(shared_fields(a), shared_fields(b), "")
    return out


def plan_groups(cfgs: Sequence[StudyConfig], *, max_size: int | None = None) -> list[list[int]]:
    """Indices of ``cfgs`` grouped by ``stack_key`` (first appearance order); a config that
    cannot stack is a group of its own. ``max_size`` splits larger groups (memory)."""
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size={max_size}: must be >= 1")
    groups: dict[str, list[int]] = {}
    order: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        key = stack_key(cfg)
        if key is None:
            order.append([i])
            continue
        if key not in groups:
            groups[key] = []
            order.append(groups[key])
        groups[key].append(i)
    if max_size is None:
        return order
    return [g[j:j + max_size] for g in order for j in range(0, len(g), max_size)]
