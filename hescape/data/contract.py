"""The canonical on-disk dataset: write it atomically, load it validated.

Layout of ``<dir>``: ``expression.h5ad`` (counts, obs donor/slide/labels, obsm spatial),
``patches.npy`` (uint8 N x H x W x 3, memmapped, obs order), ``manifest.json`` (written
last). A write goes to a hidden temp dir beside ``<dir>`` and is renamed into place, so an
interrupted write leaves nothing that loads.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
from anndata import AnnData

from hescape.atomic import replace_dir
from hescape.config import SplitConfig
from hescape.data.errors import DataError
from hescape.data.fingerprint import fingerprint as content_fingerprint
from hescape.data.splits import PARTS, check_split, make_split
from hescape.data.validate import validate_adata, validate_patches

FORMAT_VERSION = 1
EXPRESSION, PATCHES, MANIFEST = "expression.h5ad", "patches.npy", "manifest.json"
RESERVED_OBS = {"donor", "slide", "barcode"}


def label_columns(adata: AnnData) -> list[str]:
    """Obs columns other than donor/slide/barcode (state, mutation, tissue, ...)."""
    return [str(c) for c in adata.obs.columns if c not in RESERVED_OBS]


def _donor_counts(adata: AnnData) -> dict[str, int]:
    return {str(k): int(v) for k, v in adata.obs["donor"].astype(str).value_counts().items()}


def resolve_split(adata: AnnData, split: Mapping[str, list[str]] | SplitConfig | None, *,
                  source: str) -> dict[str, list[str]]:
    """A donor split dict from a dict (checked) or a SplitConfig (made)."""
    if split is None or isinstance(split, SplitConfig):
        return make_split(_donor_counts(adata), split, source=source)
    return check_split(split, _donor_counts(adata), source=f"{source}: split")


class DatasetWriter:
    """Stage a dataset in a temp dir; ``commit`` renames it into place.

    Importers use it to stream patches slide by slide into ``patches`` (a memmap).
    """

    def __init__(self, out: str | Path, *, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise DataError(f"{self.out}: already exists; pass overwrite=True (--overwrite) "
                            "or choose another output directory")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.overwrite = overwrite
        self.patches: np.ndarray | None = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not committed: leave nothing behind
            self.patches = None
            shutil.rmtree(self.tmp, ignore_errors=True)

    def allocate(self, n: int, size: int) -> np.ndarray:
        """A writable N x size x size x 3 uint8 memmap inside the staging dir."""
        self.patches = np.lib.format.open_memmap(
            self.tmp / PATCHES, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        return self.patches

    def commit(self, adata: AnnData, split: dict[str, list[str]], *, source: str,
               mpp: float | None, integer_counts: bool = True,
               extra: Mapping | None = None) -> Path:
        """Validate, fingerprint, write h5ad + manifest and rename into place."""
        if self.patches is None:
            raise DataError(f"{self.out}: no patches were written")
        self.patches.flush()
        patches = np.load(self.tmp / PATCHES, mmap_mode="r")
        has_expr = adata.n_vars > 0
        validate_adata(adata, file=str(self.out / EXPRESSION), require_expression=has_expr,
                       integer=integer_counts)
        validate_patches(patches, adata.n_obs, file=str(self.out / PATCHES))
        split = check_split(split, _donor_counts(adata), source=f"{self.out}: split")
        fp, mode = content_fingerprint(adata, patches)
        _prepare_obs(adata).write_h5ad(self.tmp / EXPRESSION)
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fp, "fingerprint_mode": mode,
            "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars),
            "patch_size": int(patches.shape[1]), "mpp": None if mpp is None else float(mpp),
            "split": split, "label_columns": label_columns(adata), "source": source,
            "has_expression": bool(has_expr), "integer_counts": bool(integer_counts),
            "donors": sorted(_donor_counts(adata)), **dict(extra or {}),
        }
        del patches
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(self.tmp, self.out)  # hescape.atomic: fsync, old dir aside, rename
        return self.out


def _prepare_obs(adata: AnnData) -> AnnData:
    """Categorical string donor/slide columns (compact, stable on disk)."""
    adata = adata.copy() if adata.is_view else adata
    for col in ("donor", "slide"):
        adata.obs[col] = adata.obs[col].astype(str).astype("category")
    return adata


def write_dataset(out: str | Path, adata: AnnData, patches: np.ndarray, *,
                  split: Mapping[str, list[str]] | SplitConfig | None, source: str,
                  mpp: float | None = None, progress: bool = True, overwrite: bool = False,
                  integer_counts: bool = True) -> Path:
    """Write ``adata`` + ``patches`` as a canonical dataset at ``out``, atomically."""
    from tqdm.auto import tqdm

    file = str(Path(out))
    validate_adata(adata, file=file, require_expression=adata.n_vars > 0,
                   integer=integer_counts)
    validate_patches(patches, adata.n_obs, file=file)
    split_dict = resolve_split(adata, split, source=file)
    with DatasetWriter(out, overwrite=overwrite) as writer:
        store = writer.allocate(patches.shape[0], patches.shape[1])
        step = 1024
        for start in tqdm(range(0, len(store), step), desc="patches", disable=not progress):
            store[start:start + step] = patches[start:start + step]
        return writer.commit(adata, split_dict, source=source, mpp=mpp,
                             integer_counts=integer_counts)


@dataclass
class PairedData:
    """Both views of a canonical dataset, aligned by row."""

    path: Path
    adata: AnnData
    patches: np.ndarray
    manifest: dict
    fingerprint: str
    split: dict[str, list[str]] = field(default_factory=dict)

    def part_of(self) -> np.ndarray:
        """Per-obs part name ("train"/"val"/"test")."""
        lookup = {d: p for p, donors in self.split.items() for d in donors}
        donors = self.adata.obs["donor"].astype(str).to_numpy()
        return np.array([lookup[d] for d in donors], dtype=object)

    def indices(self, part: str) -> np.ndarray:
        """Integer obs indices of ``part``."""
        if part not in PARTS:
            raise DataError(f"unknown part {part!r}; use one of {PARTS}")
        return np.flatnonzero(self.part_of() == part)

    def describe(self) -> str:
        """Human-readable summary (donors, spots per donor, genes, labels, split)."""
        from hescape.data.describe import describe

        return describe(self)


def read_manifest(path: Path) -> dict:
    """Read and check ``manifest.json`` (missing = not a dataset, or an interrupted write)."""
    if not path.exists():
        raise DataError(f"{path}: dataset directory not found; create one with "
                        "`hescape data simulate --out {path}` or an import command")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{mpath}: missing; {path} is not a canonical dataset (or an interrupted "
                        "write); re-run the import/simulate that creates it")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{mpath}: not valid JSON ({exc}); re-create the dataset") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {manifest.get('format_version')!r}, this code "
                        f"reads {FORMAT_VERSION}; re-import the dataset")
    return manifest


def load_paired(path: str | Path, *, require_expression: bool = True,
                verify: bool = False) -> PairedData:
    """Load and validate a canonical dataset; ``verify`` recomputes the fingerprint."""
    path = Path(path)
    manifest = read_manifest(path)
    epath, ppath = path / EXPRESSION, path / PATCHES
    for f in (epath, ppath):
        if not f.is_file():
            raise DataError(f"{f}: missing; re-create the dataset")
    if require_expression and not manifest.get("has_expression", True):
        raise DataError(f"{path}: image-only dataset (no expression); load it with "
                        "require_expression=False")
    try:
        adata = ad.read_h5ad(epath)
        patches = np.load(ppath, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the files are corrupt: re-create") from None
    validate_adata(adata, file=str(epath), require_expression=require_expression,
                   integer=manifest.get("integer_counts", True))
    validate_patches(patches, adata.n_obs, file=str(ppath))
    split = check_split(manifest["split"], _donor_counts(adata),
                        source=f"{path / MANIFEST}: split")
    if verify:
        fp, _ = content_fingerprint(adata, patches)
        if fp != manifest["fingerprint"]:
            raise DataError(f"{path}: content fingerprint {fp} != manifest "
                            f"{manifest['fingerprint']}; files changed after writing: re-create")
    return PairedData(path=path, adata=adata, patches=patches, manifest=manifest,
                      fingerprint=manifest["fingerprint"], split=split)
