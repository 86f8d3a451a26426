import random

import numpy as np
import pytest
import torch

from hescape.config import StudyConfig
from hescape.train.checkpoint import (
    CheckpointError,
    get_rng_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt):
    state = {"optimizer": opt.state_dict(), "scheduler": {"name": "warmup_cosine", "step": step},
             "step": step, "rng": get_rng_state(), "best": 0.5, "bad_evals": 1}
    return save_checkpoint(root / f"checkpoint_{step:07d}", model=model, cfg=StudyConfig(),
                           meta={"step": step, "gene_in_dim": 4}, train_state=state)


def test_round_trip_restores_weights_optimiser_and_rng(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 7, model, opt)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "model.pt",
                                                      "optim.pt"]
    expected = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    loaded = load_checkpoint(path)
    assert loaded.step == 7 and loaded.train_state["best"] == 0.5
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model_state[key], value)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(loaded.train_state["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    set_rng_state(loaded.train_state["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert StudyConfig.model_validate(loaded.config) == StudyConfig()


def test_files_load_with_weights_only(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    torch.load(path / "optim.pt", weights_only=True)
    torch.load(path / "model.pt", weights_only=True)


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    model, opt = _model_and_opt()
    _save(tmp_path, 3, model, opt)
    _save(tmp_path, 3, model, opt)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0000003"]


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    model, opt = _model_and_opt()
    _save(tmp_path, 10, model, opt)
    latest = _save(tmp_path, 20, model, opt)
    data = (latest / "optim.pt").read_bytes()
    (latest / "optim.pt").write_bytes(data[: len(data) // 2])  # truncated write
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_0000020",
                                                           "checkpoint_0000010"]
    assert load_checkpoint(tmp_path).step == 10  # the run dir: newest good one
    assert load_checkpoint(latest).step == 10  # a named dir: its previous sibling
    with pytest.raises(CheckpointError, match=r"checkpoint_0000020/optim.pt: unreadable"):
        load_checkpoint(latest, fallback=False)


def test_no_readable_checkpoint_names_every_file(tmp_path):
    model, opt = _model_and_opt()
    only = _save(tmp_path, 5, model, opt)
    (only / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"checkpoint_0000005/model.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "empty")
