"""Ranged reads of a shard another node holds: only the blocks that cover a byte range.

:class:`RangedReads` serves a ranged FetchShard, and an OpenShard with ``no_copy``
(the manifest only), for a rank this node does not hold. Never the whole shard:

* **the owner is up and holds it**: its manifest (peer op ``rank_manifest``) and only the
  checksum blocks covering the range (``rank_block``; each is verified on arrival against
  the owner's stored checksum), checked again here against the manifest;
* **the owner is down, no longer holds it, or served a corrupt block**: only the stripes
  that hold the covering blocks are decoded from the survivors of its group -- k blocks
  per stripe, planned by :func:`snapshotd.core.repair.plan_repair` with the covering
  blocks as the span, carried out by
  :class:`~snapshotd.node.cluster.repairs.RepairRunner` (a corrupt source is never
  decoded: the stripe is re-planned around it, or the read fails naming it) -- and the
  decoded blocks are verified against the rank's block checksums in the manifest its
  owner announced for the round;
* a whole copy a restore already made on this node (``RemoteCopies``): served from it.

The covering bytes live in an aux segment (reserved against the memory budget like any
copy) until :meth:`RangedData.release`, which the service calls once it has streamed them.

Counters (:meth:`stats`, in the cluster status as ``ranged_reads``): reads per path and
the bytes fetched from peers for them (planned: k blocks per decoded stripe; a stripe
re-planned around a corrupt source fetches more).

Thread-safety: gRPC worker threads call it concurrently; its counters are under its own
lock, everything else goes through its collaborators (each thread-safe).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace

from snapshotd.core.recovery import Unrecoverable
from snapshotd.core.repair import plan_repair
from snapshotd.node.peer import PeerUnavailableError, RemoteError
from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import ChecksumMismatchError, InsufficientShardsError, UnknownJobError

from . import peer_ops
from .degraded import DegradedReads

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on


@dataclass
class RangedData:
    """Blocks [first_block, ...) of a rank's payload, from the first one's start: ``buf``
    holds ``nbytes`` of them (verified). Call :meth:`release` when done with ``buf``."""

    manifest: pb.ShardManifest
    first_block: int
    buf: object  # a buffer (an aux segment's mapping, or a copy's)
    nbytes: int
    _release: object = None

    @property
    def start(self) -> int:
        """The payload offset of ``buf[0]``."""
        return self.first_block * self.manifest.block_size_bytes

    def release(self) -> None:
        if isinstance(self.buf, memoryview):
            self.buf.release()  # the mapping may go now (slices of it were only copied)
        if self._release is not None:
            self._release()
            self._release = None


class RangedReads:
    def __init__(self, *, me: str, block_size_bytes: int, store, membership, commit, repairs,
                 corrupt, copies, reads: DegradedReads):
        self.me, self.bs, self.store, self.membership = me, block_size_bytes, store, membership
        self.commit, self.repairs, self.corrupt, self.copies, self.reads = (
            commit, repairs, corrupt, copies, reads)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stats = {"owner_reads": 0, "owner_bytes": 0, "decoded_reads": 0, "decoded_stripes": 0,
                       "decoded_fetched_bytes": 0, "copy_reads": 0}
        self.last: dict = {}  # the last decoded read's figures

    def stats(self) -> dict:
        with self._lock:
            return {**self._stats, "last_decoded": dict(self.last)}

    def _count(self, **kw) -> None:
        with self._lock:
            for k, x in kw.items():
                self._stats[k] += x

    def _owner(self, job_id: str, rank: int, v: int) -> str:
        owner = self.reads.owner_of(job_id, rank, v)
        if owner is None:
            raise InsufficientShardsError(f"job {job_id!r}: no node is known to hold rank {rank} of version {v}")
        return owner

    def _owner_serves(self, owner: str) -> bool:
        return owner != self.me and owner in self.membership.alive_peers()

    # -- the manifest ---------------------------------------------------------------------
    def manifest(self, job_id: str, rank: int, version: int = 0) -> tuple[str, pb.ShardManifest]:
        """(segment name or "", manifest) of ``rank``'s shard of ``version`` (0 = latest
        committed), moving no payload: a local copy's segment if one was made, else the
        owner's manifest, else the one its owner announced for the round."""
        v = version or self.commit.latest_committed(job_id)
        cached = self.copies.get(job_id, rank, v)
        if cached is not None:
            return cached
        owner = self._owner(job_id, rank, v)
        if self._owner_serves(owner):
            try:
                _, raw = self.membership.peer(owner).call(peer_ops.rank_manifest(job_id, v, rank))
                return "", pb.ShardManifest.FromString(bytes(raw))
            except PeerUnavailableError:
                pass
            except RemoteError as exc:
                if not exc.is_a(UnknownJobError):
                    raise
        elif owner == self.me:
            _, m, _ = self.store.committed_shard(job_id, rank, v, verify=False)
            return "", m
        return "", self.reads.lost_rank(job_id, rank, v, owner, owner_up=owner != self.me).manifest

    # -- the bytes ---------------------------------------------------------------------
    def read(self, job_id: str, rank: int, version: int, offset: int, length: int) -> RangedData:
        """The checksum blocks of ``rank``'s payload covering bytes [offset, offset +
        length) (``length`` 0: to the end), verified (module docstring)."""
        v = version or self.commit.latest_committed(job_id)
        cached = self.copies.get(job_id, rank, v)
        if cached is not None:
            name, m = cached
            b0, b1 = mf.covering_blocks(m, offset, length)
            self._count(copy_reads=1)
            return self._slice(self.store.aux(name).buf, m, b0, b1)
        owner = self._owner(job_id, rank, v)
        if owner == self.me:
            _, m, seg = self.store.committed_shard(job_id, rank, v, verify=False)
            b0, b1 = mf.covering_blocks(m, offset, length)
            out = self._slice(seg.buf, m, b0, b1)
            try:
                mf.verify_blocks(out.buf, m, b0, f"segment of job {job_id!r} rank {rank}")
            except BaseException:
                out.release()
                raise
            return out
        if not self._owner_serves(owner):
            return self._decode(job_id, rank, v, offset, length, owner)
        try:
            return self._from_owner(job_id, rank, v, offset, length, owner)
        except PeerUnavailableError:
            return self._decode(job_id, rank, v, offset, length, owner)
        except RemoteError as exc:
            if not exc.is_a(UnknownJobError):  # NotHeld: not held, or still rebuilding
                raise
            log.info("job %s: %s does not hold rank %d v%d (%s); decoding the range from its group",
                     job_id, owner, rank, v, exc)
            return self._decode(job_id, rank, v, offset, length, owner, owner_up=True)
        except Exception as exc:
            if not (peer_ops.is_corrupt_reply(exc) or isinstance(exc, ChecksumMismatchError)):
                raise
            self.corrupt.note(job_id, v, "data", owner, "ranged read", {"rank": rank})
            try:
                out = self._decode(job_id, rank, v, offset, length, owner, owner_up=True)
            except Exception as exc2:
                raise ChecksumMismatchError(f"{exc}; decoding the range of rank {rank} from the group "
                                            f"failed too: {exc2}") from None
            log.warning("job %s: %s served a corrupt block of rank %d v%d (%s); the range was decoded "
                        "from the group", job_id, owner, rank, v, exc)
            return out

    def _slice(self, buf, m, b0: int, b1: int) -> RangedData:
        bs = m.block_size_bytes
        lo, hi = b0 * bs, min(b1 * bs, m.payload_bytes)
        return RangedData(m, b0, memoryview(buf)[lo:hi], hi - lo)

    def _aux(self, job_id: str, rank: int, v: int, nbytes: int):
        name, seg = self.store.create_aux(f"{job_id}.range.r{rank}.v{v}.{next(self._ids)}",
                                          max(1, nbytes), prefault=False)
        return name, seg

    def _from_owner(self, job_id: str, rank: int, v: int, offset: int, length: int, owner: str) -> RangedData:
        client = self.membership.peer(owner)
        _, raw = client.call(peer_ops.rank_manifest(job_id, v, rank))
        m = pb.ShardManifest.FromString(bytes(raw))
        b0, b1 = mf.covering_blocks(m, offset, length)
        bs = m.block_size_bytes
        n = min(b1 * bs, m.payload_bytes) - b0 * bs
        name, seg = self._aux(job_id, rank, v, n)
        mv = memoryview(seg.buf)

        def put(i, reply, data):
            mv[i * bs:i * bs + len(data)] = data

        try:
            client.call_many([(peer_ops.rank_block(job_id, v, rank, j), None) for j in range(b0, b1)],
                             window=8, on_reply=put)
            mf.verify_blocks(mv[:n], m, b0, f"blocks of rank {rank} from {owner}")
        except BaseException:
            self.store.release_aux(name)  # the mapping goes with the last view of it
            raise
        self._count(owner_reads=1, owner_bytes=n)
        return RangedData(m, b0, mv[:n], n, lambda: self.store.release_aux(name))

    def _decode(self, job_id: str, rank: int, v: int, offset: int, length: int, owner: str,
                owner_up: bool = False) -> RangedData:
        """Decode only the stripes holding the blocks that cover the range (``owner`` down,
        or not serving it) from the survivors of its group."""
        lost = self.reads.lost_rank(job_id, rank, v, owner, owner_up)
        m, span = lost.manifest, lost.span
        if m.block_size_bytes != self.bs:
            raise InsufficientShardsError(f"{lost.what}, and its checksum blocks ({m.block_size_bytes} "
                                          f"bytes) are not the cluster's blocks ({self.bs} bytes)")
        b0, b1 = mf.covering_blocks(m, offset, length)
        covering = replace(span, first=span.first + b0, count=b1 - b0)
        plan = plan_repair(lost.layout, lost.alive, lost.owner_index, version=v, group=lost.group_index,
                           span=covering)
        if isinstance(plan, Unrecoverable):
            raise InsufficientShardsError(f"{lost.what}, and {plan.reason}")
        n = min(b1 * self.bs, m.payload_bytes) - b0 * self.bs
        name, seg = self._aux(job_id, rank, v, n)
        spans = {span.first + i: (seg, (i - b0) * self.bs, span.block_bytes(i, self.bs)) for i in range(b0, b1)}
        fetched = sum(plan.fetch_counts(self.bs).values())
        t0 = time.monotonic()
        try:
            self.repairs.run(job_id, v, plan, spans, None, group=lost.group, layout=lost.layout,
                             alive=lost.alive, found_by="ranged degraded read")
            mf.verify_blocks(memoryview(seg.buf)[:n], m, b0,
                             f"range of rank {rank} decoded from group {lost.group_index}")
        except BaseException:
            self.store.release_aux(name)
            raise
        dt = time.monotonic() - t0
        with self._lock:
            self._stats["decoded_reads"] += 1
            self._stats["decoded_stripes"] += len(plan.repairs)
            self._stats["decoded_fetched_bytes"] += fetched
            self.last = {"job": job_id, "rank": rank, "version": v, "blocks": [b0, b1],
                         "stripes": [rp.stripe for rp in plan.repairs], "fetched_bytes": fetched,
                         "bytes": n, "seconds": round(dt, 4)}
        log.info("%s: decoded blocks %d..%d of %d (%d stripes, %d bytes fetched from %s) in %.2f s",
                 lost.what, b0, b1 - 1, span.count, len(plan.repairs), fetched, list(lost.holders), dt)
        return RangedData(m, b0, memoryview(seg.buf)[:n], n, lambda: self.store.release_aux(name))
