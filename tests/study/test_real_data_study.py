"""The real Visium sets (tests/data/real, see PROVENANCE.md) imported as a user would, then
checked against study configs: every problem found by --dry-run, all at once, before
anything is written; unlabelled data runs; a small study runs from import to report (slow).

No multi-donor real paired data exists offline: the heart's one Space Ranger output is
imported four times as four donors (a sample sheet), which makes a donor split possible;
the numbers it gives mean nothing, the path it takes is the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "data" / "real"
HESCAPE = [str(Path(sys.executable).parent / "hescape")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "default"}


def _cli(args: list[str], cwd: Path, timeout: int = 120) -> tuple[int, str]:
    proc = subprocess.run([*HESCAPE, *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    heart = REAL / "visium_human_heart_100spots"
    (root / "sheet.csv").write_text("path,donor,slide\n" + "".join(
        f"{heart},d{i},s{i}\n" for i in range(1, 5)))
    rc, out = _cli(["data", "import-visium", "--sample-sheet", "sheet.csv", "--image-res",
                    "lowres", "--patch-px", "32", "--out", "heart4", "--no-progress"], root)
    assert rc == 0, out
    assert "upsampled to 32 px" in out  # the low-resolution image is said
    brain = REAL / "visium_mouse_brain_49spots"
    (root / "split.yaml").write_text("train: [mouse1]\n")
    rc, out = _cli(["data", "import", "--h5ad", str(brain / "test_data.h5ad"), "--image",
                    str(brain / "test_img.jpg"), "--donor", "mouse1", "--slide", "brain_A",
                    "--patch-px", "32", "--allow-non-integer", "--split-file", "split.yaml",
                    "--out", "brain", "--no-progress"], root)
    assert rc == 0, out
    return {"root": root, "heart4": root / "heart4", "brain": root / "brain"}


def _study(root: Path, name: str, data: Path, extra: str = "") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(f"""base: {ROOT / 'experiments' / 'base.yaml'}
name: {name}
storage_dir: {root / 'runs'}
data: {{path: {data}{extra}}}
model:
  image: {{name: tiny_cnn, pretrained: false, mode: frozen, image_size: 32}}
  gene: {{name: mlp, hidden_dim: 32, n_layers: 1}}
  embed_dim: 16
train: {{max_steps: 4, eval_every: 2, warmup_steps: 1}}
eval: {{probe_pca: 8, mixing_subsample: 200, inbatch_repeats: 2, inbatch_size: 16, plots: false,
       baselines: false}}
sweep:
  searcher: grid
  scheduler: none
  params:
    preprocess.expression.method: {{type: choice, values: [none, harmony]}}
""")
    return path


def test_dry_run_lists_every_problem_of_the_brain_set_at_once(imported):
    root = imported["root"]
    cfg = _study(root, "brain", imported["brain"])
    rc, out = _cli(["study", "plan", str(cfg)], root)
    assert rc == 2, out
    for problem in ("data.label_key='state' is not an obs column",
                    "no validation donors", "no test donors",
                    "49 training spots over 1 worker(s) give 49 per worker < train.batch_size=64",
                    "method=harmony corrects for batch (donor) but the training donors hold 1"):
        assert problem in out, (problem, out)
    assert "Traceback" not in out
    assert not (root / "runs" / "brain").exists()


def test_heart_set_problems_and_the_fixes(imported):
    from hescape.config import load_config
    from hescape.data import load_paired
    from hescape.study.preconditions import data_problems

    root = imported["root"]
    paired = load_paired(imported["heart4"])
    cfg = load_config(_study(root, "heart", imported["heart4"]),
                      ["data.split.file=split.csv", "train.batch_size=256"])
    problems = data_problems(cfg, paired)
    assert any("data.label_key='state'" in p for p in problems)
    assert any("data.split.file=split.csv is set but data.path" in p for p in problems)
    assert any("200 training spots" in p and "< train.batch_size=256" in p for p in problems)
    fixed = load_config(_study(root, "heart", imported["heart4"], ", label_key: null, "
                               "mutation_key: null"))
    assert data_problems(fixed, paired) == []  # unlabelled data is allowed


def test_mixing_measured_on_a_part_smaller_than_the_pca(imported):
    """preprocess.measure ran PCA(50) on the held-out rows: 22 spots failed (issue 24.3)."""
    from hescape.config import ExpressionPreprocess
    from hescape.data import load_paired
    from hescape.preprocess import measure_variant, prepare

    paired = load_paired(imported["heart4"])
    prepared = prepare(paired, ExpressionPreprocess(), batch_key="donor",
                       cache_dir=imported["root"] / "cache", progress=False)
    assert prepared.X.shape[1] > 50  # measured on PCs
    rows = np.concatenate([np.flatnonzero(paired.adata.obs["donor"] == d)[:11]
                           for d in ("d1", "d2")])  # 22 spots, 2 batches
    metrics = measure_variant(prepared, paired.adata, batch_key="donor", rows=rows)
    assert metrics["pre/dims"] == 21.0 and np.isfinite(metrics["pre/ilisi"])


@pytest.mark.slow
def test_small_study_on_the_heart_set_from_import_to_report(imported):
    root = imported["root"]
    cfg = _study(root, "heart_e2e", imported["heart4"],
                 ", label_key: null, mutation_key: null")
    rc, out = _cli(["study", "run", str(cfg)], root, timeout=900)
    assert rc == 0, out[-4000:]
    lines = out.splitlines()
    assert any(ln.startswith("[search 1/2 ") for ln in lines), out
    assert any(ln.startswith("[search 2/2 ") for ln in lines), out
    assert not any("/2 " in ln and ln.startswith("[search 0/") for ln in lines)
    assert "[study] shared preprocessing" in out and "Traceback" not in out
    study = root / "runs" / "heart_e2e"
    assert (study / "report" / "report.md").is_file()
    notes = [json.loads(p.read_text()) for p in study.glob("trials/*/eval/probe_notes.json")]
    assert notes and all("skipped: no label column" in n.get("label", "") for n in notes), notes
