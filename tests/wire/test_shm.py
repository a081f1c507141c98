"""shm.populate: maps a whole segment at once without changing its bytes."""

import os
import threading
import time

import pytest

from snapshotd.wire import shm


@pytest.fixture
def name():
    n = f"snapshotd-test-populate.{os.getpid()}"
    yield n
    shm.unlink(n)


def test_populate_keeps_bytes_and_works_read_only(name):
    seg = shm.create(name, 8 << 20, allocate=True)
    seg.buf[:5] = b"hello"
    seg.buf[-3:] = b"end"
    assert shm.populate(seg) in (True, False)  # False only on kernels without it
    assert bytes(seg.buf[:5]) == b"hello" and bytes(seg.buf[-3:]) == b"end"
    seg.close()
    ro = shm.open_segment(name, prefault=True)
    assert bytes(ro.buf[:5]) == b"hello" and bytes(ro.buf[-3:]) == b"end"
    with pytest.raises(ValueError, match="read-only"):
        shm.populate(ro, write=True)
    ro.close()  # no buffer export left behind by populate


def test_populate_lets_other_threads_run(name):
    """mmap.madvise would hold the GIL for the whole call; ours must not."""
    seg = shm.create(name, 512 << 20, allocate=True)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.02)
    t0 = time.perf_counter()
    ok = shm.populate(seg)
    t1 = time.perf_counter()
    stop.set()
    t.join()
    seg.close()
    if not ok:
        pytest.skip("kernel without MADV_POPULATE_WRITE")
    during = [x for x in ticks if t0 <= x <= t1]
    # The populate takes tens of ms; a thread ticking every ms gets to run meanwhile.
    assert (t1 - t0) < 0.01 or len(during) >= 3, (t1 - t0, len(during))
