"""Write a staged upload durably with the least CPU: ``O_DIRECT`` where the file system allows it.

A buffered write copies the 4 MB delta into the page cache and the fsync then writes those pages
back (and deleting the file after the step frees them again): on this project's 2-core machine
that was 1.2-4 ms of CPU per 1M-parameter upload (benchmarks/network_load.py, perf: the server's
io thread).  With ``O_DIRECT`` the disk reads the bytes straight from a page-aligned buffer, so
the same durable write costs one copy into that buffer (~0.3 ms) and about 0.3 ms of kernel time;
an upload received into one of network/bodies.py's buffers (page-aligned already) skips the copy.

The file's contents and what is fsync'd are the same either way: the bytes are written rounded
up to the alignment, the file is truncated to the true length, then ``fsync`` (the size change is
metadata, made durable by that fsync).  A crash in between leaves a file no ledger line names yet,
which recovery deletes as before.  Where ``O_DIRECT`` is refused (tmpfs, some overlay file
systems, non-Linux) the folder falls back to the buffered write, for good.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np

ALIGN = 4096  # covers 512- and 4096-byte logical blocks
_MIN_DIRECT = 1 << 20  # below this the buffered write is as cheap
_scratch = threading.local()  # one page-aligned buffer per writing thread, grown as needed
_refused: set[str] = set()  # folders whose file system refused O_DIRECT


def _aligned(n: int) -> mmap.mmap:
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < n:
        buf = _scratch.buf = mmap.mmap(-1, n)  # anonymous mmaps are page-aligned
    return buf


def _room(view: memoryview, padded: int) -> memoryview | None:
    """``view``'s first ``padded`` bytes when it starts an anonymous mmap of at least that length
    (page-aligned: network/bodies.py's upload buffers), so O_DIRECT can write it without a copy."""
    buf = view.obj
    if not isinstance(buf, mmap.mmap) or len(buf) < padded:
        return None
    whole = memoryview(buf)
    if np.frombuffer(view, np.uint8).ctypes.data != np.frombuffer(whole, np.uint8).ctypes.data:
        return None  # a slice further in: not aligned
    return whole[:padded]


def write_durable(path: Path, data, fsync: bool = True) -> None:
    """Write ``data`` (bytes-like) to a new file ``path``; fsync'd when ``fsync``.  The caller
    fsyncs the folder (the name) as before."""
    view = memoryview(data).cast("B")
    n = len(view)
    folder = str(path.parent)
    if fsync and n >= _MIN_DIRECT and hasattr(os, "O_DIRECT") and folder not in _refused:
        padded = -(-n // ALIGN) * ALIGN
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:  # EINVAL: this file system has no O_DIRECT
            _refused.add(folder)
        else:
            try:
                room = _room(view, padded)
                if room is None:  # copied into this thread's aligned buffer first
                    buf = _aligned(padded)
                    buf[:n] = view
                    room = memoryview(buf)
                written = 0
                with room as out:
                    while written < padded:
                        written += os.write(fd, out[written:padded])
                os.ftruncate(fd, n)
                os.fsync(fd)
                return
            except OSError:  # e.g. EINVAL on a write the device will not align: buffered instead
                _refused.add(folder)
            finally:
                os.close(fd)
    with open(path, "wb") as f:
        f.write(view)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
