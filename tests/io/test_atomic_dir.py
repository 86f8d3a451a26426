"""hescape.atomic as adopted: whole-directory swaps and the permissions of written files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hescape import atomic


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_dir_replaces_the_directory_on_success(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic.atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # readers see the old one until the swap
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert _hidden(tmp_path) == []


def test_atomic_dir_error_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed")
    assert sorted(os.listdir(target)) == ["old.txt"]
    assert _hidden(tmp_path) == []


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """An atomic write must not make a shared cache or report private (mkstemp's 0600)."""
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.atomic_path(tmp_path / "b.npy") as tmp:
            tmp.write_bytes(b"x")
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        plain_dir = tmp_path / "plain_dir"
        plain_dir.mkdir()
    finally:
        os.umask(old)
    mode = plain.stat().st_mode & 0o777
    assert mode == 0o644
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.npy").stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == plain_dir.stat().st_mode & 0o777
