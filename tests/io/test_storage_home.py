"""``storage_dir: ~/x`` puts every root under ``$HOME/x`` (issue 13: the feature cache used
to skip ``expanduser`` and landed in ``./~/x``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(monkeypatch, tmp_path: Path) -> Path:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for var in ("MLFLOW_TRACKING_URI", "HESCAPE_ARTIFACT_LOCATION"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_tilde_storage_dir_puts_every_root_under_home(home: Path) -> None:
    from hescape.config import StudyConfig
    from hescape.paths import train_dir
    from hescape.study.driver import study_dir_of
    from hescape.study.shared import storage_root
    from hescape.tracking import resolve_artifact_location, resolve_tracking_uri
    from hescape.train.inputs import prepare_inputs

    cfg = StudyConfig.model_validate({
        "name": "s", "storage_dir": "~/x",
        "data": {"path": None, "simulate": {"n_donors": 4, "spots_per_donor": 20, "n_genes": 20,
                                            "n_states": 2, "patch_size": 16},
                 "split": {"val_fraction": 0.25, "test_fraction": 0.25}},
        "model": {"image": {"mode": "frozen"}},
    })
    root = home / "x"
    made = prepare_inputs(cfg, progress=False)  # simulated data, preprocessing, features
    assert Path(made["data_path"]).parent == root / "cache" / "data"
    assert Path(made["prepared_path"]).parent == root / "cache" / "preprocess"
    assert Path(made["features_path"]).parent == root / "cache" / "features"
    assert Path(made["features_path"]).is_file()
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri, cfg.storage_dir)
    assert uri == f"sqlite:///{root / 'mlflow.db'}"
    assert resolve_artifact_location(None, cfg.storage_dir, uri, "s") == \
        (root / "mlartifacts" / "s").as_uri()
    assert storage_root(cfg) == root and study_dir_of(cfg) == root / "s"
    assert train_dir(cfg.storage_dir, "t") == root / "train" / "t"
    assert list(Path.cwd().iterdir()) == []  # nothing under ./~
