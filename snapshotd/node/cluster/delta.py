"""Delta parity (issue 16): parity traffic proportional to what changed since the last commit.

Reed-Solomon parity is linear, so for a version v laid out exactly like the committed
version u (same block counts per group member), P_v = P_u + sum_i coef_i * (d_i,v - d_i,u)
(+ and - are XOR in GF(2^8)). A data holder then sends, per block, the *delta*
d_v XOR d_u instead of the block, and for a block that did not change only a header that
says so (``unchanged``: explicit, never inferred from a missing message); the stripe's
accumulator starts row 0 from its committed parity of u instead of zero and forwards the
*change* of rows 1..m-1, which their holders add to their own parity of u. Untouched
stripes cost a header each; the parity is bit-identical to a full encode.

Agreement (both ends must use the same u):
1. With its announce of v, every node offers a base (:meth:`DeltaParity.claim`): its
   committed version u, if it holds u whole and as its own round made it -- its data of u
   (the same ranks), its sealed parity of u accumulated here (not rebuilt, not re-adopted
   after a restart), nothing being rebuilt or degraded, and no other version of ours in
   flight between u and v (which could commit and free u meanwhile). Otherwise 0: none.
   Nor does it offer one while its state changes nearly whole every version (full
   fine-tuning: deltas would save no bytes and cost CPU), trying again now and then.
2. A node sends deltas for v only if every member of its group offered the same u and v's
   layout equals u's (:meth:`DeltaParity.mode`, decided once per version); else every
   contribution is whole, as before. So a replaced node, a rebuilt or restarted one, a
   layout change or a peer that does not know delta parity (its announce has no base)
   turns the whole group's version v into full contributions.
3. Every delta contribution and forwarded row names u (``delta_base``); the receiver
   refuses it (``ConflictError``, re-sent later by the sender) unless it offered u itself
   and holds u's sealed parity (:meth:`DeltaParity.base_buffer`); the parity block of u
   it starts from is checked against its seal-time checksum first (a corrupt one is
   refused and reported to the scrubber, which repairs it).
The sender compares each block with its committed bytes (equal stored checksums, then
the bytes; a changed block and its base are checked against their stored checksums
before the XOR) (:meth:`DeltaParity.reader`).

Knob: ``SNAPSHOTD_DELTA_PARITY=0`` in the daemon's environment turns it off (on by
default). Thread-safety: one lock of its own (never held while taking ``JobTable.lock``).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import xxhash

from snapshotd.node.peer import Deferred
from snapshotd.wire.errors import ChecksumMismatchError, ConflictError

log = logging.getLogger("snapshotd.cluster")

ENV_DELTA_PARITY = "SNAPSHOTD_DELTA_PARITY"
_KEEP_VERSIONS = 64  # (job, version) entries kept per job, newest first
# A state that changes nearly whole every version (full fine-tuning) gains nothing from
# deltas and costs more CPU (both blocks read and checked, the change made, the base
# read): after MOSTLY_CHANGED_RUNS delta versions in a row in which at least
# MOSTLY_CHANGED of our blocks changed, we offer no base, and try again PROBE_EVERY
# versions after the last delta.
MOSTLY_CHANGED, MOSTLY_CHANGED_RUNS, PROBE_EVERY = 0.9, 3, 16


def enabled_from_env() -> bool:
    return os.environ.get(ENV_DELTA_PARITY, "1").strip().lower() not in ("0", "false", "off", "no")


class DeltaParity:
    def __init__(self, *, me: str, my_index: int, group: tuple, block_size_bytes: int, m: int, store, jobs,
                 parity, degraded: dict, suspects=None, enabled: bool | None = None):
        self.me, self.my_index, self.group = me, my_index, tuple(group)
        self.bs, self.m = block_size_bytes, m
        self.store, self.jobs, self.parity, self.degraded = store, jobs, parity, degraded
        self.suspects = suspects  # CorruptBlocks: a corrupt base block is queued for repair
        self.enabled = enabled_from_env() if enabled is None else bool(enabled)
        self._lock = threading.Lock()
        self._bases: dict[tuple[str, int], dict[str, int]] = {}  # (job, v) -> member -> offered base
        self._modes: dict[tuple[str, int], int] = {}  # (job, v) -> the base we send against (0: whole)
        self._delta_on: dict[str, bool] = {}  # job -> whether its last decided version went delta (logged on change)
        self._read: dict[tuple[str, int], list] = {}  # (job, v) of our delta versions -> [changed, blocks]
        self.stats = {"versions_delta": 0, "versions_full": 0, "blocks_unchanged": 0, "blocks_delta": 0,
                      "refused": 0, "not_offered_mostly_changed": 0}
        parity.on_corrupt_base = self._corrupt_base

    # -- what we offer, what the group offered ---------------------------------------------
    def claim(self, job_id: str, v: int) -> int:
        """The base we offer with our announce of v (decided once, then the same on resends)."""
        with self._lock:
            got = self._bases.get((job_id, v), {}).get(self.me)
        if got is not None:
            return got
        u = self._eligible_base(job_id, v)
        with self._lock:
            return self._bases.setdefault((job_id, v), {}).setdefault(self.me, u)

    def _eligible_base(self, job_id: str, v: int) -> int:
        if not self.enabled or not self.m or self._mostly_changed(job_id, v):
            return 0
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            if jp is None or self.jobs.rebuilding_version(job_id) or job_id in self.degraded:
                return 0
            u = jp.committed_version
            ru, rv = jp.rounds.get(u), jp.rounds.get(v)
            if not 0 < u < v or ru is None or ru.layout is None or rv is None:
                return 0
            if any(u < w < v and r.local_data for w, r in jp.rounds.items()):
                return 0  # a version of ours in flight before v could commit and free u
            mine_u, mine_v = ru.announces.get(self.me), rv.announces.get(self.me)
            if mine_u is None or mine_v is None or tuple(mine_u.ranks) != tuple(mine_v.ranks):
                return 0
            # Our parity of u as our own round accumulated it (a rebuilt or re-adopted
            # round has no received contributions): never start from a rebuilt parity.
            if len(ru.received) != len(ru.layout.expected_contributions(self.my_index)):
                return 0
            has_parity = bool(ru.layout.parity_blocks(self.my_index))
            ranks = tuple(mine_u.ranks)
        if has_parity:
            buf = self.parity.get(job_id, u)
            if buf is None or buf.released or not buf.checksums:
                return 0
        if tuple(r for r, _m, _s in self.store.local_shards(job_id, u)) != ranks:
            return 0
        return u

    def _mostly_changed(self, job_id: str, v: int) -> bool:
        """Our last MOSTLY_CHANGED_RUNS delta versions each changed nearly every block, and
        the last was fewer than PROBE_EVERY versions ago."""
        with self._lock:
            recent = sorted((w, c) for (j, w), c in self._read.items() if j == job_id and w < v and c[1])
            recent = recent[-MOSTLY_CHANGED_RUNS:]
            skip = (len(recent) == MOSTLY_CHANGED_RUNS and v - recent[-1][0] < PROBE_EVERY
                    and all(c[0] >= MOSTLY_CHANGED * c[1] for _w, c in recent))
            if skip:
                self.stats["not_offered_mostly_changed"] += 1
            return skip

    def announced(self, job_id: str, v: int, node: str, base: int) -> None:
        """A member's announce of v offered ``base`` (0: none). Call before the announce
        goes into the protocol (it may start our contributions)."""
        with self._lock:
            self._bases.setdefault((job_id, v), {})[node] = max(0, int(base))
            self._trim(job_id)

    def mode(self, job_id: str, v: int, layout) -> int:
        """u if our contributions to v are deltas against u, else 0 (whole): decided once
        per version, when every announce is in (our contributions start only then)."""
        key = (job_id, v)
        with self._lock:
            if key in self._modes:
                return self._modes[key]
            bases = dict(self._bases.get(key, {}))
        u = bases.get(self.me, 0)
        why = "" if u else "this node offered no base"
        if u and any(bases.get(nd) != u for nd in self.group):
            u, why = 0, "bases offered: " + ", ".join(f"{nd} v{bases.get(nd, 0)}" for nd in self.group)
        if u:
            with self.jobs.lock:
                jp = self.jobs.get(job_id)
                ru = jp.rounds.get(u) if jp is not None else None
                if ru is None or ru.layout is None or tuple(ru.layout.block_counts) != tuple(layout.block_counts):
                    u, why = 0, f"the layout differs from v{u}'s"
        with self._lock:
            if key not in self._modes:
                self._modes[key] = u
                self.stats["versions_delta" if u else "versions_full"] += 1
                self._trim(job_id)
                if self.enabled and self._delta_on.get(job_id) != bool(u):
                    self._delta_on[job_id] = bool(u)
                    if u:
                        log.info("job %s v%d: delta parity, changes since v%d", job_id, v, u)
                    else:
                        log.info("job %s v%d: whole contributions (%s)", job_id, v, why)
            return self._modes[key]

    def forget(self, job_id: str, above: int = -1) -> None:
        """The job's versions above ``above`` were fenced (all of them: the job dropped):
        what was offered and decided for them goes, so a version number used again by the
        restarted run is decided afresh."""
        with self._lock:
            for d in (self._bases, self._modes, self._read):
                for k in [k for k in d if k[0] == job_id and k[1] > above]:
                    del d[k]
            self._delta_on.pop(job_id, None)

    def _trim(self, job_id: str) -> None:
        for d in (self._bases, self._modes, self._read):
            old = sorted(k for k in d if k[0] == job_id)[:-_KEEP_VERSIONS]
            for k in old:
                del d[k]

    # -- the receiving side ------------------------------------------------------------------
    def base_buffer(self, job_id: str, v: int, u: int, counts):
        """The sealed parity buffer of u that a delta contribution to v (naming u) is added
        to; ConflictError if we did not offer u for v or no longer hold it whole."""
        with self._lock:
            mine = self._bases.get((job_id, v), {}).get(self.me)
        try:
            if mine != u:
                raise ConflictError(f"{self.me}: delta contribution to job {job_id!r} v{v} against v{u} "
                                    f"refused: this node offered {'v%d' % mine if mine else 'no base'}")
            with self.jobs.lock:
                jp = self.jobs.job(job_id)
                ru = jp.rounds.get(u)
                if ru is None or ru.layout is None or tuple(ru.layout.block_counts) != tuple(counts):
                    raise ConflictError(f"{self.me}: delta contribution to job {job_id!r} v{v} refused: "
                                        f"v{u} is not retained here with the same layout")
            buf = self.parity.get(job_id, u)
            if buf is None or buf.released or not buf.checksums:
                raise ConflictError(f"{self.me}: delta contribution to job {job_id!r} v{v} refused: "
                                    f"no sealed parity of v{u} here")
        except ConflictError:
            with self._lock:
                self.stats["refused"] += 1
            raise
        return buf

    def _corrupt_base(self, job_id: str, u: int, s: int, t: int) -> None:
        with self._lock:
            self.stats["refused"] += 1
        if self.suspects is not None:
            self.suspects.queue_suspect({"job": job_id, "v": u, "kind": "parity", "stripe": s, "row": t})

    # -- the sending side --------------------------------------------------------------------
    def reader(self, job_id: str, v: int, u: int):
        """j -> (payload or None, payload xxh3 or None): whole blocks of v with their stored
        checksums (u = 0), or the delta of block j against u's (None: unchanged), a
        :class:`~snapshotd.node.peer.Deferred` made when it is sent."""
        new = self.store.block_reader(job_id, v, self.bs, with_checksum=True)
        if not u:
            return new
        old = self.store.block_reader(job_id, u, self.bs, with_checksum=True)
        with self._lock:
            seen = self._read.setdefault((job_id, v), [0, 0])  # [changed, blocks]: see _mostly_changed

        def read(j: int):
            dv, cv = new(j)
            du, cu = old(j)
            a, b = np.frombuffer(dv, np.uint8), np.frombuffer(du, np.uint8)
            if (cv is None or cu is None or cv == cu) and np.array_equal(a, b):
                with self._lock:
                    self.stats["blocks_unchanged"] += 1
                    seen[1] += 1
                return None, None
            # Changed: both sides are checked before they go into the parity (the
            # receiver cannot check a delta against anything we stored).
            self._check(job_id, v, j, dv, cv)
            self._check(job_id, u, j, du, cu)
            with self._lock:
                self.stats["blocks_delta"] += 1
                seen[0] += 1
                seen[1] += 1
            # made when sent: a window of changes in memory, not the batch (node/peer/framing.py)
            return Deferred(lambda: np.bitwise_xor(a, b)), None

        return read

    def _check(self, job_id: str, v: int, j: int, view, want) -> None:
        if want is not None and xxhash.xxh3_64_intdigest(view) != want:
            if self.suspects is not None:
                self.suspects.queue_suspect({"job": job_id, "v": v, "kind": "data", "j": j})
            raise ChecksumMismatchError(f"{self.me}: job {job_id!r} v{v}: data block {j} is corrupt "
                                        "(checksum mismatch); not used for a delta")

    def status(self) -> dict:
        with self._lock:
            return {"enabled": self.enabled, **self.stats}
