"""A small tmpfs of its own for the disk-full tests (root, or passwordless sudo)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(where: Path, size: str, why: str = "") -> Iterator[Path]:
    """Mount a fresh tmpfs of ``size`` (e.g. ``1m``) at ``where`` (created), owned by this
    user; lazily unmounted afterwards. Skips the test, with ``why``, where it cannot mount."""
    where.mkdir()
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    opts = f"size={size},uid={os.getuid()},gid={os.getgid()},mode=0755"
    made = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip()}){why}")
    try:
        yield where
    finally:
        subprocess.run([*sudo, "umount", "-l", str(where)], capture_output=True)
