"""The parity blocks this node holds: one buffer per (job, version), pooled for reuse.

:class:`ParityBuffers` creates a version's :class:`ParityBuffer` on first use (reusing a
released segment's warm pages when one fits), folds received contributions into it
(:meth:`ParityBuffers.add`), seals it (one checksum per block, before our vote), serves
sealed blocks to peers and releases it (into the per-job pool of two, or freed).

The route (issue 16, :func:`snapshotd.core.placement.contribution_targets`): the data
blocks of stripe s reach only its accumulator, the holder of parity row 0. When it
holds them all it computes every row of s in one pass (:meth:`ErasureCode.combine_rows
<snapshotd.core.erasure.code.ErasureCode.combine_rows>`), keeps row 0 and hands rows
1..m-1 to ``on_rows`` (the :class:`~.forward.Forwarder`, which sends them to their
holders); a holder of row t >= 1 stores the forwarded row as it comes
(:meth:`ParityBuffers.put_row`). ``on_rows`` None (or ``forward`` False): every holder
combines its own row from the data blocks, the route before issue 16.

Delta parity (issue 16, :mod:`.delta`): a version whose contributions are deltas against
committed version u is given u's sealed buffer as ``base`` (:meth:`ParityBuffers.add`,
:meth:`ParityBuffers.put_row`); row 0 starts from u's block instead of zero, the rows
forwarded are changes (``None``: no change) that their holders add to u's block, and an
unchanged block comes as ``None``. Every block of u used is checked against its
seal-time checksum first (``on_corrupt_base`` is told of a bad one, and the contribution
is refused). One buffer takes deltas against one base, or whole contributions, never both.

Locks: the map of buffers and the pool are guarded by the job table's lock
(:attr:`JobTable.lock <snapshotd.node.cluster.jobs.JobTable.lock>`); a buffer's held
contributions and its bytes by the buffer's own ``lock``. Lock order: ``JobTable.lock``,
then a ``ParityBuffer.lock``. Combines run under the buffer's lock only, so heartbeats
and votes never wait behind a combine. :meth:`ParityBuffers.buffer` must be called
WITHOUT ``JobTable.lock`` held (it allocates).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import xxhash

from snapshotd.node.peer import Deferred
from snapshotd.wire.errors import ChecksumMismatchError, ConflictError, MemoryBudgetExceededError

from .jobs import JobTable

# Received contributions a parity holder may keep in memory while it waits for the rest
# of their stripes (see ParityBuffer); beyond it, it accumulates block by block.
HELD_CONTRIBUTIONS_MAX_BYTES = 512 << 20


@dataclass
class ParityBuffer:
    """The parity blocks node ``me`` holds for one version: one segment, one slot per block."""

    name: str
    segment: object
    index: dict  # (s, t) -> slot
    block_size: int
    checksums: dict = field(default_factory=dict)  # slot -> xxh3, once complete
    # Contributions are held until a stripe's are all in, then combined in one pass
    # (each source read once, the parity written once) instead of k read-modify-writes.
    need: dict = field(default_factory=dict)  # (s, t) -> contributions still to come
    held: dict = field(default_factory=dict)  # (s, t) -> [(coef, block)]
    held_bytes: int = 0
    direct: set = field(default_factory=set)  # (s, t) accumulated one by one (memory cap)
    # Guards held/direct and the bytes. Lock order: JobTable.lock, then this.
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False  # returned to the pool: late contributions must not write
    job: str = ""
    version: int = 0
    counts: tuple = ()  # the layout's block counts (a forwarded row carries them)
    arrived: dict = field(default_factory=dict)  # (s, t) -> contributions folded, in `direct`
    fwd: dict = field(default_factory=dict)  # s -> rows 1..m-1 being accumulated, in `direct`
    base: "ParityBuffer | None" = None  # delta parity: the committed version's sealed buffer
    mode_set: bool = False  # whole or delta (against `base`) fixed by the first contribution

    def view(self, s: int, t: int) -> np.ndarray:
        i = self.index[(s, t)]
        return np.frombuffer(self.segment.buf, np.uint8, self.block_size, i * self.block_size)


class ParityBuffers:
    def __init__(self, store, jobs: JobTable, code, my_index: int, block_size_bytes: int, m: int):
        self.store, self.jobs, self.code = store, jobs, code
        self.my_index, self.bs, self.m = my_index, block_size_bytes, m
        self._buffers: dict[tuple[str, int], ParityBuffer] = {}
        self._pool: dict[str, list] = {}  # job -> [(name, segment)] free for reuse
        # (job, v) -> set once its buffer is made: a second caller waits instead of
        # allocating a second one (the commit worker builds ahead, contributions on demand).
        self._creating: dict[tuple[str, int], threading.Event] = {}
        self.accumulate_stats = [0.0, 0]  # CPU seconds spent combining contributions, bytes in
        # The accumulator's rows 1..m-1 of a stripe go to on_rows(job, v, s, counts,
        # [(t, block)]), called under the buffer's lock: it must only queue them.
        self.on_rows = None
        self.forward = True
        self.held_peak_bytes = 0  # the most contributions one buffer held at once (memory)
        self.on_corrupt_base = None  # (job, u, s, t): a delta's base block failed its checksum

    # -- lookup ---------------------------------------------------------------------------
    def get(self, job_id: str, v: int) -> ParityBuffer | None:
        with self.jobs.lock:
            return self._buffers.get((job_id, v))

    def names(self) -> set[str]:
        with self.jobs.lock:
            return {buf.name for buf in self._buffers.values()}

    def bytes_per_job(self) -> dict[str, int]:
        with self.jobs.lock:
            out: dict[str, int] = {}
            for (job, _v), buf in self._buffers.items():
                out[job] = out.get(job, 0) + buf.segment.size
            return out

    def sealed_slots(self, job_id: str, v: int) -> list:
        """[(s, t)] by slot of a sealed, held buffer of version v; [] otherwise."""
        buf = self.get(job_id, v)
        if buf is not None and not buf.released and buf.checksums:
            return [b for b, _ in sorted(buf.index.items(), key=lambda x: x[1])]
        return []

    def slot_of(self, job_id: str, v: int, s: int, t: int) -> int | None:
        buf = self.get(job_id, v)
        return buf.index.get((s, t)) if buf is not None else None

    def sealed_block(self, job_id: str, v: int, s: int, t: int, me: str):
        """(block view, its stored xxh3) for a peer's fetch."""
        buf = self.get(job_id, v)
        if buf is None:
            raise KeyError(f"no parity for job {job_id!r} version {v} here")
        view = buf.view(s, t)
        want = buf.checksums.get(buf.index[(s, t)])
        if want is None:
            raise ChecksumMismatchError(f"{me}: parity of job {job_id!r} v{v} is not sealed")
        return view, want

    def room_needed(self, job_id: str, also=()) -> int:
        """Bytes the job's versions in flight may still need here for parity buffers not
        made yet (issue 18): the size of the job's largest parity buffer (held, pooled, or
        from a round's layout) for each uncommitted version without one (``also``: versions
        the protocol may not know yet, e.g. one just adopted), less the pooled segments that
        will serve them. A stage-ahead grant keeps this room (service ``_stage_next``).
        0 while no size is known yet (before the job's first layout)."""
        if not self.m:
            return 0
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            committed = jp.committed_version if jp is not None else 0
            rounds = dict(jp.rounds) if jp is not None else {}
            pool = self._pool.get(job_id, [])
            sizes = [b.segment.size for (j, _v), b in self._buffers.items() if j == job_id]
            sizes += [seg.size for _, seg in pool]
            sizes += [max(1, len(r.layout.parity_blocks(self.my_index))) * self.bs
                      for v, r in rounds.items() if v > committed and r.layout is not None]
            if not sizes:
                return 0
            # A buffer being made counts as missing: its allocation may not be reserved yet.
            missing = {v for v in (*rounds, *also) if v > committed and (job_id, v) not in self._buffers}
            return max(0, len(missing) - len(pool)) * max(sizes)

    # -- creating, sealing, releasing -------------------------------------------------------
    def buffer(self, job_id: str, v: int, layout, prefault: bool = True) -> ParityBuffer:
        """The parity buffer of version v, created on first use. Must be called WITHOUT
        holding ``JobTable.lock``: creating one allocates and maps up to m/k of the data,
        which must not stall the heartbeats (they take the lock) -- a peer whose
        heartbeats stall is taken for dead."""
        key = (job_id, v)
        while True:
            with self.jobs.lock:
                pb_ = self._buffers.get(key)
                if pb_ is not None:
                    return pb_
                making = self._creating.get(key)
                if making is None:
                    making = self._creating[key] = threading.Event()
                    break
            making.wait(30)  # another thread makes it (or gave up: then we try)
        try:
            return self._make(key, layout, prefault)
        finally:
            with self.jobs.lock:
                self._creating.pop(key, None)
            making.set()

    def _make(self, key: tuple[str, int], layout, prefault: bool) -> ParityBuffer:
        job_id, v = key
        with self.jobs.lock:
            blocks = layout.parity_blocks(self.my_index)
            size = max(1, len(blocks)) * self.bs
            pool = self._pool.setdefault(job_id, [])
            fit = next((x for x in pool if x[1].size >= size), None)
            if fit is not None:  # warm pages of a released version: reuse (see below)
                pool.remove(fit)
        if fit is not None:
            name, seg = fit
        else:  # fresh pages are zero
            name, seg = self._create(job_id, size, prefault)
        pb_ = ParityBuffer(name, seg, {b: i for i, b in enumerate(blocks)}, self.bs,
                           job=job_id, version=v, counts=tuple(layout.block_counts))
        for s_, t, _p, _src, _j in layout.expected_contributions(self.my_index):
            pb_.need[(s_, t)] = pb_.need.get((s_, t), 0) + 1
        if fit is not None:
            # A reused segment holds an older version's parity. Stripes with real
            # contributions are overwritten by their one-pass combine (or zeroed when
            # they fall back to accumulating, _flush_held); only stripes made of
            # virtual zero blocks alone must be zeroed here. Saves a memset of the
            # whole buffer per version.
            for b in blocks:
                if b not in pb_.need:
                    pb_.view(*b)[:] = 0
        with self.jobs.lock:
            other = self._buffers.get(key)
            if other is not None:  # created meanwhile by another thread: keep that one
                self._pool.setdefault(job_id, []).append((name, seg))
                return other
            self._buffers[key] = pb_
            # Uncommitted rounds that can no longer commit must not pile up.
            stale = sorted(k for k in self._buffers if k[0] == job_id and k[1] < v)[:-2]
            for k in stale:
                if k[1] != self.jobs.job(job_id).committed_version:
                    self.release(k)
        return pb_

    def _create(self, job_id: str, size: int, prefault: bool):
        """A fresh parity segment. Refused for memory, the pooled segments (of every job:
        warm pages kept for reuse, nothing committed) are freed and it is tried once more;
        refused again, the error goes to the caller and the version's contributions and vote
        are re-sent with a backoff (:mod:`.resend`), so the buffer is tried again when
        memory frees (issue 18)."""
        suffix = f"{job_id}.parity.{os.urandom(4).hex()}"
        try:
            return self.store.create_aux(suffix, size, prefault=prefault)
        except MemoryBudgetExceededError:
            with self.jobs.lock:
                pooled = [name for pool in self._pool.values() for name, _ in pool]
                self._pool = {}
            if not pooled:
                raise
            for name in pooled:
                self.store.release_aux(name)
            return self.store.create_aux(suffix, size, prefault=prefault)

    def adopt(self, job_id: str, v: int, name: str, seg, blocks, checksums) -> None:
        """After a restart: the sealed buffer of version v, from its round record."""
        with self.jobs.lock:
            self._buffers[(job_id, v)] = ParityBuffer(
                name, seg, {tuple(b): i for i, b in enumerate(blocks)}, self.bs,
                {i: c for i, c in enumerate(checksums) if c is not None}, job=job_id, version=v)

    def seal(self, job_id: str, v: int) -> None:
        """Before voting (and at the latest at the commit): make sure the parity buffer
        exists (zeros when no real data fell into our stripes) and record one checksum
        per parity block. Once sealed, a buffer is not hashed again."""
        if not self.m:
            return
        with self.jobs.lock:
            r = self.jobs.job(job_id).rounds.get(v)
            if r is None or r.layout is None:
                return
            layout = r.layout
        buf = self.buffer(job_id, v, layout)
        with buf.lock:
            if buf.released or buf.checksums:
                return
            if buf.held:  # defensive: nothing may stay unapplied once sealed
                self._flush_held(buf)
            buf.checksums = {i: xxhash.xxh3_64_intdigest(
                memoryview(buf.segment.buf)[i * self.bs:(i + 1) * self.bs])
                for i in range(len(buf.index))}

    def release(self, key) -> None:
        """Keep up to two released parity segments per job for the next versions:
        writing into fresh pages costs ~1.5 GB/s, into reused ones ~13 GB/s."""
        with self.jobs.lock:
            pb_ = self._buffers.pop(key, None)
            if pb_ is None:
                return
            with pb_.lock:  # a combine in progress finishes first; later ones see released
                pb_.released = True
            pool = self._pool.setdefault(key[0], [])
            if len(pool) < 2:
                pool.append((pb_.name, pb_.segment))
            else:
                self.store.release_aux(pb_.name)

    def release_older(self, job_id: str, v: int) -> None:
        """Release the job's buffers of versions before v (v committed)."""
        with self.jobs.lock:
            for key in [k for k in self._buffers if k[0] == job_id and k[1] < v]:
                self.release(key)

    def drop_job(self, job_id: str) -> int:
        """Release every buffer of the job and its pool. Returns the bytes freed."""
        with self.jobs.lock:
            keys = [k for k in self._buffers if k[0] == job_id]
            freed = sum(self._buffers[k].segment.size for k in keys)
            freed += sum(seg.size for _, seg in self._pool.get(job_id, []))
            for key in keys:
                self.release(key)  # into the pool (or freed), which goes next
            for name, _ in self._pool.pop(job_id, []):
                self.store.release_aux(name)
            return freed

    # -- accumulating contributions ---------------------------------------------------------
    def _rows(self, t: int) -> list[int]:
        """The parity rows a contribution for row t feeds here: all m at the accumulator
        (row 0) when we forward, else row t alone."""
        return list(range(self.m)) if t == 0 and self.m > 1 and self.forward and self.on_rows else [t]

    def add(self, buf: ParityBuffer, s: int, t: int, p: int, data, base: ParityBuffer | None = None) -> bool:
        """Fold one contribution (data position p of stripe s, for parity row t) into
        ``buf`` (at the accumulator, into every row of s; rows 1..m-1 are forwarded once
        the stripe is whole). With ``base`` (delta parity) ``data`` is the block's change
        since the base's version, None if it did not change. One sender's contributions
        arrive one at a time, so no (s, t, p) is ever applied by two threads at once.
        False if the buffer was released meanwhile."""
        if isinstance(data, Deferred):  # a delta made when it is used (cluster/delta.py)
            data = data.make()
        block = None if data is None else np.frombuffer(data, np.uint8)
        if block is None and base is None:
            raise ValueError("an unchanged block is a delta: it needs its base")
        key = (s, t)
        rows = self._rows(t)
        pm = self.code.parity_matrix
        with buf.lock:
            if buf.released:  # the round was dropped meanwhile
                return False
            self._set_mode(buf, base)
            if key in buf.direct:
                dsts = self._direct_rows(buf, s, t, rows)
                if block is not None:
                    for r, dst in zip(rows, dsts):
                        self.code.mul_accumulate(int(pm[r, p]), block, dst)
                buf.arrived[key] = buf.arrived.get(key, 0) + 1
                if buf.arrived[key] >= buf.need.get(key, 0):
                    self._forward(buf, s, rows, dsts)
                    buf.fwd.pop(s, None)
            else:
                held = buf.held.setdefault(key, [])
                held.append((p, block))
                nbytes = 0 if block is None else block.nbytes
                buf.held_bytes += nbytes
                self.held_peak_bytes = max(self.held_peak_bytes, buf.held_bytes)
                try:
                    if len(held) >= buf.need.get(key, 0):
                        t0 = time.thread_time()  # CPU time: the cores are shared
                        dsts = self._combine(buf, s, t, rows, [(p_, b) for p_, b in held if b is not None])
                        self.accumulate_stats[0] += time.thread_time() - t0
                        buf.held_bytes -= sum(b.nbytes for _, b in buf.held.pop(key) if b is not None)
                        self._forward(buf, s, rows, dsts)
                    elif buf.held_bytes > HELD_CONTRIBUTIONS_MAX_BYTES:
                        self._flush_held(buf)
                except (ConflictError, ChecksumMismatchError):
                    # A delta's base refused: nothing changed, this contribution is not
                    # taken (the sender sends it again; the protocol still expects it).
                    held.pop()
                    buf.held_bytes -= nbytes
                    raise
        return True

    def _combine(self, buf: ParityBuffer, s: int, t: int, rows: list, held: list) -> list:
        """Row t of stripe s (into the buffer) and the rows forwarded from it, in one pass
        over the contributions ``held`` [(p, block)]. Delta parity: row t starts from the
        base's block (one more source, coefficient 1 in row t, 0 in the others) and the
        forwarded rows are changes; all None when nothing of the stripe changed."""
        pm = self.code.parity_matrix
        dst = buf.view(s, t)
        srcs = [b for _, b in held]
        coefs = [[int(pm[r, p_]) for p_, _ in held] for r in rows]
        if buf.base is not None:
            old = self._base_block(buf, s, t)
            if not held:  # the whole stripe is unchanged
                dst[:] = old
                return [dst] + [None for _ in rows[1:]]
            srcs.append(old)
            for i, row in enumerate(coefs):
                row.append(1 if i == 0 else 0)
        dsts = [dst] + [np.empty(self.bs, np.uint8) for _ in rows[1:]]
        self.code.combine_rows(coefs, srcs, dsts)
        self.accumulate_stats[1] += sum(b.nbytes for b in srcs)
        return dsts

    def _set_mode(self, buf: ParityBuffer, base: ParityBuffer | None) -> None:
        """Under ``buf.lock``: the first contribution fixes whole or delta (against one
        base); a contribution of the other kind is refused."""
        if not buf.mode_set:
            buf.base, buf.mode_set = base, True
        elif buf.base is not base:
            have = f"deltas against v{buf.base.version}" if buf.base is not None else "whole contributions"
            got = f"a delta against v{base.version}" if base is not None else "a whole one"
            raise ConflictError(f"parity of job {buf.job!r} v{buf.version} takes {have}, not {got}")

    def _base_block(self, buf: ParityBuffer, s: int, t: int) -> np.ndarray:
        """A copy of block (s, t) of the delta's base, checked against its seal-time
        checksum (lock order: ``buf.lock``, then the base's: a sealed base takes no adds)."""
        base = buf.base
        with base.lock:
            slot = base.index.get((s, t))
            if base.released or slot is None or slot not in base.checksums:
                raise ConflictError(f"parity block ({s}, {t}) of job {buf.job!r} v{base.version} "
                                    "is no longer held: refused as a delta base")
            old = np.array(base.view(s, t))
            want = base.checksums[slot]
        if xxhash.xxh3_64_intdigest(old) != want:
            if self.on_corrupt_base is not None:
                self.on_corrupt_base(buf.job, base.version, s, t)
            raise ChecksumMismatchError(f"parity block ({s}, {t}) of job {buf.job!r} v{base.version} is "
                                        "corrupt (checksum mismatch): refused as a delta base")
        return old

    def _direct_rows(self, buf: ParityBuffer, s: int, t: int, rows: list) -> list:
        """The destinations of a stripe accumulated block by block: our row, then the
        rows we forward (zeroed when first needed)."""
        extra = buf.fwd.get(s)
        if extra is None and len(rows) > 1:
            extra = buf.fwd[s] = [np.zeros(self.bs, np.uint8) for _ in rows[1:]]
        return [buf.view(s, t)] + (extra or [])

    def _forward(self, buf: ParityBuffer, s: int, rows: list, dsts: list) -> None:
        if len(rows) > 1:
            more = {"base": buf.base.version} if buf.base is not None else {}
            self.on_rows(buf.job, buf.version, s, buf.counts, list(zip(rows[1:], dsts[1:])), **more)

    def put_row(self, buf: ParityBuffer, s: int, t: int, data, base: ParityBuffer | None = None) -> bool:
        """Store parity row t of stripe s as its accumulator forwarded it: whole, or (with
        ``base``) the row's change since the base's version, added to the base's block
        (None: unchanged). Idempotent (a re-sent row has the same bytes, and the result
        is computed from the base, not from what is stored). False if the buffer was released."""
        block = None if data is None else np.frombuffer(data, np.uint8)
        if block is None and base is None:
            raise ValueError("an unchanged parity row is a delta: it needs its base")
        with buf.lock:
            if buf.released:
                return False
            self._set_mode(buf, base)
            dst = buf.view(s, t)
            if base is None:
                dst[:] = block
            elif block is None:
                dst[:] = self._base_block(buf, s, t)
            else:
                np.bitwise_xor(self._base_block(buf, s, t), block, out=dst)
            self.accumulate_stats[1] += self.bs if block is not None else 0
        return True

    def _flush_held(self, buf: ParityBuffer) -> None:
        """Too much held in memory: fold what is held into the parity now and
        accumulate those stripes' later contributions one by one."""
        pm = self.code.parity_matrix
        # Delta parity starts from the base: every base block is read (and checked) before
        # anything changes, so a refused one leaves the buffer as it was.
        starts = {key: 0 if buf.base is None else self._base_block(buf, *key) for key in buf.held}
        for (s, t), held in buf.held.items():
            rows = self._rows(t)
            dsts = self._direct_rows(buf, s, t, rows)
            dsts[0][:] = starts[(s, t)]  # a reused segment: not yet overwritten by a combine
            for p, b in held:
                if b is None:  # unchanged (delta parity)
                    continue
                for r, dst in zip(rows, dsts):
                    self.code.mul_accumulate(int(pm[r, p]), b, dst)
            buf.arrived[(s, t)] = len(held)
            buf.direct.add((s, t))
        buf.held.clear()
        buf.held_bytes = 0
