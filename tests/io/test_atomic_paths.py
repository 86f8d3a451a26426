"""hescape.atomic (write temp, fsync, rename, clean up) and hescape.paths (one storage root)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hescape import atomic, paths


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_write_text_json_bytes_replace_and_leave_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    atomic.write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []


def test_failed_write_keeps_old_content_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(target, boom)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    with pytest.raises(TypeError):
        atomic.write_json(target, {"x": object()}, default=None)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_atomic_path_keeps_suffix_for_libraries(tmp_path: Path) -> None:
    import numpy as np

    target = tmp_path / "x.npy"
    with atomic.atomic_path(target) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path and tmp.name.startswith(".")
        np.save(tmp, np.arange(3))  # np.save would append .npy to a name without it
    assert np.load(target).tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_atomic_path_error_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "x.csv"
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not target.exists() and _leftovers(tmp_path) == []


def test_replace_dir_swaps_whole_directories(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new = tmp_path / ".ckpt.tmp"
    new.mkdir()
    (new / "new.txt").write_text("new")
    atomic.replace_dir(new, target)
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert not new.exists() and _leftovers(tmp_path) == []


def test_storage_paths_expand_home_everywhere(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    root = paths.storage_root("~/runs")
    assert root == tmp_path / "runs"
    assert paths.cache_dir("~/runs", "features") == tmp_path / "runs" / "cache" / "features"
    assert paths.cache_dir("~/runs") == tmp_path / "runs" / "cache"
    assert paths.study_dir("~/runs", "s") == tmp_path / "runs" / "s"
    assert paths.train_dir("runs", "t") == tmp_path / "runs" / "train" / "t"
    assert "~" not in str(paths.cache_dir("~/runs", "data"))
