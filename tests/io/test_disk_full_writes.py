"""Atomic writes on a full filesystem (a 1 MiB tmpfs mounted by the test: root or
``sudo -n``, else skipped): each raises ``OSError(ENOSPC)`` naming the final path, leaves
no temporary file and the previous content in place; ``hescape.diskfull`` recognises the
error and says it in one line."""

from __future__ import annotations

import errno
import sqlite3

import numpy as np
import pytest
import torch
from tmpfs import mounted_tmpfs

from hescape import atomic
from hescape.diskfull import disk_full_message, full_path, is_disk_full


@pytest.fixture
def tiny_fs(tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "1m") as where:
        yield where


def _full(exc: pytest.ExceptionInfo, path) -> None:
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert is_disk_full(exc.value) and full_path(exc.value) == str(path)


def test_atomic_writes_on_a_full_disk_name_the_path_and_leave_the_old_file(tiny_fs):
    from hescape.train.checkpoint import _torch_save

    target = tiny_fs / "state.json"
    atomic.write_json(target, {"ok": 1})
    big = 2 * 1024 * 1024
    with pytest.raises(OSError) as exc:  # plain bytes
        atomic.write_bytes(target, b"x" * big)
    _full(exc, target)
    assert target.read_text().startswith("{") and '"ok": 1' in target.read_text()
    with pytest.raises(OSError) as exc:  # numpy: a short write without errno
        with atomic.atomic_path(tiny_fs / "a.npy") as tmp:
            np.save(tmp, np.zeros(big // 8))
    _full(exc, tiny_fs / "a.npy")
    with pytest.raises(OSError) as exc:  # torch's writer wraps ENOSPC in a RuntimeError
        with atomic.atomic_dir(tiny_fs / "checkpoint_0000001") as tmp:
            _torch_save({"w": torch.zeros(big // 4)}, tmp / "model.pt")
    _full(exc, tiny_fs / "checkpoint_0000001")
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["state.json"]  # no temporary left
    line = disk_full_message(tiny_fs, full_path(exc.value), 512 * 1024**2)
    assert "\n" not in line and str(tiny_fs / "checkpoint_0000001") in line
    assert "MiB free of 1 MiB" in line and "at least 512 MiB" in line and "--resume" in line


def test_sqlite_full_is_a_full_disk():
    err = sqlite3.OperationalError("database or disk is full")
    wrapped = RuntimeError("MLflow call failed")
    wrapped.__cause__ = err
    assert is_disk_full(wrapped)
    assert full_path(wrapped, "sqlite:////runs/mlflow.db") == "/runs/mlflow.db (the MLflow store)"
    assert not is_disk_full(RuntimeError("database is locked"))
