"""Tests for snapshotd.core.erasure: field arithmetic, MDS property, every erasure pattern,
backend equivalence (numpy vs ISA-L), incremental update, validation. Loading ISA-L is
I/O and lives in snapshotd.node.erasure (tests/node/test_erasure_loader.py); these tests
only use it to get an ISA-L backend to compare with numpy."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest
import reedsolo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotd.core.erasure import ErasureCode, allocate_blocks, gf
from snapshotd.core.erasure import backend_isal
from snapshotd.node.erasure import isal_available, make_backend
from snapshotd.wire.errors import BackendUnavailableError, InsufficientShardsError, InvalidRequestError

HAVE_ISAL = isal_available()
# Skipped only off CI: under CI (.ci/run sets CI=1) the fast backend is required, so a
# broken ISA-L load fails these cases instead of passing the suite without them.
requires_isal = pytest.mark.skipif(
    not HAVE_ISAL and not os.environ.get("CI"),
    reason="ISA-L not loadable (no $SNAPSHOTD_ISAL_LIB, system libisal or pyeclib wheel)"
)
BACKENDS = ["numpy", pytest.param("isal", marks=requires_isal)]


def code_for(k, m, backend: str) -> ErasureCode:
    """ErasureCode on the backend named ("numpy" or "isal", the latter loaded by node)."""
    return ErasureCode(k, m, backend=make_backend(backend))


CONFIGS = [(1, 1), (2, 1), (3, 2), (4, 2), (6, 3), (8, 2), (10, 4)]


@pytest.fixture
def rs():
    reedsolo.init_tables(0x11D)  # other code may have re-initialised the globals
    return reedsolo


def rand_blocks(rng: np.random.Generator, count: int, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(count)]


def empty(count: int, n: int, fill: int = 0xA5) -> list[np.ndarray]:
    return [np.full(n, fill, dtype=np.uint8) for _ in range(count)]


def ref_encode(p: np.ndarray, data: list[np.ndarray]) -> list[np.ndarray]:
    """Slow reference: parity[i] = XOR_j MUL_TABLE[P[i][j]][data[j]]."""
    n = len(data[0]) if data else 0
    out = []
    for row in p:
        acc = np.zeros(n, dtype=np.uint8)
        for c, d in zip(row, data):
            acc ^= gf.MUL_TABLE[int(c)][d]
        out.append(acc)
    return out


def rs_mat_inv(a: list[list[int]], rs) -> list[list[int]]:
    """Gauss-Jordan inverse using only reedsolo's field arithmetic."""
    n = len(a)
    w = [list(row) + [int(i == j) for j in range(n)] for i, row in enumerate(a)]
    for c in range(n):
        piv = next(r for r in range(c, n) if w[r][c])
        w[c], w[piv] = w[piv], w[c]
        iv = rs.gf_inverse(w[c][c])
        w[c] = [rs.gf_mul(iv, x) for x in w[c]]
        for r in range(n):
            if r != c and w[r][c]:
                f = w[r][c]
                w[r] = [x ^ rs.gf_mul(f, y) for x, y in zip(w[r], w[c])]
    return [row[n:] for row in w]


# --- field arithmetic -----------------------------------------------------------------


