"""Bad input is refused through the real CLIs: non-zero exit, a message naming what is wrong
and where, and nothing half-written (no dataset dir, no study dir, no MLflow store).

One table (``CASES``); each row builds its inputs in a fresh directory, runs one command in a
subprocess and checks the exit code, a substring of stderr+stdout, and the output locations.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
HESCAPE = str(Path(PY).parent / "hescape")
RUN = [PY, str(ROOT / "study" / "run.py")]
TINY = str(ROOT / "experiments" / "tiny.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """A valid canonical dataset plus a trained-shape checkpoint, shared read-only by the cases."""
    from hescape.data import tiny_dataset

    root = tmp_path_factory.mktemp("valid")
    tiny_dataset(root / "ds")
    return root


def _ds(valid: Path, d: Path) -> Path:
    out = d / "ds"
    shutil.copytree(valid / "ds", out)
    return out


def _edit_adata(ds: Path, fn) -> Path:
    import anndata as ad

    a = ad.read_h5ad(ds / "expression.h5ad")
    a = fn(a) or a
    a.write_h5ad(ds / "expression.h5ad")
    return ds


def _set_x(a, r, c, v):
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.array(a.X)
    x = x.astype(np.float32)
    x[r, c] = v
    a.X = x


def _dup_obs(a):
    names = list(a.obs_names)
    names[5] = names[4]
    a.obs_names = names


def _h5ad_and_patches(valid: Path, d: Path, fn=None, patches=None) -> list[str]:
    """h5ad + patches.npy for ``hescape data import`` (the canonical files, optionally edited)."""
    ds = _ds(valid, d)
    if fn is not None:
        _edit_adata(ds, fn)
    if patches is not None:
        np.save(ds / "patches.npy", patches)
    return ["--h5ad", str(ds / "expression.h5ad"), "--patches", str(ds / "patches.npy")]


def _png_header_bomb(path: Path, w: int = 60000, h: int = 60000) -> Path:
    """A ~60-byte PNG that claims 3.6 Gpx (a decompression bomb; never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _truncated_jpeg(path: Path) -> Path:
    import io

    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:600])
    return path


def _image_import(valid: Path, d: Path, image: Path) -> list[str]:
    def spatial(a):
        a.obsm["spatial"] = np.tile([[100.0, 100.0]], (a.n_obs, 1))
    ds = _ds(valid, d)
    _edit_adata(ds, spatial)
    return ["--h5ad", str(ds / "expression.h5ad"), "--image", str(image), "--mpp", "1.0",
            "--patch-um", "16", "--patch-px", "16"]


def _other_model_checkpoint(valid: Path, d: Path) -> Path:
    """A checkpoint whose weights come from one model and whose config describes another."""
    from hescape.config import load_config
    from hescape.models import build_model
    from hescape.train.checkpoint import save_checkpoint

    small = load_config(TINY, ["model.embed_dim=8"])
    big = load_config(TINY, ["model.embed_dim=16"])
    model = build_model(small.model, small.loss, gene_in_dim=40, n_donors=4)
    return save_checkpoint(d / "ckpt", model=model, cfg=big,
                           meta={"gene_in_dim": 40, "n_donors": 4, "step": 1})


def _write(d: Path, name: str, text: str) -> str:
    (d / name).write_text(text)
    return str(d / name)


def _study(*sets: str, config: str = TINY, dry: bool = True):
    def build(valid: Path, d: Path) -> list[str]:
        cfg = config(d) if callable(config) else config
        argv = [*RUN, cfg, f"--set=storage_dir={d / 'store'}", *[f"--set={s}" for s in sets]]
        return argv + (["--dry-run"] if dry else [])
    return build


def _data(*args, build=None):
    def run(valid: Path, d: Path) -> list[str]:
        extra = build(valid, d) if build else []
        return [HESCAPE, "data", *args, *extra, "--out", str(d / "out"), "--no-progress"]
    return run


def _validate(edit):
    def run(valid: Path, d: Path) -> list[str]:
        ds = _ds(valid, d)
        edit(ds)
        return [HESCAPE, "data", "validate", str(ds)]
    return run


def _evaluate(valid: Path, d: Path) -> list[str]:
    ckpt = _other_model_checkpoint(valid, d)
    return [HESCAPE, "evaluate", str(ckpt), str(valid / "ds"), "--out", str(d / "out"), "--quiet"]


