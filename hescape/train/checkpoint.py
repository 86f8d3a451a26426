"""Checkpoints: one directory per checkpoint, written atomically, read with weights_only.

Layout of a checkpoint directory::

    model.pt     model state_dict
    optim.pt     optimiser state, scheduler state, step, RNG states (torch, numpy, python,
                 cuda), best metric so far, early-stop counter
    config.json  StudyConfig.model_dump()
    meta.json    gene_in_dim, n_donors, donor_names, feature_names, preprocess cache key,
                 step, metrics

Everything in the ``.pt`` files is tensors / lists / dicts / numbers, so
``torch.load(weights_only=True)`` reads it. Only rank 0 calls ``save_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hescape.atomic import atomic_dir
from hescape.config import StudyConfig

log = logging.getLogger(__name__)

MODEL_FILE, OPTIM_FILE, CONFIG_FILE, META_FILE = "model.pt", "optim.pt", "config.json", "meta.json"
_STEP_RE = re.compile(r"(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns (the optimiser state is None when not asked for)."""

    path: Path
    model_state: dict[str, Any]
    train_state: dict[str, Any] | None
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


# --------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """RNG states of torch (+cuda), numpy and python as tensors/lists (weights_only safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by ``get_rng_state``."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------- save
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    cfg: StudyConfig,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (``hescape.atomic.atomic_dir``: a temporary
    directory beside it, files fsynced, swapped into place); returns its path.

    ``train_state`` holds the optimiser/scheduler state, step, RNG, best metric and
    early-stop counter (``optim.pt``); ``meta`` goes to ``meta.json``.
    """
    target = Path(directory)
    with atomic_dir(target) as tmp:
        _torch_save(_unwrap(model).state_dict(), tmp / MODEL_FILE)
        if train_state is not None:
            _torch_save(train_state, tmp / OPTIM_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
    return target


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file: a full disk then surfaces as the
    ``OSError(ENOSPC)`` behind torch's "unexpected pos" error (a path makes torch's C++
    writer fail with no errno at all), which ``atomic_dir`` re-raises naming the checkpoint."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


# -------------------------------------------------------------------------- load
def _is_checkpoint(path: Path) -> bool:
    return (path / META_FILE).exists() or (path / MODEL_FILE).exists()


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint directory's name (``checkpoint_0000300`` -> 300), else -1."""
    match = _STEP_RE.search(Path(path).name)
    return int(match.group(1)) if match else -1


def _step_key(path: Path) -> tuple[int, float]:
    return (checkpoint_step(path), path.stat().st_mtime)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories directly under ``root``, newest (highest step) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((p for p in found if _is_checkpoint(p)), key=_step_key, reverse=True)


def _torch_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, unpickling error, ...
        raise CheckpointError(f"{path}: unreadable checkpoint file ({exc})") from exc


def _json_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({exc})") from exc


def _load_one(path: Path, with_train_state: bool) -> LoadedCheckpoint:
    meta = _json_file(path / META_FILE)
    config = _json_file(path / CONFIG_FILE)
    model_state = _torch_file(path / MODEL_FILE)
    train_state = _torch_file(path / OPTIM_FILE) if with_train_state else None
    return LoadedCheckpoint(path, model_state, train_state, config, meta)


def load_checkpoint(
    path: str | Path, *, with_train_state: bool = True, fallback: bool = True
) -> LoadedCheckpoint:
    """Load a checkpoint directory, or the newest good one under a directory of them.

    With ``fallback``, a truncated/corrupt checkpoint is skipped (with a warning) in
    favour of the previous good one next to it; if none is readable a ``CheckpointError``
    names each file that failed.
    """
    path = Path(path)
    if _is_checkpoint(path):
        older = [p for p in list_checkpoints(path.parent) if _step_key(p) < _step_key(path)]
        candidates = [path] + (older if fallback else [])
    else:
        candidates = list_checkpoints(path)
        if not candidates:
            raise CheckpointError(f"{path}: no checkpoint directory (with {META_FILE}) found")
        candidates = candidates if fallback else candidates[:1]
    errors = []
    for cand in candidates:
        try:
            loaded = _load_one(cand, with_train_state)
        except CheckpointError as exc:
            errors.append(str(exc))
            log.warning("skipping checkpoint: %s", exc)
            continue
        if errors:
            log.warning("fell back to the previous good checkpoint %s", cand)
        return loaded
    raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(errors))


def load_model(ckpt_dir: str | Path) -> tuple[torch.nn.Module, StudyConfig, dict[str, Any]]:
    """Rebuild the TwoTower of a checkpoint (eval mode, CPU) -> (model, cfg, meta)."""
    from hescape.models import build_model

    loaded = load_checkpoint(ckpt_dir, with_train_state=False)
    cfg = StudyConfig.model_validate(loaded.config)
    arch = cfg.model.model_copy(deep=True)
    arch.image.pretrained, arch.image.weights = False, None  # weights come from model.pt
    meta = loaded.meta
    model = build_model(arch, cfg.loss, gene_in_dim=int(meta["gene_in_dim"]),
                        n_donors=int(meta["n_donors"]), feature_names=meta.get("feature_names"))
    try:
        model.load_state_dict(loaded.model_state)
    except RuntimeError as exc:  # weights of another architecture than config.json describes
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{Path(ckpt_dir) / MODEL_FILE}: weights do not match the model in "
            f"{CONFIG_FILE} (a checkpoint from another model?): "
            f"{' '.join(x.strip() for x in first[:3])[:500]}") from None
    return model.eval(), cfg, meta
