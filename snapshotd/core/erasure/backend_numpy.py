"""Portable erasure backend: GF(2^8) region arithmetic with numpy lookup tables.

Always available and bit-identical to the ISA-L backend, at roughly 1 GB/s per
coefficient instead of memory speed. Each product ``c * block`` is the row lookup
``MUL_TABLE[c][block]`` (np.take into a scratch buffer), XOR-accumulated in place;
coefficient 1 is a plain XOR (or copy) and 0 is skipped. Work is done in chunks of
``CHUNK`` bytes so that sources, destinations and the scratch stay in cache; scratch
buffers come from a small pool, so calls allocate nothing proportional to the data and
concurrent calls from several threads are safe.

Backend interface (shared with backend_isal, called by ErasureCode after validation):
``prepare(matrix) -> handle``, ``dot(handle, srcs, dsts, n)`` (dsts = matrix @ srcs),
``mad(handle, col, src, dsts, n)`` (dsts[r] ^= matrix[r][col] * src) and
``mul_acc(coef, src, dst, n)`` (dst ^= coef * src, coef >= 2: ErasureCode handles 0 and 1).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import gf

CHUNK = 128 * 1024


class NumpyMatrix:
    """A prepared coefficient matrix: rows of python ints plus the table rows."""

    __slots__ = ("matrix", "coefs", "tables")

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix
        self.coefs = [[int(c) for c in row] for row in matrix]
        self.tables = [[gf.MUL_TABLE[c] for c in row] for row in self.coefs]


class NumpyBackend:
    name = "numpy"

    def __init__(self, chunk: int = CHUNK) -> None:
        if chunk < 1:
            raise ValueError("chunk must be positive")
        self.chunk = chunk
        self._pool: list[np.ndarray] = []

    def describe(self) -> str:
        return "numpy"

    # scratch pool: list.pop/append are atomic under the GIL
    def _take_scratch(self) -> np.ndarray:
        try:
            return self._pool.pop()
        except IndexError:
            return np.empty(self.chunk, dtype=np.uint8)

    def _give_scratch(self, s: np.ndarray) -> None:
        if len(self._pool) < 8:
            self._pool.append(s)

    def prepare(self, matrix: np.ndarray) -> NumpyMatrix:
        return NumpyMatrix(matrix)

    def dot(self, h: NumpyMatrix, srcs: Sequence[np.ndarray], dsts: Sequence[np.ndarray], n: int) -> None:
        if n == 0:
            return
        scratch = self._take_scratch()
        try:
            step = self.chunk
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                tmp = scratch[: hi - lo]
                s_chunks = [s[lo:hi] for s in srcs]
                for r, dst in enumerate(dsts):
                    d = dst[lo:hi]
                    first = True
                    for c, src, table in zip(h.coefs[r], s_chunks, h.tables[r]):
                        if c == 0:
                            continue
                        if first:
                            if c == 1:
                                np.copyto(d, src)
                            else:
                                np.take(table, src, out=d, mode="wrap")
                            first = False
                        elif c == 1:
                            np.bitwise_xor(d, src, out=d)
                        else:
                            np.take(table, src, out=tmp, mode="wrap")
                            np.bitwise_xor(d, tmp, out=d)
                    if first:  # all-zero row
                        d.fill(0)
        finally:
            self._give_scratch(scratch)

    def mad(self, h: NumpyMatrix, col: int, src: np.ndarray, dsts: Sequence[np.ndarray], n: int) -> None:
        if n == 0:
            return
        coefs = [row[col] for row in h.coefs]
        tables = [row[col] for row in h.tables]
        scratch = self._take_scratch()
        try:
            step = self.chunk
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                tmp = scratch[: hi - lo]
                s = src[lo:hi]
                for c, table, dst in zip(coefs, tables, dsts):
                    self._acc(c, table, s, dst[lo:hi], tmp)
        finally:
            self._give_scratch(scratch)

    def mul_acc(self, coef: int, src: np.ndarray, dst: np.ndarray, n: int) -> None:
        """dst ^= coef * src for coef >= 2 (ErasureCode handles 0 and 1)."""
        table = gf.MUL_TABLE[coef]
        scratch = self._take_scratch()
        try:
            step = self.chunk
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                self._acc(coef, table, src[lo:hi], dst[lo:hi], scratch[: hi - lo])
        finally:
            self._give_scratch(scratch)

    @staticmethod
    def _acc(c: int, table: np.ndarray, s: np.ndarray, d: np.ndarray, tmp: np.ndarray) -> None:
        if c == 0:
            return
        if c == 1:
            np.bitwise_xor(d, s, out=d)
        else:
            np.take(table, s, out=tmp, mode="wrap")
            np.bitwise_xor(d, tmp, out=d)
