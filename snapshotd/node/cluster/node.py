"""A daemon's part in a cluster: a thin facade over the composed cluster parts.

:class:`ClusterNode` builds the parts, gives each its collaborators, and exposes only
what the service, the server, the store and the metrics call. The parts (one job each):

  jobs.JobTable           the commit protocol state of every job, and its one lock
  membership.Membership   peer clients, heartbeats, liveness, peers' committed versions
  parity.ParityBuffers    the parity blocks we hold: create/reuse, accumulate, seal, release
  delta.DeltaParity       delta parity: changes since the committed version instead of blocks
  records.RoundRecords    round records: served to peers, saved at commit, loaded at restart
  commit.CommitDriver     carries out the commit protocol's actions; fence, drop a job
  repairs.RepairRunner    fetch + verify + decode of repair plans, around corrupt sources
  rebuild.Rebuilder       catch up, make restorable, rebuild our data and parity
  degraded.DegradedReads  copies of other nodes' ranks, decoded when the owner cannot serve
  ranged.RangedReads      byte ranges of other nodes' ranks: covering blocks, or stripes decoded
  scrub.Scrubber          re-hash what we hold, repair our corrupt blocks
  peer_ops.PeerOps        the peer requests we send; the server's op -> handler table

The pure core decides, the parts carry out: :mod:`snapshotd.core.protocol` (commit),
:mod:`snapshotd.core.placement`, :mod:`snapshotd.core.repair` /
:mod:`snapshotd.core.recovery` (what to fetch to rebuild), :mod:`snapshotd.core.integrity`
(scrub), :mod:`snapshotd.core.blockmap` (node block <-> rank), over the ZeroMQ peer
plane (:mod:`snapshotd.node.peer`).

Call order: construct; ``load_records()``; set ``metrics``, ``scrub_rate_bytes_per_s``,
``scrub_interval_s``; ``start()``; hooks and calls from any thread; ``stop()``.

Threads: the peer server thread answers pings; its bulk thread runs :meth:`PeerOps.handle`
for every other op (never calls out), so a slow one cannot make us look dead; the
commit worker carries out protocol actions that talk to peers, the resend thread
re-sends what a peer did not acknowledge; the heartbeat thread pings
peers and gossips committed versions; the catch-up thread rebuilds what we missed; the
scrub thread checks what we hold. All protocol state is guarded by ``JobTable.lock``.
"""

from __future__ import annotations

import threading

from snapshotd.node.erasure import erasure_code
from snapshotd.core.spec import ClusterSpec
from snapshotd.node.metrics import NullMetrics
from snapshotd.node.peer import PeerServer, tune_malloc_for_bulk_transfers
from snapshotd.node.peer.curve import CurvePeers
from snapshotd.node.peer.traffic import TRAFFIC

from .commit import CommitDriver
from .copies import RemoteCopies
from .corrupt import CorruptBlocks
from .forward import Forwarder
from .degraded import DegradedReads
from .delta import DeltaParity
from .jobs import JobTable
from .membership import Membership
from .parity import ParityBuffers
from .peer_ops import PeerOps
from .ranged import RangedReads
from .rebuild import Rebuilder
from .records import RoundRecords
from .repairs import RepairRunner
from .scrub import Scrubber


