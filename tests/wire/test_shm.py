"""shm.populate: maps a whole segment at once without changing its bytes."""

import os
import platform
import re
import threading
import time

import pytest

from snapshotd.wire import shm


@pytest.fixture
def name():
    n = f"snapshotd-test-populate.{os.getpid()}"
    yield n
    shm.unlink(n)


def _kernel_has_populate() -> bool:
    """MADV_POPULATE_READ/WRITE arrived in Linux 5.14."""
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    return (major, minor) >= (5, 14)


def _resident_bytes(path: str) -> int:
    """Rss of this process's mapping of ``path``, from /proc/self/smaps (not from shm)."""
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(path) or line.rstrip().endswith(path + " (deleted)")
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


def test_populate_keeps_bytes_and_works_read_only(name):
    size = 8 << 20
    seg = shm.create(name, size, allocate=True)
    assert _resident_bytes(shm.path_of(name)) < size // 2  # fresh mapping: nothing faulted in
    seg.buf[:5] = b"hello"
    seg.buf[-3:] = b"end"
    assert shm.populate(seg) is _kernel_has_populate()
    if _kernel_has_populate():  # every page of the mapping is now resident
        assert _resident_bytes(shm.path_of(name)) == size
    assert bytes(seg.buf[:5]) == b"hello" and bytes(seg.buf[-3:]) == b"end"
    seg.close()
    ro = shm.open_segment(name, prefault=True)
    assert bytes(ro.buf[:5]) == b"hello" and bytes(ro.buf[-3:]) == b"end"
    with pytest.raises(ValueError, match="read-only"):
        shm.populate(ro, write=True)
    ro.close()  # no buffer export left behind by populate


@pytest.mark.skipif(not _kernel_has_populate(), reason="kernel without MADV_POPULATE_WRITE (< 5.14)")
def test_populate_lets_other_threads_run(name):
    """mmap.madvise would hold the GIL for the whole call; ours must not.

    No clock is asserted on: a second thread counts loop turns while populate runs, and
    the populate call must see that count move between its start and its end. Holding
    the GIL in the system call, it cannot move (the ticker could only run before or
    after). The segment grows until one populate is long enough to tell (a 1 GiB
    populate is ~0.2 s here)."""
    counter = [0]
    stop = threading.Event()
    running = threading.Event()

    def tick():
        running.set()
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0)  # yield: let the populating thread take the GIL when it needs it

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    running.wait(5)
    try:
        for size in (256 << 20, 1 << 30):
            seg = shm.create(name, size, allocate=True)
            try:
                before = counter[0]
                assert shm.populate(seg) is True
                moved = counter[0] - before
            finally:
                seg.close()
                shm.unlink(name)
            if moved >= 100:
                return
        pytest.fail(f"the ticking thread advanced only {moved} times during a 1 GiB populate: "
                    "populate holds the GIL")
    finally:
        stop.set()
        t.join(5)
