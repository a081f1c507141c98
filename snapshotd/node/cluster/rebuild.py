"""Rebuilding this node's data and parity of a version from its group's survivors.

:class:`Rebuilder` catches up at start (:meth:`catch_up`: every job whose committed
version we do not hold), makes a version restorable before a restore
(:meth:`ensure_restorable`: promote it, or rebuild it) and rebuilds (:meth:`rebuild`):
retained round from a peer -> :func:`snapshotd.core.repair.plan_repair` -> fresh
segments -> :class:`~snapshotd.node.cluster.repairs.RepairRunner` -> verify -> commit.
Nothing half-rebuilt stays behind when it fails.

Thread-safety: one rebuild at a time (its own lock); while it runs, the version is
marked in the job table (a fence keeps its slots, peers may not copy from them).
"""

from __future__ import annotations

import logging
import threading
import time

from snapshotd.core.blockmap import map_manifests
from snapshotd.core.recovery import Unrecoverable
from snapshotd.core.repair import plan_repair
from snapshotd.node.metrics import NullMetrics
from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import InsufficientShardsError

from . import peer_ops
from .commit import CommitDriver
from .jobs import JobTable
from .membership import Membership
from .parity import ParityBuffers
from .records import RoundRecords
from .repairs import RepairRunner

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on


