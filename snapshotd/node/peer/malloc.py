"""glibc malloc tuning for daemons that receive multi-MiB peer-plane frames (opt-in)."""

from __future__ import annotations

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc_for_bulk_transfers(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20,
                                   top_pad: int = 64 << 20) -> bool:
    """Process-wide glibc malloc tuning for receiving multi-MiB frames; opt-in.

    ZeroMQ mallocs every received message. With glibc defaults a freed multi-MiB buffer
    is partly returned to the kernel, so the next one page-faults again (measured: ~100-270
    of 1024 pages per 4 MiB frame, and 1025 if only the trim threshold is set, because
    setting any of these options turns off glibc's dynamic mmap threshold). Serving
    frames below ``mmap_threshold`` from the heap and keeping up to ``trim_threshold``
    of freed heap removes the faults. Costs: freed memory up to ``trim_threshold`` (per
    arena) stays with the process. Call once at daemon start-up, before traffic. Returns
    False (and changes nothing) where glibc's ``mallopt`` is not available.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
                         (_M_TOP_PAD, top_pad)):
        ok = mallopt(param, int(value)) == 1 and ok
    return ok
