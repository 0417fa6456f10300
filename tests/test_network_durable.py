"""Staged uploads are written with O_DIRECT where the file system allows it (flotilla/network/durable.py):
the file holds exactly the bytes, whatever their length, and a file system that refuses O_DIRECT
gets the buffered write instead."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flotilla.network import durable


@pytest.mark.parametrize("n", [4_000_000, 4_000_036, 1 << 20, 100])
def test_the_file_holds_exactly_the_bytes(tmp_path, n):
    data = np.random.default_rng(n).bytes(n)
    path = tmp_path / f"{n}.bin"
    durable.write_durable(path, memoryview(data))
    assert path.read_bytes() == data
    durable.write_durable(path, data)  # over an existing file: replaced, not appended to
    assert path.stat().st_size == n


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux only")
def test_a_file_system_without_o_direct_gets_the_buffered_write(tmp_path, monkeypatch):
    real_open = os.open
    tried = []

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            tried.append(path)
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    data = np.random.default_rng(0).bytes(3_000_001)
    for i in range(2):
        durable.write_durable(tmp_path / f"{i}.bin", data)
        assert (tmp_path / f"{i}.bin").read_bytes() == data
    assert len(tried) == 1, "the folder is remembered: O_DIRECT is not tried again"
    assert str(tmp_path) in durable._refused
    durable._refused.discard(str(tmp_path))


def test_an_upload_buffer_is_written_where_it_lies_and_reused(tmp_path):
    import threading

    from flotilla.network.bodies import UploadBodies

    bodies = UploadBodies(keep=1)
    n = 4_000_036  # not a multiple of the alignment: the buffer has room up to it
    view = bodies.take(n)
    data = np.random.default_rng(1).bytes(n)
    view[:] = data
    assert np.frombuffer(view, np.uint8).ctypes.data % durable.ALIGN == 0
    assert durable._room(view, -(-n // durable.ALIGN) * durable.ALIGN) is not None
    assert durable._room(view[4096:], 4096) is None  # a slice further in is not the buffer's start
    assert durable._room(memoryview(bytearray(n)), n) is None
    used_scratch = []

    def write():  # in a fresh thread: no scratch buffer of its own yet
        durable.write_durable(tmp_path / "a.bin", view)
        used_scratch.append(getattr(durable._scratch, "buf", None) is not None)

    t = threading.Thread(target=write)
    t.start()
    t.join()
    assert (tmp_path / "a.bin").read_bytes() == data  # exactly n bytes, the padding cut off
    if str(tmp_path) not in durable._refused:  # O_DIRECT allowed here: no copy was made first
        assert used_scratch == [False]
    bodies.give(view)
    again = bodies.take(n)
    assert again.obj is view.obj and bodies.made == 1  # reused, not made again
    other = bodies.take(n)  # both in use: a second one is made
    assert other.obj is not again.obj and bodies.made == 2
    bodies.give(again)
    bodies.give(other)  # over keep=1: dropped, not kept
    assert bodies.free == 1
    bodies.give(memoryview(bytearray(8)))  # not one of ours: ignored
    assert bodies.free == 1
    big = UploadBodies(keep=16, keep_bytes=10 << 20)  # a byte budget: a large model keeps few
    views = [big.take(4_000_000) for _ in range(4)]
    for v in views:
        big.give(v)
    assert big.free == 2 and big.free_bytes <= 10 << 20


def test_upload_buffers_unused_for_a_whole_period_are_released():
    """The free list follows the load: at the end of each idle_s period (looked at on each take and
    give), the buffers no take of that period needed are released; what the takes needed stays."""
    from flotilla.network.bodies import UploadBodies

    now = [0.0]
    bodies = UploadBodies(idle_s=10.0, clock=lambda: now[0])
    burst = [bodies.take(1 << 20) for _ in range(8)]  # a burst: 8 uploads in flight at once
    for v in burst:
        bodies.give(v)
    assert (bodies.free, bodies.made) == (8, 8)
    for t in range(10):  # then a lighter load for a whole period: 3 in flight at a time
        now[0] = 10.0 + t
        views = [bodies.take(1 << 20) for _ in range(3)]
        for v in views:
            bodies.give(v)
    assert bodies.made == 8 and bodies.released == 0  # reused throughout
    now[0] = 20.0  # that period ends: the 5 it never needed go, the 3 it did stay
    bodies.give(bodies.take(1 << 20))
    assert (bodies.free, bodies.released, bodies.made) == (3, 5, 8)
    assert bodies.free_bytes == 3 * (1 << 20)
    now[0] = 30.0  # one upload at a time in [20, 30): two more go
    bodies.give(bodies.take(1 << 20))
    assert (bodies.free, bodies.released, bodies.made) == (1, 7, 8)
    now[0] = 40.0
    bodies.give(bodies.take(1 << 20))  # the one still needed is reused, not made again
    assert (bodies.free, bodies.made) == (1, 8)
