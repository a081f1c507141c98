"""Named POSIX shared-memory segments under /dev/shm, without a resource tracker.

``multiprocessing.shared_memory`` registers every segment with a tracker process that
unlinks it when the creator exits, which is exactly what a sidecar must not allow (the
bytes have to outlive the trainer that wrote them). Here a segment is a file in
``SHM_DIR`` mapped with mmap; its lifetime is explicit: ``create`` ... ``unlink``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re

import numpy as np

SHM_DIR = os.environ.get("SNAPSHOTD_SHM_DIR", "/dev/shm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid shared-memory segment name {name!r}")
    return name


def path_of(name: str) -> str:
    return os.path.join(SHM_DIR, check_name(name))


class Segment:
    """An open mapping of one segment. ``buf`` is the mmap (buffer protocol).

    ``close()`` unmaps at once unless a buffer export of ``buf`` is alive (a memoryview,
    a numpy array made with ``np.frombuffer``): then ``mmap.close()`` raises BufferError,
    ``close()`` lets go of the mmap and the mapping goes with the last export. A tensor
    made with ``torch.frombuffer`` holds NO export (only a reference to the mmap object):
    it reads freed memory after ``close()``, so such views must never outlive it; hand
    out copies, or views anchored on a numpy array (``snapshotd_client.loader``)."""

    __slots__ = ("name", "size", "buf", "writable")

    def __init__(self, name: str, size: int, buf: mmap.mmap | None, writable: bool):
        self.name, self.size, self.buf, self.writable = name, size, buf, writable

    def close(self) -> None:
        if self.buf is not None:
            try:
                self.buf.close()
            except BufferError:  # exports still alive: the mapping dies with the last one
                pass
            self.buf = None

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {self.size} bytes)"


# madvise(2) advice values (Linux >= 5.14); not all Python versions name them.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


_libc = None


def _madvise(buf, advice: int) -> None:
    """madvise(2) on a whole mmap through libc: ``mmap.madvise`` holds the GIL for the
    whole call (~0.24 s per GiB here), which would stall every other thread of the
    daemon -- heartbeats included. A ctypes call releases it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    anchor = np.frombuffer(buf, np.uint8)  # a buffer export (read-only too): the mapping stays put
    try:
        if _libc.madvise(anchor.ctypes.data, anchor.nbytes, advice) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        del anchor


def populate(seg: "Segment", write: bool = True) -> bool:
    """Fault in every page of this mapping now, in one system call.

    Touching a fresh mapping page by page costs a fault per 4 KiB page: copying into
    it runs at ~1.5 GB/s on these machines against ~12 GB/s into mapped pages, even
    when the tmpfs pages are already allocated (page tables are per process). One
    MADV_POPULATE_* call maps the whole segment at ~5 GB/s, so a segment about to be
    filled or read whole should be populated first. The GIL is released meanwhile.
    Returns False (and does nothing) where the kernel does not support it (Linux < 5.14)."""
    if seg.buf is None:
        return True
    if write and not seg.writable:
        raise ValueError(f"segment {seg.name} is mapped read-only")
    try:
        _madvise(seg.buf, _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ)
        return True
    except OSError:
        return False


def _map(fd: int, size: int, writable: bool) -> mmap.mmap | None:
    if size == 0:
        return None
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)


def create(name: str, size: int, *, mode: int = 0o600, allocate: bool = False,
           prefault: bool = False) -> Segment:
    """Create (or truncate and resize) a segment of ``size`` bytes and map it.

    ``allocate``: reserve the pages now (posix_fallocate), so a full tmpfs is an
    OSError here rather than a SIGBUS at the first write. ``prefault``: also map
    every page now (see :func:`populate`), for a segment this process fills next."""
    fd = os.open(path_of(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.ftruncate(fd, size)
        if allocate and size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.unlink(path_of(name))
                raise
        seg = Segment(name, size, _map(fd, size, True), True)
    finally:
        os.close(fd)
    if prefault:
        populate(seg)
    return seg


def open_segment(name: str, *, writable: bool = False, prefault: bool = False) -> Segment:
    """Map an existing segment; ``prefault`` maps every page now (see :func:`populate`)."""
    fd = os.open(path_of(name), os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        seg = Segment(name, size, _map(fd, size, writable), writable)
    finally:
        os.close(fd)
    if prefault:
        populate(seg, write=writable)
    return seg


def unlink(name: str) -> bool:
    try:
        os.unlink(path_of(name))
        return True
    except FileNotFoundError:
        return False


def list_segments(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize
