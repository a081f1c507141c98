"""ErasureCode: a systematic MDS Reed-Solomon code over GF(2^8) on numpy buffers.

Shards 0..k-1 are the data blocks, k..k+m-1 the parity blocks; parity = P @ data with P
from :func:`gf.cauchy_parity_matrix` (Cauchy, first row all ones so parity 0 = XOR).
Any k of the k+m shards rebuild all others.

Call order: build one ``ErasureCode(k, m, backend)`` per (k, m) and reuse it (it caches the
expanded coefficient tables). Then either ``encode(data, parity)`` in one go, or start
from zeroed parity buffers and ``update(parity, j, block_j)`` once per data block as blocks
arrive, in any order (a parity holder accumulating contributions); ``mul_accumulate``
applies one received partial product. ``reconstruct(available, want, out)`` rebuilds lost
shards from any k survivors. All buffers are 1-D, C-contiguous uint8 numpy arrays of one
length; outputs are overwritten (update/mul_accumulate: XOR-ed into) and must not overlap
the inputs. Nothing proportional to the data is allocated.

``backend``: the numpy backend by default (or "numpy"), or a backend object such as
``IsalBackend(IsalLibrary(cdll))``; the daemon gets one from
:func:`snapshotd.node.erasure.erasure_code`, which finds and loads ISA-L.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from snapshotd.wire.errors import InsufficientShardsError, InvalidRequestError
from . import gf
from .backend_numpy import NumpyBackend

_DECODE_CACHE_SIZE = 64
_BACKEND_METHODS = ("prepare", "dot", "mad", "mul_acc", "describe")


def _backend_object(backend):
    """``backend``: None or "numpy" (the portable backend), or a backend object (one with
    prepare/dot/mad/mul_acc/describe, e.g. an IsalBackend on a loaded library)."""
    if backend is None or (isinstance(backend, str) and backend == "numpy"):
        return NumpyBackend()
    if isinstance(backend, str):
        raise InvalidRequestError(
            f"unknown erasure backend {backend!r} here: core takes a backend object or 'numpy'; "
            "snapshotd.node.erasure.make_backend / erasure_code find ISA-L ('auto', 'isal')")
    missing = [a for a in _BACKEND_METHODS if not callable(getattr(backend, a, None))]
    if missing:
        raise InvalidRequestError(f"erasure backend {backend!r} lacks {missing}")
    return backend


def _check_buffer(a, what: str, writeable: bool = False) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise InvalidRequestError(f"{what} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.uint8:
        raise InvalidRequestError(f"{what} must have dtype uint8, got {a.dtype}")
    if a.ndim != 1:
        raise InvalidRequestError(f"{what} must be 1-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise InvalidRequestError(f"{what} must be C-contiguous")
    if writeable and not a.flags.writeable:
        raise InvalidRequestError(f"{what} is an output and must be writeable")
    return a


def _check_lengths(named: Sequence[tuple[str, np.ndarray]]) -> int:
    if not named:
        return 0
    n = len(named[0][1])
    bad = [f"{w} has {len(a)}" for w, a in named if len(a) != n]
    if bad:
        raise InvalidRequestError(
            f"all blocks must have the same length ({named[0][0]} has {n} bytes; " + ", ".join(bad) + ")"
        )
    return n


def _index(i, n: int, what: str) -> int:
    if type(i) is not int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise InvalidRequestError(f"{what} must be an int, got {i!r}")
        i = int(i)
    if not 0 <= i < n:
        valid = f"0..{n - 1}" if n else "none (empty)"
        raise InvalidRequestError(f"{what} {i} out of range (valid: {valid})")
    return i


def allocate_blocks(count: int, nbytes: int, stagger: bool = True, start: int = 0) -> list[np.ndarray]:
    """``count`` separate zeroed uint8 blocks, 64-byte aligned, for use as shards.

    With ``stagger`` block i starts at byte ((start + i) * 1088) % 4096 of a page. ISA-L
    reads all sources and writes all outputs at the same position; blocks that share one
    offset modulo 4 KiB *and* are not 64-byte aligned (numpy's large allocations start
    16 bytes into a page, so plain np.empty blocks or slices of one np.empty buffer at
    power-of-two offsets) encode ~25% slower here (7.2 vs 18 GB/s in ANCHORS.md).
    Alignment alone fixes it on this machine; the stagger is cheap insurance.
    """
    if count < 0 or nbytes < 0:
        raise InvalidRequestError("count and nbytes must be >= 0")
    out = []
    for i in range(count):
        raw = np.zeros(nbytes + 8192, dtype=np.uint8)
        base = (-raw.ctypes.data) % 4096
        off = base + (((start + i) * 1088) % 4096 if stagger else 0)
        out.append(raw[off : off + nbytes])
    return out


class ErasureCode:
    """Systematic (k + m) Reed-Solomon code; see the module docstring."""

    def __init__(self, k: int, m: int, backend=None) -> None:
        for name, v in (("k", k), ("m", m)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidRequestError(f"{name} must be an int, got {v!r}")
        k, m = int(k), int(m)
        if k < 1 or m < 0 or k + m > 256:
            raise InvalidRequestError(f"need 1 <= k, 0 <= m and k + m <= 256 (got k={k}, m={m})")
        self.k = k
        self.m = m
        self.n = k + m
        self._backend = _backend_object(backend)
        self.backend_name: str = self._backend.describe()
        self._p = gf.cauchy_parity_matrix(k, m)
        self._p.setflags(write=False)
        self._gen = gf.generator_matrix(k, m)
        self._encode_h = self._backend.prepare(self._p)
        self._decode_cache: dict[tuple, object] = {}
        self._combine_h: dict[tuple, object] = {}

    def __repr__(self) -> str:
        return f"ErasureCode(k={self.k}, m={self.m}, backend={self.backend_name!r})"

    @property
    def parity_matrix(self) -> np.ndarray:
        """The m x k parity coefficients (a read-only copy)."""
        p = self._p.copy()
        p.setflags(write=False)
        return p

    def coefficient(self, parity_index: int, data_index: int) -> int:
        """P[parity_index][data_index]: the factor a data block contributes to a parity."""
        i = _index(parity_index, self.m, "parity_index")
        return int(self._p[i, _index(data_index, self.k, "data_index")])

    # --- encoding -----------------------------------------------------------------

    def encode(self, data: Sequence[np.ndarray], parity: Sequence[np.ndarray]) -> None:
        """parity[i] = sum_j P[i][j] * data[j] for all i (parity buffers overwritten)."""
        if len(data) != self.k:
            raise InvalidRequestError(f"encode needs k={self.k} data blocks, got {len(data)}")
        if len(parity) != self.m:
            raise InvalidRequestError(f"encode needs m={self.m} parity buffers, got {len(parity)}")
        named = [(f"data[{j}]", _check_buffer(a, f"data[{j}]")) for j, a in enumerate(data)]
        named += [(f"parity[{i}]", _check_buffer(a, f"parity[{i}]", True)) for i, a in enumerate(parity)]
        n = _check_lengths(named)
        if self.m:
            self._backend.dot(self._encode_h, data, parity, n)

    def update(self, parity: Sequence[np.ndarray], data_index: int, block: np.ndarray) -> None:
        """parity[i] ^= P[i][data_index] * block for all i (incremental encode)."""
        j = _index(data_index, self.k, "data_index")
        if len(parity) != self.m:
            raise InvalidRequestError(f"update needs m={self.m} parity buffers, got {len(parity)}")
        named = [("block", _check_buffer(block, "block"))]
        named += [(f"parity[{i}]", _check_buffer(a, f"parity[{i}]", True)) for i, a in enumerate(parity)]
        n = _check_lengths(named)
        if self.m:
            self._backend.mad(self._encode_h, j, block, parity, n)

    def combine(self, coefs: Sequence[int], srcs: Sequence[np.ndarray], dst: np.ndarray) -> None:
        """dst = sum_i coefs[i] * srcs[i] (overwritten): one parity row from the blocks
        that are really there, in one pass (reads each source once, writes dst once)."""
        if len(coefs) != len(srcs) or not srcs:
            raise InvalidRequestError("combine needs as many coefficients as sources, >= 1")
        for c in coefs:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < 256:
                raise InvalidRequestError(f"coef must be an int in 0..255, got {c!r}")
        named = [(f"srcs[{i}]", _check_buffer(a, f"srcs[{i}]")) for i, a in enumerate(srcs)]
        named.append(("dst", _check_buffer(dst, "dst", True)))
        n = _check_lengths(named)
        key = tuple(int(c) for c in coefs)
        h = self._combine_h.get(key)
        if h is None:
            h = self._combine_h[key] = self._backend.prepare(np.array([key], dtype=np.uint8))
        self._backend.dot(h, srcs, [dst], n)

    def combine_rows(self, coefs: Sequence[Sequence[int]], srcs: Sequence[np.ndarray],
                     dsts: Sequence[np.ndarray]) -> None:
        """dsts[r] = sum_i coefs[r][i] * srcs[i] for every row r (overwritten), in one
        pass over the sources: several parity rows of one stripe (its accumulator's).
        Each row's bytes are those :meth:`combine` would give it alone."""
        if len(coefs) != len(dsts) or not dsts:
            raise InvalidRequestError("combine_rows needs one coefficient row per destination, >= 1")
        if len(dsts) == 1:
            return self.combine(coefs[0], srcs, dsts[0])
        if not srcs or any(len(row) != len(srcs) for row in coefs):
            raise InvalidRequestError("combine_rows needs as many coefficients per row as sources, >= 1")
        for row in coefs:
            for c in row:
                if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < 256:
                    raise InvalidRequestError(f"coef must be an int in 0..255, got {c!r}")
        named = [(f"srcs[{i}]", _check_buffer(a, f"srcs[{i}]")) for i, a in enumerate(srcs)]
        named += [(f"dsts[{r}]", _check_buffer(a, f"dsts[{r}]", True)) for r, a in enumerate(dsts)]
        n = _check_lengths(named)
        key = tuple(tuple(int(c) for c in row) for row in coefs)
        h = self._combine_h.get(key)
        if h is None:
            h = self._combine_h[key] = self._backend.prepare(np.array(key, dtype=np.uint8))
        self._backend.dot(h, srcs, list(dsts), n)

    def mul_accumulate(self, coef: int, src: np.ndarray, dst: np.ndarray) -> None:
        """dst ^= coef * src (coef 1: plain XOR; 0: nothing)."""
        if isinstance(coef, bool) or not isinstance(coef, (int, np.integer)) or not 0 <= coef < 256:
            raise InvalidRequestError(f"coef must be an int in 0..255, got {coef!r}")
        n = _check_lengths([("src", _check_buffer(src, "src")), ("dst", _check_buffer(dst, "dst", True))])
        if n == 0 or coef == 0:
            return
        if coef == 1:  # the all-ones parity row: a plain XOR at memory speed
            np.bitwise_xor(dst, src, out=dst)
            return
        self._backend.mul_acc(int(coef), src, dst, n)

    # --- decoding -----------------------------------------------------------------

    def choose_sources(self, available: Sequence[int]) -> tuple[int, ...]:
        """The k shard indices a rebuild reads: data shards first, then parity, ascending."""
        avail = sorted(set(int(i) for i in available))
        if len(avail) < self.k:
            missing = sorted(set(range(self.n)) - set(avail))
            raise InsufficientShardsError(
                f"cannot decode: need {self.k} of {self.n} shards (k={self.k}, m={self.m}) but only "
                f"{len(avail)} available {avail}; {len(missing)} missing {missing} "
                f"(at most {self.m} may be lost)"
            )
        data = [i for i in avail if i < self.k]
        par = [i for i in avail if i >= self.k]
        return tuple((data + par)[: self.k])

    def decode_matrix(self, sources: Sequence[int], targets: Sequence[int]) -> np.ndarray:
        """len(targets) x k matrix D with shard[targets] = D @ shard[sources]."""
        src = list(sources)
        if src == list(range(self.k)):
            return self._gen[list(targets)].copy()
        inv = gf.mat_inv(self._gen[src])  # nonsingular: the code is MDS
        return gf.mat_mul(self._gen[list(targets)], inv)

    def _decode_handle(self, sources: tuple[int, ...], targets: tuple[int, ...]):
        # Plain dict, FIFO eviction: tolerant of concurrent callers (ISA-L drops the GIL).
        key = (sources, targets)
        h = self._decode_cache.get(key)
        if h is None:
            h = self._backend.prepare(self.decode_matrix(sources, targets))
            self._decode_cache[key] = h
            while len(self._decode_cache) > _DECODE_CACHE_SIZE:
                try:
                    self._decode_cache.pop(next(iter(self._decode_cache)), None)
                except (StopIteration, RuntimeError):
                    break
        return h

    def reconstruct(
        self,
        available: Mapping[int, np.ndarray],
        want: Sequence[int],
        out: Mapping[int, np.ndarray],
    ) -> None:
        """Rebuild shards ``want`` into ``out[w]`` from any k of ``available``.

        Wanted shards that are available are copied. Raises InsufficientShardsError when
        fewer than k shards are available, InvalidRequestError on malformed input.
        """
        avail = {_index(i, self.n, "available shard index"): a for i, a in available.items()}
        targets = [_index(w, self.n, "wanted shard index") for w in want]
        if len(set(targets)) != len(targets):
            raise InvalidRequestError(f"wanted shard indices repeat: {list(want)}")
        outs = {}
        for w in targets:
            if w not in out:
                raise InvalidRequestError(f"no output buffer for wanted shard {w}")
            outs[w] = out[w]
        named = [(f"available[{i}]", _check_buffer(a, f"available[{i}]")) for i, a in sorted(avail.items())]
        named += [(f"out[{w}]", _check_buffer(outs[w], f"out[{w}]", True)) for w in targets]
        n = _check_lengths(named)
        lost = tuple(w for w in targets if w not in avail)
        sources = self.choose_sources(list(avail)) if lost else ()
        for w in targets:
            if w in avail and outs[w] is not avail[w]:
                np.copyto(outs[w], avail[w])
        if not lost:
            return
        h = self._decode_handle(sources, lost)
        self._backend.dot(h, [avail[s] for s in sources], [outs[w] for w in lost], n)

    def decode_data(self, available: Mapping[int, np.ndarray], out: Sequence[np.ndarray]) -> None:
        """Convenience: all k data shards into ``out`` (copies those that survive)."""
        if len(out) != self.k:
            raise InvalidRequestError(f"decode_data needs k={self.k} output buffers, got {len(out)}")
        self.reconstruct(available, list(range(self.k)), dict(enumerate(out)))