class Rebuilder:
    def __init__(self, *, spec, me: str, my_index: int, group: tuple[str, ...], group_index: int,
                 block_size_bytes: int, store, jobs: JobTable, parity: ParityBuffers,
                 records: RoundRecords, commit: CommitDriver, membership: Membership,
                 repairs: RepairRunner, degraded: dict, stop: threading.Event):
        self.spec, self.me, self.my_index, self.group = spec, me, my_index, group
        self.group_index, self.m, self.bs = group_index, spec.parity, block_size_bytes
        self.store, self.jobs, self.parity, self.records = store, jobs, parity, records
        self.commit, self.membership, self.repairs = commit, membership, repairs
        self.degraded = degraded
        self._stop = stop
        self._lock = threading.Lock()  # one rebuild at a time
        self.stats: dict = {}  # the last rebuild's figures (status "last_rebuild")
        self.metrics = NullMetrics()  # set by ClusterNode.metrics

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.catch_up, name="snapshotd-catch-up", daemon=True)
        t.start()
        return t

    def catch_up(self) -> None:
        """At start: rebuild every job whose committed version we do not hold (a node
        that comes back empty, or missed a commit while down). Retries until done."""
        if len(self.group) == 1:
            return
        self._stop.wait(2 * self.spec.heartbeat_interval_ms / 1000)
        while not self._stop.is_set():
            pending = True  # until some peer answers: a lone node keeps asking
            retry = False
            for node in self.group:
                if node == self.me:
                    continue
                try:
                    rep, _ = self.membership.peer(node).call(peer_ops.jobs())
                except Exception as exc:  # any failure: ask the next peer, retry later
                    log.debug("catch-up: %s did not answer: %s", node, exc)
                    continue
                pending = False
                for job_id, summary in rep.jobs.jobs.items():
                    v = summary.committed_version
                    if v > self.store.committed_version(job_id):
                        try:
                            self.ensure_restorable(job_id, v)
                        except Exception as exc:
                            retry = True
                            self.degraded[job_id] = str(exc)
                            log.warning("job %s: catching up to v%d failed: %s", job_id, v, exc)
            if not pending and not retry:
                return
            self._stop.wait(2.0)

    def ensure_restorable(self, job_id: str, version: int = 0) -> None:
        """Before a restore: make sure this node holds ``version`` (0 = latest committed),
        promoting a locally complete version or rebuilding from peers."""
        v = version or self.commit.latest_committed(job_id)
        if v == 0 or self.store.committed_version(job_id) >= v:
            return
        self.commit.committed_elsewhere(job_id, v)
        if self.store.committed_version(job_id) < v:
            self.rebuild(job_id, v)

    def local_rank(self, job_id: str, v: int, rank: int):
        """A rank's shard of version v, for a peer's copy. Not while we are rebuilding v:
        the segment exists from the start of a rebuild but holds its bytes only at the
        end (the peer decodes the rank from the group instead)."""
        if self.jobs.rebuilding_version(job_id) == v:
            raise KeyError(f"{self.me} is still rebuilding version {v} of job {job_id!r}")
        for r, m, seg in self.store.local_shards(job_id, v):
            if r == rank:
                return r, m, seg
        raise KeyError(f"{self.me} does not hold rank {rank} of job {job_id!r} version {v}")

    def rebuild(self, job_id: str, v: int) -> dict:
        """Rebuild this node's data and parity of version v from the group's survivors."""
        with self._lock:
            if self.store.committed_version(job_id) >= v:
                return {}
            # Until it commits, a job restart's fence must not free the slots being
            # rebuilt (v is committed elsewhere), and peers must not copy from them.
            self.jobs.mark_rebuilding(job_id, v)
            try:
                return self._rebuild_locked(job_id, v)
            finally:
                self.jobs.unmark_rebuilding(job_id)

    def _rebuild_locked(self, job_id: str, v: int) -> dict:
        self.degraded[job_id] = f"rebuilding version {v}"
        t0 = time.monotonic()
        record, holders = self.records.retained_round(job_id, v, [x for x in self.group if x != self.me])
        if record is None:
            raise InsufficientShardsError(
                f"job {job_id!r} version {v}: no live node of group {self.group_index} "
                f"({', '.join(self.group)}) retains it")
        if self.me not in record.announces:
            raise InsufficientShardsError(f"job {job_id!r} version {v}: the round record {holders[0]} "
                                          f"served has no announce of {self.me}")
        layout = self.records.layout_of(record)
        alive = {self.group.index(n) for n in holders}
        plan = plan_repair(layout, alive, self.my_index, version=v, group=self.group_index)
        if isinstance(plan, Unrecoverable):
            self.degraded[job_id] = plan.reason
            raise InsufficientShardsError(f"job {job_id!r}: {plan.reason}")
        log.info("job %s: rebuilding version %d from %s: %d stripes, fetching %.1f MiB", job_id, v,
                 holders, len(plan.repairs), sum(plan.fetch_counts(self.bs).values()) / 2**20)
        try:
            t_plan = time.monotonic()
            mine = record.announces[self.me]
            ranks = list(mine.ranks)
            manifests = [pb.ShardManifest.FromString(x) for x in mine.manifests]
            blocks = map_manifests(ranks, manifests, self.bs)
            spans, segs = {}, []  # node block j -> (segment, offset, length)
            for rank, m, span in zip(ranks, manifests, blocks.spans):
                _, seg = self.store.install_rebuilt(job_id, record.world_size, len(manifests),
                                                    v, rank, m, prefault=False)
                segs.append(seg)
                for i in range(span.count):
                    spans[span.first + i] = (seg, i * self.bs, span.block_bytes(i, self.bs))
            parity = self.parity.buffer(job_id, v, layout, prefault=False) if self.m else None
            if parity is not None:
                segs.append(parity.segment)
            # Map the fresh pages (~5 GB/s in one call, against ~1.5 GB/s fault by
            # fault) while the first blocks are on their way.
            mapper = threading.Thread(target=lambda: [shm.populate(x) for x in segs],
                                      name="snapshotd-rebuild-map", daemon=True)
            mapper.start()
            t_alloc = time.monotonic()
            try:
                nbytes = self.repairs.run(job_id, v, plan, spans, parity, layout=layout, alive=alive)
            finally:
                mapper.join()
            t_repair = time.monotonic()
            for rank in ranks:
                self.store.verify_shard(job_id, rank, v)
            self.records.install_round(job_id, v, record)
            self.parity.seal(job_id, v)
            t_seal = time.monotonic()
            phases = {"plan": t_plan - t0, "allocate": t_alloc - t_plan,
                      "fetch_decode": t_repair - t_alloc, "verify_seal": t_seal - t_repair}
        except Exception:
            # Nothing half-rebuilt stays behind: the next try starts clean.
            self.store.fence(job_id)
            self.parity.release((job_id, v))
            raise
        self.store.commit_version(job_id, v)
        self.records.save(job_id, v)
        dt = time.monotonic() - t0
        self.degraded.pop(job_id, None)
        self.stats = {"job": job_id, "version": v, "bytes": nbytes, "seconds": dt,
                      "fetched_bytes": sum(plan.fetch_counts(self.bs).values()),
                      "phases_s": {k: round(x, 4) for k, x in phases.items()}}
        self.metrics.rebuilt(job_id, v, dt, nbytes)
        log.info("job %s: rebuilt version %d (%d bytes) in %.2f s, %.1f MiB/s; phases %s", job_id, v,
                 nbytes, dt, nbytes / 2**20 / max(dt, 1e-9), self.stats["phases_s"])
        return self.stats