def test_mul_exhaustive_matches_reedsolo(rs):
    want = np.array([[rs.gf_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    assert np.array_equal(gf.MUL_TABLE, want)
    for a, b in [(0, 0), (1, 255), (2, 128), (3, 7), (255, 255)]:
        assert gf.mul(a, b) == rs.gf_mul(a, b) == rs.gf_mult_noLUT(a, b, 0x11D)
    assert not gf.MUL_TABLE.flags.writeable


def test_div_inv_exhaustive_match_reedsolo(rs):
    for b in range(1, 256):
        assert gf.inv(b) == rs.gf_inverse(b) == int(gf.INV[b])
        assert gf.mul(b, gf.inv(b)) == 1
        for a in range(256):
            assert gf.div(a, b) == rs.gf_div(a, b)
    with pytest.raises(ZeroDivisionError):
        gf.inv(0)
    with pytest.raises(ZeroDivisionError):
        gf.div(5, 0)
    assert gf.pow_(2, 255) == 1 and gf.pow_(2, 8) == 0x1D
    assert all(gf.pow_(3, e) == rs.gf_pow(3, e) for e in range(300))


def test_matrix_inverse_matches_reedsolo(rs):
    rng = random.Random(5)
    for n in (1, 2, 3, 5, 8, 12):
        for _ in range(5):
            while True:
                a = [[rng.randrange(256) for _ in range(n)] for _ in range(n)]
                if gf.is_invertible(a):
                    break
            inv = gf.mat_inv(a)
            assert inv.tolist() == rs_mat_inv(a, rs)
            assert np.array_equal(gf.mat_mul(a, inv), gf.identity(n))
            assert np.array_equal(gf.mat_mul(inv, a), gf.identity(n))
    with pytest.raises(gf.SingularMatrixError):
        gf.mat_inv([[1, 2], [1, 2]])
    with pytest.raises(gf.SingularMatrixError):
        gf.mat_inv([[0, 0], [0, 7]])


def test_mat_mul_matches_scalar_definition(rs):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    got = gf.mat_mul(a, b)
    for i in range(4):
        for j in range(3):
            acc = 0
            for t in range(6):
                acc ^= rs.gf_mul(int(a[i, t]), int(b[t, j]))
            assert got[i, j] == acc


# --- the code matrix ------------------------------------------------------------------


@pytest.mark.parametrize("k,m", CONFIGS + [(16, 4), (12, 6)])
def test_parity_matrix_convention_and_every_square_submatrix_invertible(k, m, rs):
    p = ErasureCode(k, m, backend="numpy").parity_matrix
    assert p.shape == (m, k) and p.dtype == np.uint8 and not p.flags.writeable
    assert (p[0] == 1).all()  # parity 0 is a plain XOR
    # ISA-L gf_gen_cauchy1_matrix rows k..k+m-1: a[i][j] = gf_inv(i ^ j); then column scaling
    for i in range(m):
        for j in range(k):
            c = rs.gf_inverse((k + i) ^ j)
            assert p[i, j] == rs.gf_div(c, rs.gf_inverse(k ^ j))
    assert (p != 0).all()
    # MDS <=> every square submatrix of P is nonsingular
    for r in range(1, min(k, m) + 1):
        for rows in itertools.combinations(range(m), r):
            for cols in itertools.combinations(range(k), r):
                assert gf.is_invertible(p[np.ix_(rows, cols)]), (rows, cols)


@pytest.mark.parametrize("k,m", [(255, 1), (1, 255), (200, 56), (128, 128)])
def test_extreme_shapes_any_k_rows_invert(k, m):
    g = gf.generator_matrix(k, m)
    rng = random.Random(k * 1000 + m)
    for _ in range(3):
        rows = sorted(rng.sample(range(k + m), k))
        assert gf.is_invertible(g[rows])


def test_rejects_bad_shapes():
    for k, m in [(0, 1), (-1, 2), (1, -1), (200, 57), (257, 0)]:
        with pytest.raises(InvalidRequestError):
            ErasureCode(k, m, backend="numpy")
    with pytest.raises(InvalidRequestError):
        ErasureCode(4.0, 2, backend="numpy")
    with pytest.raises(InvalidRequestError, match="unknown erasure backend"):
        ErasureCode(4, 2, backend="cuda")


# --- every erasure pattern ------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,m", CONFIGS)
def test_every_erasure_pattern_decodes(k, m, backend):
    n_bytes = 131  # > 64 (SIMD body) and odd (tail)
    code = code_for(k, m, backend)
    rng = np.random.default_rng(k * 31 + m)
    data = rand_blocks(rng, k, n_bytes)
    parity = empty(m, n_bytes)
    code.encode(data, parity)
    shards = data + parity
    for want, got in zip(ref_encode(code.parity_matrix, data), parity):
        assert np.array_equal(want, got)
    assert np.array_equal(parity[0], np.bitwise_xor.reduce(data))
    outs = {i: np.empty(n_bytes, dtype=np.uint8) for i in range(k + m)}
    patterns = 0
    for r in range(0, m + 1):
        for lost in itertools.combinations(range(k + m), r):
            available = {i: s for i, s in enumerate(shards) if i not in lost}
            for o in outs.values():
                o.fill(0x5A)
            code.reconstruct(available, list(lost), outs)
            for i in lost:
                assert np.array_equal(outs[i], shards[i]), (lost, i)
            patterns += 1
    assert patterns == sum(len(list(itertools.combinations(range(k + m), r))) for r in range(m + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_k_subset_rebuilds_everything(backend):
    k, m, n_bytes = 4, 3, 77
    code = code_for(k, m, backend)
    data = rand_blocks(np.random.default_rng(9), k, n_bytes)
    parity = empty(m, n_bytes)
    code.encode(data, parity)
    shards = data + parity
    for keep in itertools.combinations(range(k + m), k):
        out = {i: np.empty(n_bytes, dtype=np.uint8) for i in range(k + m)}
        code.reconstruct({i: shards[i] for i in keep}, list(range(k + m)), out)
        assert all(np.array_equal(out[i], shards[i]) for i in range(k + m)), keep


def test_decoding_agrees_with_reedsolo_arithmetic(rs):
    k, m = 6, 3
    code = ErasureCode(k, m, backend="numpy")
    g = gf.generator_matrix(k, m).tolist()
    rng = np.random.default_rng(21)
    data = rand_blocks(rng, k, 16)
    parity = empty(m, 16)
    code.encode(data, parity)
    shards = data + parity
    for pos in range(16):  # parity bytes by reedsolo's scalar field ops
        for i in range(m):
            acc = 0
            for j in range(k):
                acc ^= rs.gf_mul(g[k + i][j], int(data[j][pos]))
            assert acc == parity[i][pos]
    for lost in [(0, 1, 2), (1, 4, 7), (5, 6, 8), (0, 3, 5)]:
        sources = code.choose_sources([i for i in range(k + m) if i not in lost])
        inv = rs_mat_inv([g[s] for s in sources], rs)
        dmat = code.decode_matrix(sources, lost).tolist()
        for t, w in enumerate(lost):
            want_row = [0] * k
            for c in range(k):
                for t2 in range(k):
                    want_row[c] ^= rs.gf_mul(g[w][t2], inv[t2][c])
            assert dmat[t] == want_row
            for pos in range(16):
                v = 0
                for c, s in enumerate(sources):
                    v ^= rs.gf_mul(want_row[c], int(shards[s][pos]))
                assert v == shards[w][pos]


def test_choose_sources_prefers_data():
    code = ErasureCode(4, 2, backend="numpy")
    assert code.choose_sources([5, 4, 3, 2, 1, 0]) == (0, 1, 2, 3)
    assert code.choose_sources([5, 4, 3, 1, 0]) == (0, 1, 3, 4)
    assert code.choose_sources([2, 3, 4, 5]) == (2, 3, 4, 5)


# --- sizes and backend equivalence ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,m,n_bytes", [(4, 2, 0), (4, 2, 1), (3, 2, 63), (4, 2, 4097), (6, 3, 300_001), (4, 2, 1 << 20)])
def test_sizes_encode_and_decode(k, m, n_bytes, backend):
    code = code_for(k, m, backend)
    data = rand_blocks(np.random.default_rng(n_bytes), k, n_bytes)
    parity = empty(m, n_bytes)
    code.encode(data, parity)
    for want, got in zip(ref_encode(code.parity_matrix, data), parity):
        assert np.array_equal(want, got)
    lost = [0, k] if m >= 2 else [0]
    shards = data + parity
    out = {i: np.empty(n_bytes, dtype=np.uint8) for i in lost}
    code.reconstruct({i: s for i, s in enumerate(shards) if i not in lost}, lost, out)
    assert all(np.array_equal(out[i], shards[i]) for i in lost)


@requires_isal
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(1, 20),
    m=st.integers(0, 8),
    n_bytes=st.integers(0, 3000),
    seed=st.integers(0, 2**32 - 1),
)
def test_numpy_and_isal_bit_identical(k, m, n_bytes, seed):
    a, b = ErasureCode(k, m, backend="numpy"), code_for(k, m, "isal")
    rng = np.random.default_rng(seed)
    data = rand_blocks(rng, k, n_bytes)
    pa, pb = empty(m, n_bytes, 1), empty(m, n_bytes, 2)
    a.encode(data, pa)
    b.encode(data, pb)
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    ua, ub = empty(m, n_bytes, 0), empty(m, n_bytes, 0)
    for j in rng.permutation(k):
        a.update(ua, int(j), data[j])
        b.update(ub, int(j), data[j])
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(ua, ub, pa))
    shards = data + pa
    lost = sorted(rng.choice(k + m, size=int(rng.integers(0, m + 1)), replace=False).tolist())
    avail = {i: s for i, s in enumerate(shards) if i not in lost}
    want = sorted(set(lost) | {int(rng.integers(0, k + m))})
    oa = {i: np.empty(n_bytes, dtype=np.uint8) for i in want}
    ob = {i: np.empty(n_bytes, dtype=np.uint8) for i in want}
    a.reconstruct(avail, want, oa)
    b.reconstruct(avail, want, ob)
    for i in want:
        assert np.array_equal(oa[i], shards[i]) and np.array_equal(ob[i], shards[i])
    src, da, db = rand_blocks(rng, 1, n_bytes)[0], rand_blocks(rng, 1, n_bytes)[0], None
    db = da.copy()
    coef = int(rng.integers(0, 256))
    a.mul_accumulate(coef, src, da)
    b.mul_accumulate(coef, src, db)
    assert np.array_equal(da, db)


def test_backend_names():
    assert ErasureCode(2, 1).backend_name == "numpy"
    assert ErasureCode(2, 1, backend="numpy").backend_name == "numpy"
    if HAVE_ISAL:
        lib = make_backend("isal").lib
        code = ErasureCode(2, 1, backend=backend_isal.IsalBackend(lib))
        assert code.backend_name == f"isal ({lib.path})"


def test_backend_by_name_is_not_core():
    for name in ("auto", "isal", "cuda"):
        with pytest.raises(InvalidRequestError, match="backend"):
            ErasureCode(4, 2, backend=name)
    with pytest.raises(InvalidRequestError, match="lacks"):
        ErasureCode(4, 2, backend=object())


# --- incremental parity ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,m", [(1, 1), (4, 2), (6, 3), (10, 4), (5, 0)])
def test_update_in_any_order_equals_encode(k, m, backend):
    code = code_for(k, m, backend)
    rng = np.random.default_rng(k + 7 * m)
    for n_bytes in (0, 1, 97, 5000):
        data = rand_blocks(rng, k, n_bytes)
        want = empty(m, n_bytes)
        code.encode(data, want)
        for _ in range(4):
            acc = empty(m, n_bytes, 0)
            for j in rng.permutation(k):
                code.update(acc, int(j), data[j])
            assert all(np.array_equal(x, y) for x, y in zip(acc, want))
        # adding a block twice cancels (characteristic 2)
        code.update(acc, 0, data[0])
        code.update(acc, 0, data[0])
        assert all(np.array_equal(x, y) for x, y in zip(acc, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_equals_sum_of_partial_products(backend):
    k, m, n_bytes = 5, 3, 333
    code = code_for(k, m, backend)
    data = rand_blocks(np.random.default_rng(1), k, n_bytes)
    want = empty(m, n_bytes)
    code.encode(data, want)
    for i in range(m):  # a parity holder receiving partial products from data nodes
        acc = np.zeros(n_bytes, dtype=np.uint8)
        for j in range(k):
            code.mul_accumulate(code.coefficient(i, j), data[j], acc)
        assert np.array_equal(acc, want[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mul_accumulate_all_coefficients(backend):
    code = code_for(2, 1, backend)
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 1000, dtype=np.uint8)
    base = rng.integers(0, 256, 1000, dtype=np.uint8)
    for c in range(256):
        dst = base.copy()
        code.mul_accumulate(c, src, dst)
        assert np.array_equal(dst, base ^ gf.MUL_TABLE[c][src]), c
    dst = base.copy()
    code.mul_accumulate(1, src, dst)
    assert np.array_equal(dst, base ^ src)
    big_src = rng.integers(0, 256, 300_001, dtype=np.uint8)
    big = np.zeros(300_001, dtype=np.uint8)
    code.mul_accumulate(0x53, big_src, big)
    assert np.array_equal(big, gf.MUL_TABLE[0x53][big_src])
    for bad in (-1, 256, 1.0, True, "3"):
        with pytest.raises(InvalidRequestError, match="coef"):
            code.mul_accumulate(bad, src, dst)


# --- too many losses and invalid requests ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,m", [(2, 1), (4, 2), (6, 3), (3, 0)])
def test_more_than_m_losses_is_insufficient(k, m, backend):
    code = code_for(k, m, backend)
    shards = rand_blocks(np.random.default_rng(0), k + m, 10)
    lost = list(range(1, m + 2))
    out = {i: np.zeros(10, dtype=np.uint8) for i in lost}
    with pytest.raises(InsufficientShardsError) as ei:
        code.reconstruct({i: s for i, s in enumerate(shards) if i not in lost}, lost, out)
    msg = str(ei.value)
    assert f"need {k}" in msg and f"only {k - 1} available" in msg and str(lost) in msg
    assert all((o == 0).all() for o in out.values())  # nothing written
    # wanted shards that survive are still served without decoding
    code.reconstruct({0: shards[0]}, [0], out={0: out[1]})
    assert np.array_equal(out[1], shards[0])


def test_invalid_requests():
    code = ErasureCode(3, 2, backend="numpy")
    ok = rand_blocks(np.random.default_rng(0), 3, 8)
    par = empty(2, 8)
    cases = [
        (lambda: code.encode(ok[:2], par), "needs k=3 data blocks"),
        (lambda: code.encode(ok, par[:1]), "needs m=2 parity"),
        (lambda: code.encode([ok[0], ok[1], ok[2].astype(np.int8)], par), "dtype uint8"),
        (lambda: code.encode([ok[0], ok[1], np.zeros((2, 4), np.uint8)], par), "1-D"),
        (lambda: code.encode([ok[0], ok[1], np.zeros(16, np.uint8)[::2]], par), "C-contiguous"),
        (lambda: code.encode([ok[0], ok[1], bytes(8)], par), "numpy array"),
        (lambda: code.encode([ok[0], ok[1], np.zeros(9, np.uint8)], par), "same length"),
        (lambda: code.encode(ok, [par[0], np.zeros(7, np.uint8)]), "same length"),
        (lambda: code.update(par, 3, ok[0]), "data_index 3 out of range"),
        (lambda: code.update(par, -1, ok[0]), "out of range"),
        (lambda: code.update(par, 1.5, ok[0]), "must be an int"),
        (lambda: code.update(par, 0, np.zeros(9, np.uint8)), "same length"),
        (lambda: code.mul_accumulate(3, ok[0], np.zeros(9, np.uint8)), "same length"),
        (lambda: code.reconstruct({0: ok[0], 1: ok[1], 7: ok[2]}, [2], {2: par[0]}), "out of range"),
        (lambda: code.reconstruct({0: ok[0], 1: ok[1], 3: par[0]}, [2, 2], {2: par[1]}), "repeat"),
        (lambda: code.reconstruct({0: ok[0], 1: ok[1], 3: par[0]}, [2], {}), "no output buffer"),
        (lambda: code.reconstruct({0: ok[0], 1: ok[1], 3: par[0]}, [5], {5: par[1]}), "out of range"),
        (lambda: code.reconstruct({0: ok[0], 1: ok[1], 3: np.zeros(3, np.uint8)}, [2], {2: par[1]}), "same length"),
    ]
    ro = np.zeros(8, np.uint8)
    ro.setflags(write=False)
    cases.append((lambda: code.encode(ok, [par[0], ro]), "writeable"))
    for call, match in cases:
        with pytest.raises(InvalidRequestError, match=match):
            call()
    assert issubclass(InvalidRequestError, ValueError)


def test_m_zero_encode_is_noop():
    code = ErasureCode(3, 0)
    code.encode(rand_blocks(np.random.default_rng(0), 3, 5), [])
    code.update([], 1, np.zeros(5, np.uint8))
    assert code.parity_matrix.shape == (0, 3)


def test_reconstruct_copies_available_and_decode_data():
    code = ErasureCode(4, 2)
    data = rand_blocks(np.random.default_rng(4), 4, 100)
    parity = empty(2, 100)
    code.encode(data, parity)
    out = empty(4, 100)
    code.decode_data({0: data[0], 2: data[2], 4: parity[0], 5: parity[1]}, out)
    assert all(np.array_equal(a, b) for a, b in zip(out, data))
    code.reconstruct({i: data[i] for i in range(4)}, [], {})  # nothing wanted: fine


@requires_isal
def test_isal_library_binds_a_loaded_cdll():
    import ctypes

    path = make_backend("isal").lib.path
    lib = backend_isal.IsalLibrary(ctypes.CDLL(path))
    assert lib.path and backend_isal.IsalBackend(lib).describe().startswith("isal (")
    with pytest.raises(BackendUnavailableError, match="lacks ISA-L symbols"):
        backend_isal.IsalLibrary(ctypes.CDLL("libc.so.6"), "libc.so.6")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,m", [(255, 1), (1, 255), (200, 56)])
def test_extreme_shapes_encode_and_decode(k, m, backend):
    n_bytes = 70
    code = code_for(k, m, backend)
    rng = np.random.default_rng(k)
    data = rand_blocks(rng, k, n_bytes)
    parity = empty(m, n_bytes)
    code.encode(data, parity)
    assert np.array_equal(parity[0], np.bitwise_xor.reduce(data))
    shards = data + parity
    lost = sorted(rng.choice(k + m, size=m, replace=False).tolist())
    out = {i: np.empty(n_bytes, dtype=np.uint8) for i in lost}
    code.reconstruct({i: s for i, s in enumerate(shards) if i not in lost}, lost, out)
    assert all(np.array_equal(out[i], shards[i]) for i in lost)


@requires_isal
def test_isal_long_regions_are_cut_into_calls(monkeypatch):
    monkeypatch.setattr(backend_isal, "MAX_CALL_LEN", 128)  # stands in for the 2^31 int limit
    k, m, n_bytes = 5, 3, 1000
    a, b = code_for(k, m, "isal"), ErasureCode(k, m, backend="numpy")
    data = rand_blocks(np.random.default_rng(8), k, n_bytes)
    pa, pb, ua = empty(m, n_bytes), empty(m, n_bytes), empty(m, n_bytes, 0)
    a.encode(data, pa)
    b.encode(data, pb)
    for j in range(k):
        a.update(ua, j, data[j])
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(pa, pb, ua))
    out = {0: np.empty(n_bytes, np.uint8), 1: np.empty(n_bytes, np.uint8)}
    a.reconstruct({i: s for i, s in enumerate(data + pa) if i > 1}, [0, 1], out)
    assert np.array_equal(out[0], data[0]) and np.array_equal(out[1], data[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_inputs_are_accepted(backend):
    code = code_for(3, 2, backend)
    data = rand_blocks(np.random.default_rng(6), 3, 500)
    for d in data:
        d.setflags(write=False)
    parity = empty(2, 500)
    code.encode(data, parity)
    assert np.array_equal(parity, ref_encode(code.parity_matrix, data))
    frozen = np.frombuffer(bytes(data[0]), dtype=np.uint8)  # read-only, not owned
    acc = np.zeros(500, np.uint8)
    code.mul_accumulate(9, frozen, acc)
    assert np.array_equal(acc, gf.MUL_TABLE[9][data[0]])


def test_allocate_blocks_layout():
    blocks = allocate_blocks(6, 1000)
    assert all(b.dtype == np.uint8 and b.shape == (1000,) and b.flags.c_contiguous for b in blocks)
    assert all(b.ctypes.data % 64 == 0 and not b.any() for b in blocks)
    assert len({b.ctypes.data % 4096 for b in blocks}) == 6
    assert allocate_blocks(2, 10, start=3)[0].ctypes.data % 4096 == (3 * 1088) % 4096
    assert {b.ctypes.data % 4096 for b in allocate_blocks(3, 10, stagger=False)} == {0}
    assert allocate_blocks(2, 0)[0].shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_code_shared_by_threads(backend):
    from concurrent.futures import ThreadPoolExecutor

    code = code_for(6, 3, backend)

    def work(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        data = rand_blocks(rng, 6, 200_000)
        parity = empty(3, 200_000)
        code.encode(data, parity)
        lost = sorted(rng.choice(9, size=3, replace=False).tolist())
        shards = data + parity
        out = {i: np.empty(200_000, np.uint8) for i in lost}
        code.reconstruct({i: s for i, s in enumerate(shards) if i not in lost}, lost, out)
        return all(np.array_equal(out[i], shards[i]) for i in lost)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))


@pytest.mark.parametrize("backend", ["numpy", "isal"])
def test_combine_equals_accumulated_products(backend):
    if backend == "isal" and not isal_available() and not os.environ.get("CI"):
        pytest.skip("ISA-L not loadable")
    code = code_for(4, 2, backend)
    rng = np.random.default_rng(7)
    srcs = [rng.integers(0, 256, 4097, dtype=np.uint8) for _ in range(3)]
    coefs = [1, 37, 200]
    want = np.zeros(4097, np.uint8)
    for c, x in zip(coefs, srcs):
        code.mul_accumulate(c, x, want)
    got = np.full(4097, 0xAB, np.uint8)  # overwritten, not accumulated
    code.combine(coefs, srcs, got)
    assert np.array_equal(got, want)
    with pytest.raises(InvalidRequestError):
        code.combine([1, 2], srcs, got)
