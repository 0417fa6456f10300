"""Upload bodies: page-aligned receive buffers, reused from one upload to the next.

A fresh 4 MB buffer per upload costs its ~1,000 page faults (the kernel zeroes each page before
the socket copy fills it), and a buffer at an arbitrary address must be copied into an aligned
one before ``O_DIRECT`` can write it (network/durable.py).  A buffer taken from here is a private
anonymous ``mmap`` (page-aligned) whose length is rounded up to :data:`durable.ALIGN`, so after its
first use it neither faults nor needs that copy: ``write_durable`` writes it where it lies.  It
asks for huge pages (``MADV_HUGEPAGE``: two faults per 4 MB instead of a thousand, where the
kernel allows them), and as many buffers are kept as the uploads in flight need: after its
receive an upload holds its buffer until its commit ends, and commits queue for the ledger, so at
100 devices about 40 are held at once and at 200 more than 64 at times (with 16 kept, perf put ~0.7 ms of
server CPU per trip in page faults on fresh buffers; at 200 devices, a fixed 64 made 473-675 fresh
buffers in a 20 s run of benchmarks/network_load.py, this list 198-204, and the server spent 10.09
and 9.95 ms per trip against 9.76 and 9.76, alternating; at 100 devices both were within noise).
So the free list follows the load instead of a fixed count: buffers that sat unused through a whole
``idle_s`` period are released at its end (looked at on each take and give: after the last
upload, what is kept stays until the next one), and ``keep_bytes`` caps what is kept at any time.

The rule that makes reuse safe: a buffer goes back (:meth:`UploadBodies.give`) only once nothing
can write or read it any more, i.e. after its transport's receive returned *and* the commit that
adds it (or the refusal that drops it) finished.  A receive that was cancelled half-way (a timeout,
a hang-up) may still have a data-plane thread writing into its buffer: that buffer is never given
back, just dropped, and freed when the last reference goes.
"""

from __future__ import annotations

import mmap
import time

from flotilla.network.durable import ALIGN


class UploadBodies:
    """A free list of page-aligned buffers, by size.  A buffer given back is kept while at most
    ``keep`` of its size and ``keep_bytes`` in all are (else dropped); buffers none of the takes of
    the last ``idle_s`` seconds needed are released, so memory held idle follows the load down."""

    def __init__(self, keep: int = 256, keep_bytes: int = 512 << 20, idle_s: float = 10.0, clock=time.monotonic):
        self.keep = keep
        self.keep_bytes = keep_bytes
        self.idle_s = idle_s
        self.clock = clock
        self._free: dict[int, list[mmap.mmap]] = {}  # by capacity (the size rounded up to ALIGN)
        self.free_bytes = 0  # bytes kept in the free lists
        self.made = 0  # buffers allocated so far (the rest of the takes were reuses)
        self.released = 0  # buffers dropped after a period unused
        # capacity -> the fewest free buffers seen this period: that many were never needed in it
        self._spare: dict[int, int] = {}
        self._period_start = clock()

    def take(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes at the start of a page-aligned buffer (contents undefined)."""
        self._maybe_release()
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
        self._spare[capacity] = min(self._spare.get(capacity, 0), len(free or ()))
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
        self._maybe_release()

    def _maybe_release(self) -> None:
        """At the end of each ``idle_s`` period, release the buffers no take needed in it."""
        now = self.clock()
        if now - self._period_start < self.idle_s:
            return
        for capacity, spare in self._spare.items():
            free = self._free.get(capacity, [])
            for _ in range(min(spare, len(free))):
                free.pop(0)  # the oldest; unmapped with its last reference (a view may outlive give)
                self.free_bytes -= capacity
                self.released += 1
        self._spare = {capacity: len(free) for capacity, free in self._free.items()}
        self._period_start = now

    @property
    def free(self) -> int:
        return sum(len(v) for v in self._free.values())
