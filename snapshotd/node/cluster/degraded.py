"""Reading other nodes' shards: a copy from the owner, or a degraded read decoded from its group.

:class:`DegradedReads` serves a restore that needs a rank this node does not hold (data-
parallel slices, a replaced node): :meth:`owner_of` finds the node holding it,
:meth:`open_remote_shard` copies it from there (checksum-verified) and, when the owner is
down, no longer holds it or serves a corrupt copy, decodes the rank's blocks from the
survivors of the owner's group (:func:`snapshotd.core.repair.plan_repair` restricted to
that rank, carried out by :class:`~snapshotd.node.cluster.repairs.RepairRunner`).
:meth:`decode_own_rank` does the same for our own copy when it failed its checksum.

Copies are kept in :class:`~snapshotd.node.cluster.copies.RemoteCopies` until a newer
version commits. Thread-safe: called from gRPC worker threads; shared state only in the
job table and the copies (both under ``JobTable.lock``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from snapshotd.core.blockmap import RankSpan, map_manifests
from snapshotd.core.recovery import Unrecoverable
from snapshotd.core.repair import plan_repair
from snapshotd.node.peer import PeerUnavailableError, RemoteError
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import ChecksumMismatchError, InsufficientShardsError, UnknownJobError

from . import peer_ops
from .commit import CommitDriver
from .copies import RemoteCopies
from .corrupt import CorruptBlocks
from .jobs import JobTable
from .membership import Membership
from .records import RoundRecords
from .repairs import RepairRunner

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on


class DegradedReads:
    def __init__(self, *, spec, me: str, group: tuple[str, ...], block_size_bytes: int, store, jobs: JobTable,
                 membership: Membership, records: RoundRecords, commit: CommitDriver,
                 repairs: RepairRunner, corrupt: CorruptBlocks, copies: RemoteCopies):
        self.spec, self.me, self.group, self.bs = spec, me, group, block_size_bytes
        self.store, self.jobs, self.membership, self.records = store, jobs, membership, records
        self.commit, self.repairs, self.corrupt, self.copies = commit, repairs, corrupt, copies

    def owner_of(self, job_id: str, rank: int, version: int = 0) -> str | None:
        """The node that holds ``rank``: from the votes seen, else from a peer's record
        of the round (a replacement node that could not rebuild has seen no votes;
        votes stay in the group, so a rank of another group is asked of its nodes)."""
        with self.jobs.lock:
            owner = self.jobs.job(job_id).rank_nodes.get(rank)
        if owner is not None:
            return owner
        v = version or self.commit.latest_committed(job_id)
        for node in list(self.group) + [nd.id for nd in self.spec.nodes if nd.id not in self.group]:
            if node == self.me or not v:
                continue
            try:
                rec = self.records.fetch_record(node, job_id, v)
            except (PeerUnavailableError, RemoteError):
                continue
            except ValueError as exc:
                log.warning("job %s v%d: refused the round record %s served: %s", job_id, v, node, exc)
                continue
            with self.jobs.lock:
                jp = self.jobs.job(job_id)
                for rk, nd in rec.rank_nodes.items():
                    jp.rank_nodes.setdefault(rk, nd)
                if rank in jp.rank_nodes:
                    return jp.rank_nodes[rank]
        return None

    def open_remote_shard(self, job_id: str, rank: int, version: int = 0):
        """Copy another node's committed shard of ``rank`` into a local segment (for a
        restore that gathers data-parallel slices). Returns (segment name, manifest)."""
        v = version or self.commit.latest_committed(job_id)
        cached = self.copies.get(job_id, rank, v)
        if cached is not None:
            return cached
        owner = self.owner_of(job_id, rank, v)
        if owner is None:
            raise InsufficientShardsError(
                f"job {job_id!r}: no node is known to hold rank {rank} of version {v}")
        if owner != self.me and owner not in self.membership.alive_peers():
            return self._degraded_copy(job_id, rank, v, owner)
        try:
            name, m = self._copy_from_owner(job_id, rank, v, owner)
        except PeerUnavailableError:
            return self._degraded_copy(job_id, rank, v, owner)
        except RemoteError as exc:
            if not exc.is_a(UnknownJobError):  # NotHeld: not held, or still rebuilding
                raise
            # The owner is up but does not hold it, or no longer (a replacement still
            # rebuilding, one that has not even learnt of the job yet, or one that
            # cannot): decode it from the group, or say why not.
            log.info("job %s: %s does not hold rank %d v%d (%s); decoding it from its group",
                     job_id, owner, rank, v, exc)
            return self._degraded_copy(job_id, rank, v, owner, owner_up=True)
        except Exception as exc:
            if not (peer_ops.is_corrupt_reply(exc) or isinstance(exc, ChecksumMismatchError)):
                raise
            return self._decode_corrupt_copy(job_id, rank, v, owner, "restore copy", exc)
        self.copies.put(job_id, rank, v, name, m)
        return name, m

    def decode_own_rank(self, job_id: str, rank: int, v: int, why: Exception):
        """Our own copy of ``rank`` failed its checksum (a bit flipped in RAM, say): never
        serve it. Decode the rank from the other nodes of our group instead, as a degraded
        read would, and leave our block to the scrubber (which also repairs it). With too
        few good sources the restore fails with the checksum error, and the reason.
        Returns (segment name, manifest) like ``open_remote_shard``."""
        cached = self.copies.get(job_id, rank, v)
        if cached is not None:
            return cached
        return self._decode_corrupt_copy(job_id, rank, v, self.me, "restore", why)

    def _copy_from_owner(self, job_id: str, rank: int, v: int, owner: str):
        """Copy ``owner``'s shard of ``rank`` into a local aux segment, checksum-verified."""
        client = self.membership.peer(owner)
        _, raw = client.call(peer_ops.rank_manifest(job_id, v, rank))
        m = pb.ShardManifest.FromString(bytes(raw))
        name, seg = self.store.create_aux(f"{job_id}.remote.r{rank}.v{v}", max(1, m.payload_bytes))
        bs = m.block_size_bytes
        reqs = [(peer_ops.rank_block(job_id, v, rank, j), None)
                for j in range((m.payload_bytes + bs - 1) // bs)]
        mv = memoryview(seg.buf)

        def put(i, reply, data):
            mv[i * bs:i * bs + len(data)] = data

        try:
            client.call_many(reqs, window=8, on_reply=put)
            self.store.verify_payload(seg.buf, m, f"copy of rank {rank} from {owner}")
        except BaseException:
            self.store.release_aux(name)
            raise
        return name, m

    def _decode_corrupt_copy(self, job_id: str, rank: int, v: int, owner: str, found_by: str,
                             why: Exception):
        """``owner``'s copy of ``rank`` failed its checksum: never use it. Report the
        block, decode the rank from the rest of the owner's group (checksums verified)
        and leave the block to the owner's scrubber. With fewer than k good sources: the
        checksum error, and why the decode failed too."""
        self.corrupt.note(job_id, v, "data", owner, found_by, {"rank": rank})
        try:
            out = self._degraded_copy(job_id, rank, v, owner, owner_up=True)
        except Exception as exc:
            raise ChecksumMismatchError(f"{why}; decoding rank {rank} from the group failed too: "
                                        f"{exc}") from None
        log.warning("job %s: %s's copy of rank %d v%d failed its checksum (%s); served a copy "
                    "decoded from the group", job_id, owner, rank, v, why)
        return out

    def lost_rank(self, job_id: str, rank: int, v: int, owner: str, owner_up: bool = False) -> "LostRank":
        """What decoding ``owner``'s shard of ``rank`` from its group needs: the survivors
        that retain version v, its layout, the rank's span in the owner's data and its
        manifest (from the owner's announce in the round record). InsufficientShardsError
        when no survivor retains the version or the announce lacks the rank."""
        gi, oi = self.spec.group_of(owner)
        group = tuple(self.spec.groups[gi])
        alive = self.membership.alive_peers() | {self.me}
        record, holders = self.records.retained_round(job_id, v, [x for x in group if x != owner and x in alive])
        what = (f"job {job_id!r} rank {rank} version {v}: its node {owner} "
                + ("no longer holds it" if owner_up else "is down"))
        if record is None or owner not in record.announces:
            raise InsufficientShardsError(f"{what} and no live node of its group {gi} retains the version")
        ann = record.announces[owner]
        ranks = list(ann.ranks)
        manifests = [pb.ShardManifest.FromString(blob) for blob in ann.manifests]
        span = map_manifests(ranks, manifests, self.bs).span_of(rank)
        if span is None:
            raise InsufficientShardsError(f"{what}, and its announce does not list that rank")
        return LostRank(what=what, group=group, group_index=gi, owner_index=oi,
                        layout=self.records.layout_of(record), holders=tuple(holders),
                        alive=frozenset(group.index(x) for x in holders), span=span,
                        manifest=manifests[ranks.index(rank)])

    def _degraded_copy(self, job_id: str, rank: int, v: int, owner: str, owner_up: bool = False):
        """A degraded read: ``owner`` is down, so decode its shard of ``rank`` from the
        survivors of owner's group (k blocks per lost block, as a rebuild would, but only
        that rank's data blocks). Returns (segment name, manifest) like a copy."""
        lost = self.lost_rank(job_id, rank, v, owner, owner_up)
        span, m = lost.span, lost.manifest
        plan = plan_repair(lost.layout, lost.alive, lost.owner_index, version=v, group=lost.group_index,
                           span=span)
        if isinstance(plan, Unrecoverable):
            raise InsufficientShardsError(f"{lost.what}, and {plan.reason}")
        name, seg = self.store.create_aux(f"{job_id}.remote.r{rank}.v{v}", max(1, m.payload_bytes))
        spans = {span.first + i: (seg, i * self.bs, span.block_bytes(i, self.bs)) for i in range(span.count)}
        t0 = time.monotonic()
        try:
            self.repairs.run(job_id, v, plan, spans, None, group=lost.group, layout=lost.layout,
                             alive=lost.alive, found_by="degraded read")
            self.store.verify_payload(seg.buf, m, f"degraded read of rank {rank} (node {owner} down)")
        except Exception:
            self.store.release_aux(name)
            raise
        log.info("%s: decoded its %d bytes from %s in %.2f s", lost.what, m.payload_bytes,
                 list(lost.holders), time.monotonic() - t0)
        self.copies.put(job_id, rank, v, name, m)
        return name, m


@dataclass(frozen=True)
class LostRank:
    """A rank whose owner cannot serve it, as its group's survivors see it
    (:meth:`DegradedReads.lost_rank`)."""

    what: str  # "job 'x' rank r version v: its node n is down", for errors and logs
    group: tuple[str, ...]  # the owner's group
    group_index: int
    owner_index: int  # the owner's group-local index
    layout: object  # the retained round's GroupLayout
    holders: tuple[str, ...]  # the survivors that retain the round
    alive: frozenset[int]  # their group-local indices
    span: RankSpan  # the rank's blocks in the owner's data
    manifest: object  # the rank's ShardManifest
