"""ISA-L erasure backend via ctypes, on numpy buffers without copies.

Pure binding of an ALREADY loaded library: :class:`IsalLibrary` takes a ``ctypes.CDLL``,
checks its symbols and runs a tiny self-check against :mod:`gf`; :class:`IsalBackend`
drives it. Finding and loading the library (``$SNAPSHOTD_ISAL_LIB``, the system library,
pyeclib's bundled copy) is file and environment I/O and lives in
:mod:`snapshotd.node.erasure`.

Calls: ``ec_init_tables(k, rows, a, gftbls)`` expands a rows x k coefficient matrix into
32*k*rows bytes of tables (cached per matrix by ErasureCode via :meth:`prepare`);
``ec_encode_data(len, k, rows, gftbls, data**, coding**)`` computes coding = a @ data;
``ec_encode_data_update(len, k, rows, vec_i, gftbls, data*, coding**)`` adds column
vec_i's contribution of one block. ctypes releases the GIL during these calls.
Thread-safety: an IsalBackend may be shared by threads (prepared matrices are read-only).
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from snapshotd.wire.errors import BackendUnavailableError
from . import gf

REQUIRED_SYMBOLS = ("ec_init_tables", "ec_encode_data", "ec_encode_data_update")
# ISA-L takes `int len`; larger regions are cut into pieces of this many bytes.
MAX_CALL_LEN = 1 << 30

_c_int = ctypes.c_int
_c_void_p = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)


class IsalLibrary:
    """A loaded ISA-L shared library, its symbols bound and checked.

    ``lib``: the library, already loaded (``ctypes.CDLL``); ``path``: what it was loaded
    from, for messages and :attr:`IsalBackend.name` (default: the CDLL's own name).
    Raises BackendUnavailableError if the symbols are missing or the self-check fails.
    """

    def __init__(self, lib: ctypes.CDLL, path: str | None = None) -> None:
        path = path if path is not None else lib._name
        missing = [s for s in REQUIRED_SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise BackendUnavailableError(f"library {path!r} lacks ISA-L symbols {missing}")
        self.path = path
        self.init_tables = lib.ec_init_tables
        self.init_tables.argtypes = [_c_int, _c_int, _c_void_p, _c_void_p]
        self.init_tables.restype = None
        self.encode = lib.ec_encode_data
        self.encode.argtypes = [_c_int, _c_int, _c_int, _c_void_p, _PP, _PP]
        self.encode.restype = None
        self.update = lib.ec_encode_data_update
        self.update.argtypes = [_c_int, _c_int, _c_int, _c_int, _c_void_p, _c_void_p, _PP]
        self.update.restype = None
        self._self_check()

    def _self_check(self) -> None:
        """Encode a few lengths (below and above the SIMD width) and compare with gf."""
        rng = np.random.default_rng(11)
        a = np.array([[1, 1, 1], [7, 0x8E, 200]], dtype=np.uint8)
        tbls = np.zeros(32 * a.size, dtype=np.uint8)
        self.init_tables(3, 2, a.ctypes.data, tbls.ctypes.data)
        for n in (1, 63, 64, 200):
            data = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(3)]
            out = [np.zeros(n, dtype=np.uint8) for _ in range(2)]
            self.encode(n, 3, 2, tbls.ctypes.data, _ptrs(data), _ptrs(out))
            upd = [np.zeros(n, dtype=np.uint8) for _ in range(2)]
            for j in (2, 0, 1):
                self.update(n, 3, 2, j, tbls.ctypes.data, data[j].ctypes.data, _ptrs(upd))
            want = [np.bitwise_xor.reduce([gf.mul_bytes(int(c), d) for c, d in zip(row, data)]) for row in a]
            for o, u, w in zip(out, upd, want):
                if not (np.array_equal(o, w) and np.array_equal(u, w)):
                    raise BackendUnavailableError(
                        f"ISA-L library {self.path!r} failed its self-check (len {n})"
                    )


_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _addr(a: np.ndarray) -> int:
    """Address of a contiguous array's first byte (3x cheaper than a.ctypes.data)."""
    try:
        return _addressof(_from_buffer(a))
    except (TypeError, ValueError):  # read-only or empty buffer
        return a.ctypes.data


def _ptrs(arrays: Sequence[np.ndarray], offset: int = 0):
    return (_c_void_p * len(arrays))(*[a.ctypes.data + offset for a in arrays])


class IsalMatrix:
    """A prepared coefficient matrix: its expanded gftbls (kept alive) and shape."""

    __slots__ = ("matrix", "rows", "cols", "tables", "tables_ptr", "src_type", "dst_type")

    def __init__(self, lib: IsalLibrary, matrix: np.ndarray) -> None:
        self.matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
        self.rows, self.cols = self.matrix.shape
        self.tables = np.zeros(max(32, 32 * self.matrix.size), dtype=np.uint8)
        self.tables_ptr = self.tables.ctypes.data
        self.src_type = _c_void_p * self.cols  # pointer-array types, built once
        self.dst_type = _c_void_p * self.rows
        if self.matrix.size:
            lib.init_tables(self.cols, self.rows, self.matrix.ctypes.data, self.tables_ptr)


class IsalBackend:
    """Erasure backend on a checked :class:`IsalLibrary` (see backend_numpy for the interface)."""

    def __init__(self, lib: IsalLibrary) -> None:
        self.lib = lib
        self.name = f"isal ({self.lib.path})"
        self._scalar: dict[int, IsalMatrix] = {}

    def describe(self) -> str:
        return self.name

    def prepare(self, matrix: np.ndarray) -> IsalMatrix:
        return IsalMatrix(self.lib, matrix)

    def dot(self, h: IsalMatrix, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray], n: int) -> None:
        if n == 0 or h.rows == 0:
            return
        s_addr = [_addr(a) for a in srcs]
        d_addr = [_addr(a) for a in dsts]
        if n <= MAX_CALL_LEN:
            self.lib.encode(n, h.cols, h.rows, h.tables_ptr, h.src_type(*s_addr), h.dst_type(*d_addr))
            return
        for lo in range(0, n, MAX_CALL_LEN):
            s_arr = h.src_type(*[p + lo for p in s_addr])
            d_arr = h.dst_type(*[p + lo for p in d_addr])
            self.lib.encode(min(MAX_CALL_LEN, n - lo), h.cols, h.rows, h.tables_ptr, s_arr, d_arr)

    def mad(self, h: IsalMatrix, col: int, src: np.ndarray, dsts: Sequence[np.ndarray], n: int) -> None:
        if n == 0 or h.rows == 0:
            return
        s = _addr(src)
        d_addr = [_addr(a) for a in dsts]
        if n <= MAX_CALL_LEN:
            self.lib.update(n, h.cols, h.rows, col, h.tables_ptr, s, h.dst_type(*d_addr))
            return
        for lo in range(0, n, MAX_CALL_LEN):
            d_arr = h.dst_type(*[p + lo for p in d_addr])
            self.lib.update(min(MAX_CALL_LEN, n - lo), h.cols, h.rows, col, h.tables_ptr, s + lo, d_arr)

    def mul_acc(self, coef: int, src: np.ndarray, dst: np.ndarray, n: int) -> None:
        """dst ^= coef * src for coef >= 2 (ErasureCode handles 0 and 1)."""
        h = self._scalar.get(coef)
        if h is None:
            h = self._scalar[coef] = self.prepare(np.array([[coef]], dtype=np.uint8))
        self.mad(h, 0, src, (dst,), n)
