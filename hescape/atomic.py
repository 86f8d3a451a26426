"""Atomic file writes: the one home for "write a temporary file, fsync, rename, clean up".

Every file the project leaves on disk for another process (caches, checkpoints, reports,
study state) is written through here, so a crash or a full disk never leaves a half-written
file under the final name: readers see the old content or the new, never a mix.

- ``write_bytes`` / ``write_text`` / ``write_json``: small files from memory.
- ``atomic_path(path)``: a context manager yielding a temporary path in the same directory,
  for libraries that write to a filename themselves (``np.save``, ``savefig``,
  ``AnnData.write_h5ad``, ``DataFrame.to_csv``); on success it is fsynced and renamed onto
  ``path``, on error removed.
- ``replace_dir(tmp_dir, target)``: swap a fully written directory into place (its files
  fsynced first); ``atomic_dir(target)``: a context manager yielding a fresh temporary
  directory beside ``target`` that replaces it on success and is removed on error.

The temporary name starts with ``.`` and ends with ``.tmp`` (plus the original suffix, so
libraries that look at suffixes still work), in the target's directory (``os.replace`` is
atomic only within one filesystem). A write that finds the disk full raises
``OSError(errno.ENOSPC)`` naming the final path (``hescape.diskfull`` says it in one line).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_dir", "atomic_path", "replace_dir", "write_bytes", "write_json", "write_text",
           "write_with"]


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _tmp_name(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` (like ``mkstemp``, but with the permissions a plain
    ``open`` gives under the umask: an atomic write must not make a shared file private)."""
    for _ in range(100):
        tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary name beside it")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it to ``path``."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_str = _tmp_name(path)
    os.close(fd)
    tmp = Path(tmp_str)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        full = _full_disk(exc, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
    _fsync_dir(path.parent)


FULL_BELOW_BYTES = 1 << 20  # an OSError without errno on a filesystem this full: ENOSPC


def _full_disk(exc: BaseException, directory: Path) -> bool:
    """Whether the failed write found the disk full: an ENOSPC / EDQUOT anywhere in the
    exception's causes (torch wraps it in a RuntimeError), or an ``OSError`` without an
    errno (numpy's short write: "N requested and M written") while ``directory`` has under
    ``FULL_BELOW_BYTES`` free (checked before the temporary file is removed)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    short_write = False
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            if cause.errno in (errno.ENOSPC, errno.EDQUOT):
                return True
            short_write = short_write or cause.errno is None
        cause = cause.__cause__ or cause.__context__
    if not short_write:
        return False
    try:
        return shutil.disk_usage(directory).free < FULL_BELOW_BYTES
    except OSError:
        return False


def write_with(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Atomically write ``path`` by calling ``write(binary file handle)``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return write_with(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Atomically replace ``path`` with ``text``."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1,
               default: Callable[[Any], Any] | None = str) -> Path:
    """Atomically replace ``path`` with ``obj`` as JSON (serialised before anything is written)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default))


def _fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (contents durable before a rename)."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                _fsync_file(path)
        _fsync_dir(Path(root))


def replace_dir(tmp_dir: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move the finished directory ``tmp_dir`` onto ``target`` (same filesystem).

    The files in ``tmp_dir`` are fsynced first. An existing ``target`` is renamed aside and
    removed only after the new one is in place, so a crash in between leaves either the old
    or the new directory under ``target`` (and at worst a ``.<name>.old`` directory beside it).
    """
    tmp_dir, target = Path(tmp_dir), Path(target)
    _fsync_tree(tmp_dir)
    trash = None
    if target.exists():
        trash = target.with_name(f".{target.name}.old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(target, trash)
    os.replace(tmp_dir, target)
    _fsync_dir(target.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return target


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty directory beside ``target``; fill it, and on success it replaces
    ``target`` (``replace_dir``); on error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # mode from the umask, as the final directory would have
    try:
        yield tmp
        replace_dir(tmp, target)
    except Exception as exc:
        if _full_disk(exc, target.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
