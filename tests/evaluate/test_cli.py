"""``hescape evaluate`` end to end on a tiny simulated dataset and an untrained checkpoint."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from hescape.cli import main
from hescape.config import (
    DataConfig,
    EvalConfig,
    SimulateConfig,
    SplitConfig,
    StudyConfig,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hescape.data import load_paired, simulate, write_dataset
    from hescape.models import build_model
    from hescape.train.checkpoint import save_checkpoint
    from hescape.train.inputs import prepare_expression

    tmp = tmp_path_factory.mktemp("cli")
    sim = SimulateConfig(n_donors=6, spots_per_donor=25, n_genes=20, patch_size=16)
    split = SplitConfig(val_fraction=0.0, test_fraction=0.34)
    data = simulate(tmp / "data", sim, split=split, progress=False)
    cfg = StudyConfig(
        storage_dir=str(tmp / "runs"),
        data=DataConfig(path=str(data), simulate=sim, split=split),
        eval=EvalConfig(inbatch_repeats=1, mixing_subsample=100, probe_top_genes=5),
    )
    paired = load_paired(data)
    prepared = prepare_expression(cfg, paired, progress=False)
    model = build_model(cfg.model, cfg.loss, gene_in_dim=prepared.X.shape[1], n_donors=6,
                        feature_names=list(prepared.feature_names))  # fmt: skip
    meta = {"gene_in_dim": int(prepared.X.shape[1]), "n_donors": 6, "step": 0,
            "feature_names": list(prepared.feature_names)}  # fmt: skip
    ckpt = save_checkpoint(tmp / "ckpt", model=model, cfg=cfg, meta=meta)
    image_only = write_dataset(tmp / "image_only", paired.adata[:, []].copy(),
                               np.asarray(paired.patches), split=paired.split,
                               source="test-image-only", progress=False)  # fmt: skip
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "image_only": image_only}


@pytest.fixture(autouse=True)
def _only_evaluate(monkeypatch):
    # other command groups may not exist yet; this file tests the evaluate group only
    monkeypatch.setattr("hescape.cli.GROUPS", ("evaluate",))


def _run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return main(["evaluate", *argv, "--quiet"])


def test_cli_evaluates_checkpoint(setup, capsys):
    out = setup["tmp"] / "eval"
    assert _run([str(setup["ckpt"]), str(setup["data"]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test/r5_img2gene", "test/img/ridge_per_donor_pearson_mean",
                "test/img/mutation_auroc", "test/gene/ilisi",
                "test/baseline_frozen/ridge_per_donor_pearson_mean"):  # fmt: skip
        assert key in metrics, key
    for name in ("embeddings.h5ad", "per_donor.csv", "probe_notes.json"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "r5_img2gene" in printed and "img/mutation_underpowered" in printed
    assert "notes:" in printed and "img/mutation" in printed  # why a figure is missing


def test_cli_image_only_dataset(setup):
    out = setup["tmp"] / "eval_img"
    argv = [str(setup["ckpt"]), str(setup["image_only"]), "--out", str(out), "--set", "plots=false"]
    assert _run(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/img/mutation_n_donors" in metrics and "test/img/kbet_global" in metrics
    assert not any("img2gene" in k for k in metrics)


def test_cli_clear_errors(setup, capsys):
    assert _run(["/no/such/ckpt", str(setup["data"])]) == 2
    assert "neither a checkpoint directory nor an MLflow run id" in capsys.readouterr().err
    assert _run([str(setup["ckpt"]), str(setup["data"]), "--set", "ks=oops"]) == 2
    assert "invalid eval setting" in capsys.readouterr().err
