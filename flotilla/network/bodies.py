"""Upload bodies: page-aligned receive buffers, reused from one upload to the next.

A fresh 4 MB buffer per upload costs its ~1,000 page faults (the kernel zeroes each page before
the socket copy fills it), and a buffer at an arbitrary address must be copied into an aligned
one before ``O_DIRECT`` can write it (network/durable.py).  A buffer taken from here is a private
anonymous ``mmap`` (page-aligned) whose length is rounded up to :data:`durable.ALIGN`, so after its
first use it neither faults nor needs that copy: ``write_durable`` writes it where it lies.  It
asks for huge pages (``MADV_HUGEPAGE``: two faults per 4 MB instead of a thousand, where the
kernel allows them), and enough buffers are kept for the uploads in flight at once (at 100 devices
about 40 are between their receive and their commit; with 16 kept, perf put ~0.7 ms of server CPU
per trip in page faults on fresh buffers; with 64, a 20 s run makes 50-85 buffers in all).

The rule that makes reuse safe: a buffer goes back (:meth:`UploadBodies.give`) only once nothing
can write or read it any more, i.e. after its transport's receive returned *and* the commit that
adds it (or the refusal that drops it) finished.  A receive that was cancelled half-way (a timeout,
a hang-up) may still have a data-plane thread writing into its buffer: that buffer is never given
back, just dropped, and freed when the last reference goes.
"""

from __future__ import annotations

import mmap

from flotilla.network.durable import ALIGN


class UploadBodies:
    """A free list of page-aligned buffers; at most ``keep`` of a size, and at most ``keep_bytes``
    in all, are kept between uploads (more are made when more uploads are in flight, and dropped
    when they come back to a full list): a large model keeps few, so idle memory stays bounded."""

    def __init__(self, keep: int = 64, keep_bytes: int = 256 << 20):
        self.keep = keep
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[mmap.mmap]] = {}  # by capacity (the size rounded up to ALIGN)
        self.free_bytes = 0  # bytes kept in the free lists
        self.made = 0  # buffers allocated so far (the rest of the takes were reuses)

    def take(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes at the start of a page-aligned buffer (contents undefined)."""
        capacity = max(ALIGN, -(-size // ALIGN) * ALIGN)
        free = self._free.get(capacity)
        if free:
            buf = free.pop()
            self.free_bytes -= capacity
        else:
            if hasattr(mmap, "MAP_PRIVATE"):  # Unix: private, not shmem-backed
                buf = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE)
            else:  # Windows' mmap takes no flags
                buf = mmap.mmap(-1, capacity)
            if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
                buf.madvise(mmap.MADV_HUGEPAGE)
            self.made += 1
        return memoryview(buf)[:size]

    def give(self, view: memoryview) -> None:
        """Take back a view :meth:`take` returned (only when nothing uses its bytes any more)."""
        buf = view.obj
        if not isinstance(buf, mmap.mmap):
            return
        free = self._free.setdefault(len(buf), [])
        if len(free) < self.keep and self.free_bytes + len(buf) <= self.keep_bytes:
            free.append(buf)
            self.free_bytes += len(buf)

    @property
    def free(self) -> int:
        return sum(len(v) for v in self._free.values())
