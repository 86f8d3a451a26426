"""Donor-level splits: by fraction and seed, from a file, or leave-one-donor-out."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import yaml

from hescape.config import SplitConfig
from hescape.data.errors import DataError

PARTS = ("train", "val", "test")
_ALIASES = {"valid": "val", "validation": "val", "training": "train", "testing": "test"}


def normalise_part(name: str, *, where: str = "split") -> str:
    """Map a split name (train/val/valid/validation/test...) to train|val|test."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PARTS:
        raise DataError(f"{where}: unknown split name {name!r}; use one of train, val, test")
    return key


def check_split(split: Mapping[str, Iterable[str]], donors: Iterable[str], *,
                source: str = "split") -> dict[str, list[str]]:
    """Check a donor split against the data's donors; return it normalised.

    Errors: a donor in two parts, a donor the data does not have, a data donor left out.
    """
    donors = {str(d) for d in donors}
    seen: dict[str, str] = {}
    out: dict[str, list[str]] = {p: [] for p in PARTS}
    for part, members in split.items():
        key = normalise_part(part, where=source)
        for donor in members:
            donor = str(donor)
            if donor in seen and seen[donor] != key:
                raise DataError(
                    f"{source}: donor {donor!r} is in both {seen[donor]!r} and {key!r}; "
                    "a donor must be in exactly one part (remove one of the rows)")
            if donor not in seen:
                seen[donor] = key
                out[key].append(donor)
    unknown = sorted(set(seen) - donors)
    if unknown:
        raise DataError(
            f"{source}: names donors not in the data: {unknown}; known donors: {sorted(donors)} "
            "(fix the spelling or remove those rows)")
    missing = sorted(donors - set(seen))
    if missing:
        raise DataError(
            f"{source}: donors {missing} are in no part; add a row (donor,split) for each")
    if not out["train"]:
        raise DataError(f"{source}: no donor in 'train'; assign at least one donor to train")
    return {p: sorted(v) for p, v in out.items()}


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """Read a CSV (columns donor,split) or YAML ({train: [...], ...} or donor: split)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; pass an existing CSV/YAML with donor,split")
    if path.suffix.lower() in (".yaml", ".yml"):
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a mapping (train: [donors] or donor: split)")
        if all(isinstance(v, list) for v in raw.values()):
            return {str(k): [str(d) for d in v] for k, v in raw.items()}
        pairs = [(str(d), str(p)) for d, p in raw.items()]
    else:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"donor", "split"} <= cols:
                raise DataError(
                    f"{path}: split CSV needs columns 'donor' and 'split', found {sorted(cols)}")
            pairs = [(row["donor"].strip(), row["split"].strip()) for row in reader]
    out: dict[str, list[str]] = {}
    for i, (donor, part) in enumerate(pairs):
        key = normalise_part(part, where=f"{path} row {i + 1}")
        out.setdefault(key, []).append(donor)
    return out


def check_min_spots(donor_counts: Mapping[str, int], min_spots: int, *, source: str) -> None:
    """Raise if a donor has fewer spots than ``min_spots``."""
    small = {d: int(n) for d, n in donor_counts.items() if int(n) < min_spots}
    if small:
        raise DataError(
            f"{source}: donors with too few spots for the split (min_spots_per_donor="
            f"{min_spots}): {small}; drop those donors or lower split.min_spots_per_donor")


def make_split(donor_counts: Mapping[str, int], cfg: SplitConfig | None = None, *,
               source: str = "data") -> dict[str, list[str]]:
    """Assign whole donors to train/val/test by fraction+seed, or from ``cfg.file``."""
    cfg = cfg or SplitConfig()
    check_min_spots(donor_counts, cfg.min_spots_per_donor, source=source)
    donors = sorted(str(d) for d in donor_counts)
    if cfg.file:
        return check_split(read_split_file(cfg.file), donors, source=str(cfg.file))
    if len(donors) < 2:
        raise DataError(
            f"{source}: {len(donors)} donor(s); a donor-level split needs at least 2 "
            "(add donors or give a split file)")
    order = [donors[i] for i in np.random.default_rng(cfg.seed).permutation(len(donors))]
    n = len(donors)
    n_test = min(max(1, round(cfg.test_fraction * n)), n - 1)
    n_val = min(round(cfg.val_fraction * n), n - 1 - n_test)
    split = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    return {p: sorted(split[p]) for p in PARTS}


def leave_one_donor_out(donors: Iterable[str]) -> Iterator[tuple[list[str], str]]:
    """Yield ``(train_donors, test_donor)`` once per donor, in sorted order."""
    unique = sorted({str(d) for d in donors})
    if len(unique) < 2:
        raise DataError(f"leave-one-donor-out needs at least 2 donors, got {unique}")
    for held in unique:
        yield [d for d in unique if d != held], held


def donor_folds(donors: Iterable[str], k: int, *, seed: int = 0,
                labels: Mapping[str, str] | None = None) -> list[dict[str, list[str]]]:
    """``k`` donor-level train/val/test splits in which every donor is a test donor once.

    Donors are shuffled (``seed``) and dealt into ``k`` folds, class by class when donor
    ``labels`` are given (e.g. mutation status: each fold then holds both classes where the
    counts allow). Split ``i``: test = fold ``i``, val = fold ``i + 1`` (mod k), train = the
    other ``k - 2`` folds. Needs k >= 3 and at least k donors.
    """
    names = sorted({str(d) for d in donors})
    if k < 3:
        raise DataError(f"eval.donor_folds={k}: donor cross-validation needs k >= 3 (a test, a "
                        "validation and at least one training fold)")
    if len(names) < k:
        raise DataError(f"eval.donor_folds={k}: the data has {len(names)} donors, fewer than "
                        f"the folds; use eval.donor_folds <= {len(names)}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(str((labels or {}).get(name, "")), []).append(name)
    folds: list[list[str]] = [[] for _ in range(k)]
    start = 0
    for label in sorted(groups):
        members = [groups[label][i] for i in rng.permutation(len(groups[label]))]
        for j, name in enumerate(members):  # deal round-robin, continuing across classes
            folds[(start + j) % k].append(name)
        start = (start + len(members)) % k
    out = []
    for i in range(k):
        val = (i + 1) % k
        train = [d for j, f in enumerate(folds) if j not in (i, val) for d in f]
        out.append({"train": sorted(train), "val": sorted(folds[val]), "test": sorted(folds[i])})
    return out


def donor_labels(obs, key: str | None) -> dict[str, str] | None:
    """``{donor: label}`` of a donor-level obs column (None if unset, absent or not constant
    within donors): what ``donor_folds`` stratifies on."""
    if key is None or key not in obs.columns:
        return None
    pairs = obs[["donor", key]].dropna().astype(str).drop_duplicates()
    if pairs["donor"].duplicated().any():
        return None
    return dict(zip(pairs["donor"], pairs[key]))


def fold_split(paired, k: int, fold: int, *, seed: int = 0,
               stratify: str | None = None) -> dict[str, list[str]]:
    """Split ``fold`` of ``donor_folds`` over the donors of ``paired`` (a ``PairedData``)."""
    donors = paired.adata.obs["donor"].astype(str).unique()
    folds = donor_folds(donors, k, seed=seed, labels=donor_labels(paired.adata.obs, stratify))
    return folds[fold]


def with_fold(paired, cfg):
    """``paired`` with its split replaced by ``cfg.data.fold`` of ``cfg.eval.donor_folds``
    (seeded by ``data.split.seed``, stratified by the mutation column when donor-level);
    ``paired`` itself when the config names no fold. The fingerprint stays: it is the
    content's, and every cache keyed on a split also keys on the split itself."""
    import dataclasses

    if cfg.data.fold is None:
        return paired
    split = fold_split(paired, cfg.eval.donor_folds, cfg.data.fold, seed=cfg.data.split.seed,
                       stratify=cfg.data.mutation_key)
    return dataclasses.replace(paired, split=split)
