"""Row-block I/O on ``.npy`` stores with bounded process memory.

Reading a memmapped store page by page leaves every page it touched mapped into the
process: its RSS grows to the whole store (GiBs at 200k spots) even though each page is
used once. Writing through a memmap does the same with dirty pages. For one pass over a
store (encoding features, rendering patches) ``read_rows`` and ``NpyRowWriter`` go through
the file instead: the process holds one block; the pages sit in the kernel's page cache
(shared, evictable), not in the process. Random access (training loaders) keeps the memmap.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np


def _file_backed(arr: Any) -> bool:
    """A whole-file, C-contiguous ``np.memmap`` (offset/filename describe it exactly)."""
    return (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap)
            and arr.filename is not None and arr.flags.c_contiguous)


def _read_exact(fh, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise OSError(f"{fh.name}: file ended {len(view) - got} bytes early")
        got += n


def read_rows(arr: Any, start: int, stop: int) -> np.ndarray:
    """``arr[start:stop]`` as an in-memory array; a memmapped store is read through its file."""
    stop = min(stop, len(arr))
    if not _file_backed(arr):
        return np.asarray(arr[start:stop])
    out = np.empty((max(0, stop - start),) + arr.shape[1:], dtype=arr.dtype)
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
    with open(arr.filename, "rb", buffering=0) as fh:
        fh.seek(int(arr.offset) + start * row)
        _read_exact(fh, memoryview(out).cast("B"))
    return out


class NpyRowWriter:
    """A new ``.npy`` file of ``shape``/``dtype`` filled by row blocks, written through the
    file (``writer[a:b] = block``); rows never written read back as zeros."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any) -> None:
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.offset = int(mm.offset)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del mm  # header written, file sized (sparse); no page of it is mapped any more
        self._fh = open(path, "r+b")

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, rows: slice, value: np.ndarray) -> None:
        start, stop, step = rows.indices(self.shape[0])
        block = np.ascontiguousarray(value, dtype=self.dtype)
        if step != 1 or block.shape != (stop - start,) + self.shape[1:]:
            raise ValueError(f"{self.path}: block of shape {block.shape} does not fill rows "
                             f"{start}:{stop} of {self.shape}")
        self._fh.seek(self.offset + start * self.row_bytes)
        self._fh.write(block.data)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