class ClusterNode:
    def __init__(self, spec: ClusterSpec, node_id: str, store, bind_host: str | None = None):
        self.spec, self.me, self.store = spec, node_id, store
        gi, li = spec.group_of(node_id)
        self.group_index, self.my_index = gi, li
        self.group = tuple(spec.groups[gi])
        self.n, self.m = len(self.group), spec.parity
        self.k = self.n - self.m
        self.bs = spec.block_size_bytes
        code = erasure_code(self.k, self.m) if self.m else None
        key = spec.peer_key.encode() if spec.peer_key else None
        me = spec.node(node_id)
        host = bind_host or me.host
        self.curve = CurvePeers(key, node_id, [nd.id for nd in spec.nodes]) \
            if spec.peer_encryption == "curve" else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.degraded: dict[str, str] = {}  # job -> why it is not held whole (shared by the parts)
        self._metrics = NullMetrics()

        self.jobs = JobTable(node_id, self.group, tuple(nd.id for nd in spec.nodes), self.m, store,
                             groups=spec.groups)
        self.membership = Membership(spec, node_id, self.group, key, self.curve, self._stop,
                                     committed_versions=self.jobs.committed_versions,
                                     on_gossip=lambda committed: self.commit.on_peer_committed(committed))
        self.parity = ParityBuffers(store, self.jobs, code, li, self.bs, self.m)
        self.records = RoundRecords(me=node_id, n=self.n, m=self.m, block_size_bytes=self.bs, store=store,
                                    jobs=self.jobs, parity=self.parity, membership=self.membership,
                                    degraded=self.degraded)
        self.copies = RemoteCopies(store, self.jobs.lock)
        self.commit = CommitDriver(spec=spec, me=node_id, my_index=li, group=self.group, block_size_bytes=self.bs,
                                   store=store, jobs=self.jobs, parity=self.parity, records=self.records,
                                   copies=self.copies, membership=self.membership, degraded=self.degraded,
                                   stop=self._stop)
        self.records.peerless = self.commit.peerless  # no file: its round is derived at load
        self.forwarder = Forwarder(me=node_id, group=self.group, jobs=self.jobs, parity=self.parity,
                                   commit=self.commit, membership=self.membership, stop=self._stop,
                                   min_backoff_s=spec.heartbeat_interval_ms / 1000)
        self.parity.on_rows = self.forwarder.submit  # the accumulator route (H4, issue 16)
        self.corrupt = CorruptBlocks()
        self.repairs = RepairRunner(me=node_id, group=self.group, k=self.k, block_size_bytes=self.bs, code=code,
                                    membership=self.membership, corrupt=self.corrupt)
        self.rebuilder = Rebuilder(spec=spec, me=node_id, my_index=li, group=self.group, group_index=gi,
                                   block_size_bytes=self.bs, store=store, jobs=self.jobs, parity=self.parity,
                                   records=self.records, commit=self.commit, membership=self.membership,
                                   repairs=self.repairs, degraded=self.degraded, stop=self._stop)
        self.reads = DegradedReads(spec=spec, me=node_id, group=self.group, block_size_bytes=self.bs,
                                   store=store, jobs=self.jobs, membership=self.membership, records=self.records,
                                   commit=self.commit, repairs=self.repairs, corrupt=self.corrupt,
                                   copies=self.copies)
        self.ranged = RangedReads(me=node_id, block_size_bytes=self.bs, store=store, membership=self.membership,
                                  commit=self.commit, repairs=self.repairs, corrupt=self.corrupt,
                                  copies=self.copies, reads=self.reads)
        self.scrubber = Scrubber(me=node_id, my_index=li, group=self.group, m=self.m, block_size_bytes=self.bs,
                                 store=store, jobs=self.jobs, parity=self.parity, membership=self.membership,
                                 repairs=self.repairs, corrupt=self.corrupt, degraded=self.degraded,
                                 stop=self._stop)
        self.delta = DeltaParity(me=node_id, my_index=li, group=self.group, block_size_bytes=self.bs, m=self.m,
                                 store=store, jobs=self.jobs, parity=self.parity, degraded=self.degraded,
                                 suspects=self.corrupt)
        self.commit.delta = self.forwarder.delta = self.delta
        self.ops = PeerOps(me=node_id, n=self.n, block_size_bytes=self.bs, store=store, jobs_table=self.jobs,
                           membership=self.membership, commit=self.commit, parity=self.parity,
                           records=self.records, suspects=self.corrupt, rebuilder=self.rebuilder,
                           fence_job=self.fence, bounded_counts=self.records.bounded_counts,
                           forwarder=self.forwarder, delta=self.delta)
        self.server = PeerServer(f"tcp://{host}:{me.peer_port}", node_id, key,
                                 allowed_peers={nd.id for nd in spec.nodes}, handler=self.ops.handle,
                                 max_payload_bytes=max(self.bs, 64 << 20) + (1 << 20), curve=self.curve,
                                 inline_ops={"ping"})  # heartbeats never wait behind bulk work

    # -- settings the server attaches ------------------------------------------------------
    @property
    def metrics(self):
        """The daemon's :class:`snapshotd.node.metrics.DaemonMetrics` (NullMetrics until set)."""
        return self._metrics

    @metrics.setter
    def metrics(self, value) -> None:
        self._metrics = self.commit.metrics = self.rebuilder.metrics = value

    @property
    def scrub_rate_bytes_per_s(self) -> int:
        return self.scrubber.scrub_rate_bytes_per_s

    @scrub_rate_bytes_per_s.setter
    def scrub_rate_bytes_per_s(self, value: int) -> None:
        self.scrubber.scrub_rate_bytes_per_s = value

    @property
    def scrub_interval_s(self) -> float:
        return self.scrubber.scrub_interval_s

    @scrub_interval_s.setter
    def scrub_interval_s(self, value: float) -> None:
        self.scrubber.scrub_interval_s = value

    # -- lifecycle ---------------------------------------------------------------------------
    def load_records(self) -> None:
        """After a restart, before start(): the committed rounds and parity we persisted."""
        self.records.load()

    def start(self) -> None:
        # Received blocks are malloc'ed by ZeroMQ; keep freed ones instead of giving
        # the pages back (each re-fault costs ~1.5 GB/s on these machines).
        tune_malloc_for_bulk_transfers()
        self.server.start()
        self.forwarder.start()
        for part in (self.commit, self.membership, self.rebuilder, self.scrubber):
            self._threads.append(part.start())

    def stop(self) -> None:
        self._stop.set()
        self.commit.stop_worker()
        self.forwarder.stop()
        self.scrubber.wake()
        for t in self._threads:
            t.join(5)
        self.server.stop()
        self.membership.close()

    # -- what the store, the service and the metrics call ----------------------------------------
    def on_local_complete(self, job_id: str, v: int) -> None:
        """Every local rank delivered v (the store's commit hook, outside its lock)."""
        self.commit.on_local_complete(job_id, v)

    def latest_committed(self, job_id: str) -> int:
        return self.commit.latest_committed(job_id)

    def ensure_restorable(self, job_id: str, version: int = 0) -> None:
        self.rebuilder.ensure_restorable(job_id, version)

    def owner_of(self, job_id: str, rank: int, version: int = 0) -> str | None:
        return self.reads.owner_of(job_id, rank, version)

    def open_remote_shard(self, job_id: str, rank: int, version: int = 0):
        return self.reads.open_remote_shard(job_id, rank, version)

    def decode_own_rank(self, job_id: str, rank: int, v: int, why: Exception):
        return self.reads.decode_own_rank(job_id, rank, v, why)

    def remote_manifest(self, job_id: str, rank: int, version: int = 0):
        return self.ranged.manifest(job_id, rank, version)

    def read_range(self, job_id: str, rank: int, version: int, offset: int, length: int):
        return self.ranged.read(job_id, rank, version, offset, length)

    def fence(self, job_id: str, broadcast: bool = False) -> None:
        self.commit.fence(job_id, broadcast=broadcast)

    def drop_job(self, job_id: str) -> int:
        return self.commit.drop_job(job_id)

    def alive_peers(self) -> set[str]:
        return self.membership.alive_peers()

    def committed_layouts(self) -> list:
        """[(job, committed version, its layout or None)] (for the metrics' redundancy)."""
        return self.jobs.committed_layouts()

    def peer_reply_checksum_failures(self) -> int:
        return self.membership.reply_checksum_failures()

    def status(self) -> dict:
        alive = self.alive_peers()
        with self.jobs.lock:
            parity = self.parity.bytes_per_job()
            jobs = self.jobs.summary()
        return {"node": self.me, "group": self.group_index, "group_members": list(self.group),
                "k": self.k, "m": self.m, "block_size_bytes": self.bs,
                "peers": {nd: {"alive": nd in alive,
                               "committed": self.membership.peer_committed.get(nd, {})}
                          for nd in self.membership.peers},  # the watched ones: group, tree neighbours
                "commit_tree": {"parent": list(self.commit.parent_nodes),
                                "children": list(self.commit.child_nodes)},
                "jobs": jobs, "parity_bytes": parity, "degraded": dict(self.degraded),
                "resending": self.commit.resender.status(),
                "last_rebuild": self.rebuilder.stats,
                "ranged_reads": self.ranged.stats(),
                "accumulate": {"cpu_seconds": round(self.parity.accumulate_stats[0], 4),
                               "bytes": self.parity.accumulate_stats[1]},
                "forwarding": self.forwarder.status(),
                "delta_parity": self.delta.status(),
                "peer_traffic": TRAFFIC.snapshot(),  # bytes handed to our peer sockets (H4, issue 16)
                **self.scrubber.status()}