_ITEMS = [
    # ---- study YAMLs and --set overrides (dry-run: no Ray)
    ("unknown config key", _study("train.lrr=0.1"), "train.lrr: unknown key"),
    ("unknown nested section", _study("model.image.colour=red"), "model.image.colour"),
    ("misspelt image encoder", _study("model.image.name=tiny_cnnn"), "tiny_cnnn"),
    ("misspelt gene encoder", _study("model.gene.name=mlpp"), "mlpp"),
    ("misspelt expression variant", _study("preprocess.expression.method=harmoni"),
     "preprocess.expression.method"),
    ("misspelt loss", _study("loss.name=clipp"), "loss.name"),
    ("bad searcher", _study("sweep.searcher=tpee"), "sweep.searcher"),
    ("negative batch size", _study("train.batch_size=-4"), "train.batch_size"),
    ("empty search space", _study("sweep.searcher=random", "sweep.params={}"),
     "sweep.params is empty"),
    ("choice with no values", _study("sweep.params.loss.name.values=[]"), "loss.name"),
    ("uniform low > high", _study("sweep.params.train.lr={type: uniform, low: 1, high: 0.1}"),
     "low (1.0) > high (0.1)"),
    ("sweep over unknown key", _study("sweep.searcher=random",
                                      "sweep.params={train.lrr: {type: choice, values: [1]}}"),
     "train.lrr"),
    ("contradictory space (condition on a later param)", _study(
        "sweep.searcher=random",
        "sweep.params={train.lr: {type: choice, values: [0.1], when: {train.weight_decay: [0.1]}},"
        " train.weight_decay: {type: choice, values: [0.1, 0.2]}}"), "train.weight_decay"),
    ("dataset path does not exist", _study("data.path=/nonexistent/dataset"),
     "/nonexistent/dataset"),
    ("config file does not exist", _study(config="/nonexistent/study.yaml"), "/nonexistent/study.yaml"),
    ("non-YAML config", _study(config=lambda d: _write(d, "bad.yaml", "name: [x\n  - : :\n")),
     "bad.yaml"),
    ("YAML list at top level", _study(config=lambda d: _write(d, "list.yaml", "- a\n- b\n")),
     "list.yaml"),
    ("missing base include", _study(config=lambda d: _write(d, "nobase.yaml", "base: nope.yaml\n")),
     "nope.yaml"),
    ("override without '='", _study("train.lr"), "expected key=value"),
    ("override value not YAML", _study("train.lr=[1,"), "not valid YAML"),
    ("override into a scalar", _study("train.lr.x=1"), "'lr' is not a section"),
    ("objective on test donors", _study("sweep.objectives=[{metric: test/r5_img2gene}]"),
     "sweep.objectives.0.metric: Value error, 'test/r5_img2gene' selects on the test donors; "
     "use the validation metric 'val/r5_img2gene'"),
    ("best checkpoint chosen on test donors", _study("train.best_metric=test/r5_img2gene"),
     "train.best_metric: Value error, 'test/r5_img2gene' selects on the test donors"),
    ("storage dir is a file", _study(config=lambda d: (_write(d, "store", "x"), TINY)[1], dry=False),
     "store"),
    ("resources the cluster cannot provide",
     _study("train.num_workers=64", "train.in_process=false", dry=False), "64"),
    # ---- data files (hescape data import / validate / simulate)
    ("NaN counts", _data("import", build=lambda v, d: _h5ad_and_patches(
        v, d, lambda a: _set_x(a, 3, 2, np.nan))), "NaN"),
    ("negative counts", _data("import", build=lambda v, d: _h5ad_and_patches(
        v, d, lambda a: _set_x(a, 7, 1, -2.0))), "negative"),
    ("duplicated obs names", _data("import", build=lambda v, d: _h5ad_and_patches(
        v, d, _dup_obs)), "duplicate"),
    ("missing donor column", _data("import", build=lambda v, d: _h5ad_and_patches(
        v, d, lambda a: a.obs.drop(columns=["donor"], inplace=True))), "donor"),
    ("patch count mismatch", _data("import", build=lambda v, d: _h5ad_and_patches(
        v, d, patches=np.zeros((5, 16, 16, 3), np.uint8))), "5 patches"),
    ("patches not uint8", _data("import", build=lambda v, d: _h5ad_and_patches(
        v, d, patches=np.zeros((240, 16, 16, 3), np.float32))), "uint8"),
    ("split file with unknown donors", _data(
        "simulate", "--n-donors", "2", "--spots-per-donor", "20",
        build=lambda v, d: ["--split-file", _write(d, "split.csv",
                                                   "donor,split\nD00,train\nNOPE,test\n")]),
     "NOPE"),
    ("truncated image file", _data("import", build=lambda v, d: _image_import(
        v, d, _truncated_jpeg(d / "cut.jpg"))), "truncated"),
    ("image decompression bomb", _data("import", build=lambda v, d: _image_import(
        v, d, _png_header_bomb(d / "bomb.png"))), "decompression bomb"),
    ("h5ad that is not HDF5", _data("import", build=lambda v, d: [
        "--h5ad", _write(d, "x.h5ad", "not hdf5"), "--patches", str(v / "ds" / "patches.npy"), "--donor", "a", "--slide", "s"]), "x.h5ad"),
    ("validate: missing dataset", lambda v, d: [HESCAPE, "data", "validate", str(d / "none")],
     "not found"),
    ("validate: patch count mismatch on disk", _validate(
        lambda ds: np.save(ds / "patches.npy", np.zeros((3, 16, 16, 3), np.uint8))),
     "3 patches but 240 obs rows"),
    ("validate: manifest not JSON", _validate(
        lambda ds: (ds / "manifest.json").write_text("{oops")), "manifest.json"),
    ("validate: NaN counts on disk", _validate(
        lambda ds: _edit_adata(ds, lambda a: _set_x(a, 0, 0, np.nan))), "NaN"),
    # ---- checkpoints
    ("checkpoint from another model", _evaluate, "ckpt"),
]
CASES = {name: (build, expect) for name, build, expect in _ITEMS}


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused(name, valid, tmp_path):
    build, expect = CASES[name]
    argv = build(valid, tmp_path)
    before = _snapshot(tmp_path)
    proc = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"{name}: exit 0\n{text[-2000:]}"
    assert "Traceback" not in text, f"{name}: stack trace instead of a message\n{text[-3000:]}"
    assert expect in text, f"{name}: message lacks {expect!r}\n{text[-2000:]}"
    # nothing half-written: no new files anywhere under the case dir (out, store, cache, mlflow)
    new = _snapshot(tmp_path) - before
    assert not new, f"{name}: left behind {sorted(new)[:10]}"
    assert len(CASES) >= 25
