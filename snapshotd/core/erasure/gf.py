"""GF(2^8) arithmetic and small matrices over it (pure numpy, no I/O).

Field: polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d), generator 2 -- the field of ISA-L
and of reedsolo's default ``init_tables(0x11d)``. Addition is XOR.

Tables (read-only numpy arrays, built once at import):
  ``EXP`` (512 entries, so ``EXP[LOG[a] + LOG[b]]`` needs no modulo), ``LOG`` (LOG[0] is
  meaningless), ``INV`` (INV[0] = 0 as a placeholder), ``MUL_TABLE`` (256 x 256, row c is
  the "multiply by c" lookup table used by the numpy backend).

Code matrix: :func:`cauchy_parity_matrix` gives the m x k parity matrix P of the systematic
code [I_k; P]: the Cauchy matrix of ISA-L's ``gf_gen_cauchy1_matrix`` (P[i][j] =
inv((k + i) ^ j)) with each column scaled so that row 0 is all ones (parity 0 = XOR).
"""

from __future__ import annotations

import numpy as np

POLY = 0x11D
GENERATOR = 2
ORDER = 256


class SingularMatrixError(ArithmeticError):
    """The matrix has no inverse over GF(2^8)."""


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    exp = np.zeros(2 * ORDER, dtype=np.uint8)
    log = np.zeros(ORDER, dtype=np.int32)
    x = 1
    for i in range(ORDER - 1):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= POLY
    exp[ORDER - 1 : 2 * (ORDER - 1)] = exp[: ORDER - 1]
    return exp, log


EXP, LOG = _build_tables()
_EXP_L = [int(v) for v in EXP]
_LOG_L = [int(v) for v in LOG]

_nz = np.arange(1, ORDER)
MUL_TABLE = np.zeros((ORDER, ORDER), dtype=np.uint8)
MUL_TABLE[1:, 1:] = EXP[LOG[_nz][:, None] + LOG[_nz][None, :]]
INV = np.zeros(ORDER, dtype=np.uint8)
INV[1:] = EXP[(ORDER - 1 - LOG[_nz]) % (ORDER - 1)]
for _t in (EXP, LOG, MUL_TABLE, INV):
    _t.setflags(write=False)
del _nz, _t


def _check(a: int) -> int:
    a = int(a)
    if not 0 <= a < ORDER:
        raise ValueError(f"{a} is not an element of GF(2^8)")
    return a


def add(a: int, b: int) -> int:
    return _check(a) ^ _check(b)


def mul(a: int, b: int) -> int:
    a, b = _check(a), _check(b)
    if a == 0 or b == 0:
        return 0
    return _EXP_L[_LOG_L[a] + _LOG_L[b]]


def inv(a: int) -> int:
    a = _check(a)
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return _EXP_L[(ORDER - 1 - _LOG_L[a]) % (ORDER - 1)]


def div(a: int, b: int) -> int:
    a, b = _check(a), _check(b)
    if b == 0:
        raise ZeroDivisionError("division by 0 in GF(2^8)")
    if a == 0:
        return 0
    return _EXP_L[(_LOG_L[a] - _LOG_L[b]) % (ORDER - 1)]


def pow_(a: int, n: int) -> int:
    a = _check(a)
    if n == 0:
        return 1
    if a == 0:
        if n < 0:
            raise ZeroDivisionError("0 has no inverse in GF(2^8)")
        return 0
    return _EXP_L[(_LOG_L[a] * n) % (ORDER - 1)]


def mul_bytes(coef: int, block: np.ndarray) -> np.ndarray:
    """coef * block, elementwise (allocates; for tests and small data)."""
    return MUL_TABLE[_check(coef)][np.asarray(block, dtype=np.uint8)]


def _as_matrix(a) -> np.ndarray:
    m = np.asarray(a)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {m.shape}")
    if m.dtype != np.uint8:
        if m.size and (m.min() < 0 or m.max() >= ORDER):
            raise ValueError("matrix entries must be in 0..255")
        m = m.astype(np.uint8)
    return m


def mat_mul(a, b) -> np.ndarray:
    """Matrix product over GF(2^8): (r x n) @ (n x c) -> (r x c) uint8."""
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shape mismatch: {a.shape} @ {b.shape}")
    if a.shape[1] == 0:
        return np.zeros((a.shape[0], b.shape[1]), dtype=np.uint8)
    prods = MUL_TABLE[a[:, :, None], b[None, :, :]]  # r x n x c
    return np.bitwise_xor.reduce(prods, axis=1).astype(np.uint8)


def mat_vec(a, v) -> np.ndarray:
    return mat_mul(a, np.asarray(v, dtype=np.uint8).reshape(-1, 1)).reshape(-1)


def identity(n: int) -> np.ndarray:
    return np.eye(n, dtype=np.uint8)


def mat_inv(a) -> np.ndarray:
    """Inverse by Gauss-Jordan elimination; raises SingularMatrixError."""
    a = _as_matrix(a)
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"only square matrices have inverses, got shape {a.shape}")
    work = np.concatenate([a, identity(n)], axis=1)
    for col in range(n):
        nz = np.nonzero(work[col:, col])[0]
        if nz.size == 0:
            raise SingularMatrixError(f"matrix is singular (column {col} has no pivot)")
        piv = col + int(nz[0])
        if piv != col:
            work[[col, piv]] = work[[piv, col]]
        p = int(work[col, col])
        if p != 1:
            work[col] = MUL_TABLE[inv(p)][work[col]]
        factors = work[:, col].copy()
        factors[col] = 0
        for r in np.nonzero(factors)[0]:
            work[r] ^= MUL_TABLE[int(factors[r])][work[col]]
    return np.ascontiguousarray(work[:, n:])


def is_invertible(a) -> bool:
    try:
        mat_inv(a)
    except SingularMatrixError:
        return False
    return True


def cauchy_parity_matrix(k: int, m: int) -> np.ndarray:
    """m x k parity matrix: Cauchy inv((k+i) ^ j), columns scaled so row 0 is all ones.

    Every square submatrix of a Cauchy matrix is nonsingular and scaling columns by
    nonzero constants keeps that, so [I_k; P] is MDS: any k of the k+m rows invert.
    """
    if k < 1 or m < 0 or k + m > ORDER:
        raise ValueError(f"need 1 <= k, 0 <= m, k + m <= 256 (got k={k}, m={m})")
    if m == 0:
        return np.zeros((0, k), dtype=np.uint8)
    x = np.arange(k, k + m)[:, None]
    y = np.arange(k)[None, :]
    c = INV[x ^ y]  # x_i != y_j always, so no zero is inverted
    scale = INV[c[0]]  # inv(C[0][j]) per column
    return MUL_TABLE[c, scale[None, :]].astype(np.uint8)


def generator_matrix(k: int, m: int) -> np.ndarray:
    """(k+m) x k systematic generator [I_k; P]; row s produces shard s."""
    return np.concatenate([identity(k), cauchy_parity_matrix(k, m)], axis=0)
