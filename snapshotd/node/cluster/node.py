"""A daemon's part in a cluster: parity exchange, commit votes, rebuild (I/O side).

Carries out the plans of the pure core -- :mod:`snapshotd.core.protocol` (announce,
contribute, vote, commit), :mod:`snapshotd.core.placement` (stripes and holders) and
:mod:`snapshotd.core.recovery` (what to fetch to rebuild a lost node) -- over the ZeroMQ
peer plane (:mod:`snapshotd.node.peer`).

Threads: the peer server thread runs ``_handle`` (fast, never calls out); one worker
thread carries out protocol actions that talk to peers; one heartbeat thread pings
peers, gossips committed versions and marks peers down after the timeout. All
protocol state is guarded by ``self._lock``.

Peer operations (header "op"):
  announce   {job, v, node, block_count, ranks, manifests(b64)}   -> ack
  contrib    {job, v, s, t, p, counts} + one block                -> ack (idempotent)
  vote       {job, v, ranks}                                      -> ack
  ping       {committed: {job: v}}                                 -> {committed: {...}}
  round      {job, v}          -> {counts, announces} of a retained version (rebuild)
  fetch      {job, v, kind: data|parity, node_index, j|s,t}       -> the block
  jobs       {}                -> {job: {committed, world_size}}
  suspect    {job, v, kind, j|s,t}  -> ack; a fetcher found that block of ours corrupt:
                                       the scrubber thread checks and repairs it

Corrupt blocks (re-fetching around them, the background scrubber, repair) are handled
by :class:`snapshotd.node.cluster.integrity.IntegrityMixin`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import xxhash

from snapshotd.wire import manifest as mf
from snapshotd.core import placement as pl
from snapshotd.wire import shm
from snapshotd.core import protocol as proto
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.node.cluster.integrity import IntegrityMixin, fetch_header, is_corrupt_reply
from snapshotd.core.integrity import describe_shard
from snapshotd.node.erasure import erasure_code
from snapshotd.node.metrics import NullMetrics, Progress
from snapshotd.wire.errors import ChecksumMismatchError, InsufficientShardsError, UnknownJobError
from snapshotd.node.peer import (
    PeerClient,
    PeerServer,
    PeerUnavailableError,
    KNOWN_XXH3,
    RemoteError,
    tune_malloc_for_bulk_transfers,
)
from snapshotd.node.peer_curve import CurvePeers
from snapshotd.core.recovery import Unrecoverable, plan_recovery
from snapshotd.core.spec import ClusterSpec

log = logging.getLogger("snapshotd.node.cluster.node")

# Received contributions a parity holder may keep in memory while it waits for the rest
# of their stripes (see ParityBuffer); beyond it, it accumulates block by block.
HELD_CONTRIBUTIONS_MAX_BYTES = 512 << 20
# How long (in heartbeat timeouts) a sender keeps re-sending unanswered requests to a
# peer that its heartbeats still see alive (see ClusterNode._deliver).
BULK_RETRY_TIMEOUTS = 20


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
    # Guards held/direct and the bytes. Combines run under it, not under the node's
    # protocol lock, so heartbeats and votes never wait behind a combine. Lock order:
    # ClusterNode._lock, then this.
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False  # returned to the pool: late contributions must not write

    def view(self, s: int, t: int) -> np.ndarray:
        i = self.index[(s, t)]
        return np.frombuffer(self.segment.buf, np.uint8, self.block_size, i * self.block_size)


class ClusterNode(IntegrityMixin):
    def __init__(self, spec: ClusterSpec, node_id: str, store, bind_host: str | None = None):
        self.spec, self.me, self.store = spec, node_id, store
        gi, li = spec.group_of(node_id)
        self.group_index, self.my_index = gi, li
        self.group = tuple(spec.groups[gi])
        self.n, self.m = len(self.group), spec.parity
        self.k = self.n - self.m
        self.bs = spec.block_size_bytes
        self.code = erasure_code(self.k, self.m) if self.m else None
        self.key = spec.peer_key.encode() if spec.peer_key else None
        me = spec.node(node_id)
        host = bind_host or me.host
        self.metrics = NullMetrics()  # the server attaches a snapshotd.node.metrics.DaemonMetrics
        self.curve = CurvePeers(self.key, node_id, [nd.id for nd in spec.nodes]) \
            if spec.peer_encryption == "curve" else None
        self.server = PeerServer(f"tcp://{host}:{me.peer_port}", node_id, self.key,
                                 allowed_peers={nd.id for nd in spec.nodes}, handler=self._handle,
                                 max_payload_bytes=max(self.bs, 64 << 20) + (1 << 20), curve=self.curve)
        self._clients: dict[str, PeerClient] = {}
        self._lock = threading.RLock()
        self.jobs: dict[str, proto.JobProtocol] = {}
        self.parity: dict[tuple[str, int], ParityBuffer] = {}
        self.peer_last_seen: dict[str, float] = {}
        self.peer_committed: dict[str, dict[str, int]] = {}
        self.degraded: dict[str, str] = {}  # job -> why
        self._actions: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rebuild_lock = threading.Lock()
        self._rebuilding: dict[str, int] = {}  # job -> the version being rebuilt
        self.accumulate_stats = [0.0, 0]  # CPU seconds spent combining contributions, bytes in
        self._first_round = threading.Event()  # every group peer was pinged once since start
        self._remote: dict = {}  # (job, rank, v) -> (aux segment, manifest) of other nodes' shards
        self._parity_pool: dict[str, list] = {}  # job -> [(name, segment)] free for reuse
        self.rebuild_stats: dict = {}
        self._init_integrity()  # scrub rate and interval: set by the server before start()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        # Received blocks are malloc'ed by ZeroMQ; keep freed ones instead of giving
        # the pages back (each re-fault costs ~1.5 GB/s on these machines).
        tune_malloc_for_bulk_transfers()
        self.server.start()
        for target, name in ((self._worker, "snapshotd-cluster"), (self._heartbeat, "snapshotd-heartbeat"),
                             (self.catch_up, "snapshotd-catch-up"), (self._scrubber, "snapshotd-scrub")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._actions.put(None)
        self._scrub_wake.set()
        for t in self._threads:
            t.join(5)
        self.server.stop()
        for c in self._clients.values():
            c.close()

    def status(self) -> dict:
        alive = self.alive_peers()
        with self._lock:
            parity = {}
            for (job, v), buf in self.parity.items():
                parity[job] = parity.get(job, 0) + buf.segment.size
            jobs = {j: {"committed": jp.committed_version,
                        "pending": sorted(x for x in jp.rounds if x > jp.committed_version)}
                    for j, jp in self.jobs.items()}
        return {"node": self.me, "group": self.group_index, "group_members": list(self.group),
                "k": self.k, "m": self.m, "block_size_bytes": self.bs,
                "peers": {nd.id: {"alive": nd.id in alive,
                                  "committed": self.peer_committed.get(nd.id, {})}
                          for nd in self.spec.nodes if nd.id != self.me},
                "jobs": jobs, "parity_bytes": parity, "degraded": dict(self.degraded),
                "last_rebuild": self.rebuild_stats,
                "accumulate": {"cpu_seconds": round(self.accumulate_stats[0], 4),
                               "bytes": self.accumulate_stats[1]},
                **self.integrity_status()}

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
                    rep = self.peer(node).call({"op": "jobs"})
                except Exception as exc:  # any failure: ask the next peer, retry later
                    log.debug("catch-up: %s did not answer: %s", node, exc)
                    continue
                pending = False
                for job_id, j in rep[0].get("jobs", {}).items():
                    v = int(j["committed"])
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

    def peer(self, node: str, control: bool = False) -> PeerClient:
        """The client for ``node``. Calls on one client run one at a time, so
        heartbeats use their own (``control``) and never queue behind bulk transfers."""
        key = (node, control)
        c = self._clients.get(key)
        if c is None:
            nd = self.spec.node(node)
            c = self._clients[key] = PeerClient(
                f"tcp://{nd.host}:{nd.peer_port}", self.me, node, self.key,
                timeout_ms=self.spec.heartbeat_timeout_ms, curve=self.curve)
        return c

    def alive_peers(self) -> set[str]:
        now = time.monotonic()
        limit = self.spec.heartbeat_timeout_ms / 1000
        return {n for n, t in self.peer_last_seen.items() if now - t <= limit}

    def job(self, job_id: str) -> proto.JobProtocol:
        jp = self.jobs.get(job_id)
        if jp is None:
            jp = self.jobs[job_id] = proto.JobProtocol(
                job_id, self.me, self.group, tuple(nd.id for nd in self.spec.nodes), self.m,
                committed_version=self.store.committed_version(job_id))
        return jp

    # -- hooks from the store -------------------------------------------------------------
    def on_local_complete(self, job_id: str, v: int) -> None:
        """Every local rank delivered v (called by the store, outside its lock)."""
        shards = self.store.local_shards(job_id, v)
        count = sum(mf.num_blocks(m.payload_bytes, self.bs) for _, m, _ in shards)
        with self._lock:
            acts = self.job(job_id).local_data_complete(
                v, count, [r for r, _, _ in shards], [m.SerializeToString() for _, m, _ in shards])
        self._enqueue(job_id, acts)

    # -- actions ------------------------------------------------------------------------
    def _enqueue(self, job_id: str, acts: list) -> None:
        for a in acts:
            if isinstance(a, proto.Commit):
                self._commit(job_id, a.version)
            else:
                self._actions.put((job_id, a))

    def _worker(self) -> None:
        while not self._stop.is_set():
            item = self._actions.get()
            if item is None:
                return
            job_id, a = item
            try:
                if isinstance(a, proto.SendAnnounce):
                    self._send_announce(job_id, a)
                elif isinstance(a, proto.SendContributions):
                    self._send_contributions(job_id, a)
                elif isinstance(a, proto.SendVote):
                    self._send_vote(job_id, a)
            except Exception as exc:  # a dead peer stalls this version; newer ones go on
                log.warning("job %s v%d: %s failed: %s", job_id, a.version, type(a).__name__, exc)

    def _broadcast(self, nodes, header: dict, payload=None) -> None:
        for node in nodes:
            if node == self.me:
                continue
            try:
                self._deliver(node, [(header, payload)], header.get("job"), header.get("v"))
            except (PeerUnavailableError, RemoteError) as exc:
                log.warning("%s to %s failed: %s", header["op"], node, exc)

    def _deliver(self, node: str, reqs: list, job_id: str | None = None, v: int | None = None,
                 window: int = 8) -> None:
        """Send requests the peer must all execute (announce, contributions, votes).

        A stall (no reply within the heartbeat timeout) is not a verdict on the peer:
        under load a busy receiver can fall behind a bulk window. While heartbeats (their
        own connection) still see the peer and version ``v`` is still being committed,
        the requests not yet acknowledged are sent again -- every handler is idempotent
        -- for up to BULK_RETRY_TIMEOUTS heartbeat timeouts. Before this, one slow reply
        stalled a version for good."""
        pending = list(range(len(reqs)))
        deadline = time.monotonic() + BULK_RETRY_TIMEOUTS * self.spec.heartbeat_timeout_ms / 1000
        while True:
            acked: set[int] = set()
            batch = pending
            try:
                self.peer(node).call_many([reqs[i] for i in batch], window=window,
                                          on_reply=lambda i, h, d: acked.add(batch[i]))
                return
            except PeerUnavailableError as exc:
                pending = [i for i in batch if i not in acked]
                if acked:  # it answered some: alive, just behind
                    self.peer_last_seen[node] = time.monotonic()
                if (self._stop.is_set() or time.monotonic() > deadline
                        or node not in self.alive_peers() or not self._still_open(job_id, v)):
                    raise
                log.info("%s: %d of %d requests unanswered (%s); sending them again",
                         node, len(pending), len(reqs), exc)

    def _still_open(self, job_id: str | None, v: int | None) -> bool:
        """Version v of the job is neither committed nor dropped (nothing to retry for)."""
        if job_id is None or v is None:
            return True
        with self._lock:
            jp = self.jobs.get(job_id)
            return jp is not None and v > jp.committed_version and v in jp.rounds

    def _send_announce(self, job_id: str, a: proto.SendAnnounce) -> None:
        ann = a.announce
        sizes, blob = pack_blobs(ann.manifests)
        self._broadcast(self.group, {
            "op": "announce", "job": job_id, "v": a.version, "node": ann.node,
            "block_count": ann.block_count, "ranks": list(ann.ranks), "sizes": sizes}, blob)

    def _send_contributions(self, job_id: str, a: proto.SendContributions) -> None:
        blocks = self.store.block_reader(job_id, a.version, self.bs, with_checksum=True)
        per_holder: dict[str, list] = {}
        for j, s, p in a.layout.data_blocks(self.my_index):
            data, known = blocks(j)
            for t, holder in enumerate(pl.stripe_parity_nodes(self.n, self.m, s)):
                hdr = {"op": "contrib", "job": job_id, "v": a.version, "s": s, "t": t, "p": p,
                       "counts": list(a.block_counts)}
                if known is not None:  # the adopt-time checksum; the holder verifies it
                    hdr[KNOWN_XXH3] = known
                if holder == self.my_index:
                    self._accumulate(hdr, data)
                else:
                    per_holder.setdefault(self.group[holder], []).append((hdr, data))
        errs = []

        def send(node, reqs):
            try:
                self._deliver(node, reqs, job_id, a.version)
            except Exception as exc:
                errs.append((node, exc))

        ts = [threading.Thread(target=send, args=(nd, r)) for nd, r in per_holder.items()]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errs:
            raise RuntimeError(f"contributions not delivered: {errs}")
        with self._lock:
            acts = self.job(job_id).contributions_delivered(a.version)
        self._enqueue(job_id, acts)

    def _send_vote(self, job_id: str, a: proto.SendVote) -> None:
        self._seal_parity(job_id, a.version)
        self._broadcast([nd.id for nd in self.spec.nodes],
                        {"op": "vote", "job": job_id, "v": a.version, "ranks": list(a.ranks)})

    def _commit(self, job_id: str, v: int) -> None:
        # Our own vote counts as soon as the protocol emits it, so the peers' votes can
        # complete v before the worker has sealed our parity for it. The record saved
        # below must carry the seal: a restarted daemon serves parity only by it.
        self._seal_parity(job_id, v)
        self.store.commit_version(job_id, v)
        with self._lock:
            for key in [k for k in self.parity if k[0] == job_id and k[1] < v]:
                self._release_parity(key)
            for key in [k for k in self._remote if k[0] == job_id and k[2] < v]:
                self.store.release_aux(self._remote.pop(key)[0])
            self._save_record(job_id, v)
        self.degraded.pop(job_id, None)
        self.metrics.committed(job_id, v)
        log.info("job %s: version %d committed", job_id, v)

    # -- parity -------------------------------------------------------------------------
    def _parity_buffer(self, job_id: str, v: int, layout, prefault: bool = True) -> ParityBuffer:
        """The parity buffer of version v, created on first use. Must be called WITHOUT
        holding ``self._lock``: creating one allocates and maps up to m/k of the data,
        which must not stall the heartbeats (they take the lock) -- a peer whose
        heartbeats stall is taken for dead."""
        key = (job_id, v)
        with self._lock:
            pb_ = self.parity.get(key)
            if pb_ is not None:
                return pb_
            blocks = layout.parity_blocks(self.my_index)
            size = max(1, len(blocks)) * self.bs
            pool = self._parity_pool.setdefault(job_id, [])
            fit = next((x for x in pool if x[1].size >= size), None)
            if fit is not None:  # warm pages of a released version: reuse (see below)
                pool.remove(fit)
        if fit is not None:
            name, seg = fit
        else:  # fresh pages are zero
            name, seg = self.store.create_aux(f"{job_id}.parity.{os.urandom(4).hex()}", size,
                                              prefault=prefault)
        pb_ = ParityBuffer(name, seg, {b: i for i, b in enumerate(blocks)}, self.bs)
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
        with self._lock:
            other = self.parity.get(key)
            if other is not None:  # created meanwhile by another thread: keep that one
                self._parity_pool.setdefault(job_id, []).append((name, seg))
                return other
            self.parity[key] = pb_
            # Uncommitted rounds that can no longer commit must not pile up.
            stale = sorted(k for k in self.parity if k[0] == job_id and k[1] < v)[:-2]
            for k in stale:
                if k[1] != self.job(job_id).committed_version:
                    self._release_parity(k)
        return pb_

    def _seal_parity(self, job_id: str, v: int) -> None:
        """Before voting (and at the latest at the commit): make sure the parity buffer
        exists (zeros when no real data fell into our stripes) and record one checksum
        per parity block. Once sealed, a buffer is not hashed again."""
        if not self.m:
            return
        with self._lock:
            r = self.job(job_id).rounds.get(v)
            if r is None or r.layout is None:
                return
            layout = r.layout
        buf = self._parity_buffer(job_id, v, layout)
        with buf.lock:
            if buf.released or buf.checksums:
                return
            if buf.held:  # defensive: nothing may stay unapplied once sealed
                self._flush_held(buf)
            buf.checksums = {i: xxhash.xxh3_64_intdigest(
                memoryview(buf.segment.buf)[i * self.bs:(i + 1) * self.bs])
                for i in range(len(buf.index))}

    def _release_parity(self, key) -> None:
        """Keep up to two released parity segments per job for the next versions:
        writing into fresh pages costs ~1.5 GB/s, into reused ones ~13 GB/s."""
        pb_ = self.parity.pop(key, None)
        if pb_ is None:
            return
        with pb_.lock:  # a combine in progress finishes first; later ones see released
            pb_.released = True
        pool = self._parity_pool.setdefault(key[0], [])
        if len(pool) < 2:
            pool.append((pb_.name, pb_.segment))
        else:
            self.store.release_aux(pb_.name)

    def _accumulate(self, hdr: dict, data) -> None:
        job_id, v = hdr["job"], hdr["v"]
        s, t, p = hdr["s"], hdr["t"], hdr["p"]
        # One sender's contributions arrive through the peer server thread (ours through
        # the worker), one at a time, so no (s, t, p) is ever applied by two threads at once.
        with self._lock:
            jp = self.job(job_id)
            if v <= jp.committed_version:
                return
            layout = jp.layout_from_contribution(v, tuple(hdr["counts"]))
            r = jp.round(v)
            if (s, t, p) not in r.expected:
                return  # a retry of something already accumulated
        buf = self._parity_buffer(job_id, v, layout)
        coef = int(self.code.parity_matrix[t, p])
        block = np.frombuffer(data, np.uint8)
        key = (s, t)
        with buf.lock:
            if buf.released:  # the round was dropped meanwhile
                return
            if key in buf.direct:
                self.code.mul_accumulate(coef, block, buf.view(s, t))
            else:
                held = buf.held.setdefault(key, [])
                held.append((coef, block))
                buf.held_bytes += block.nbytes
                if len(held) >= buf.need.get(key, 0):
                    t0 = time.thread_time()  # CPU time: the cores are shared
                    self.code.combine([c for c, _ in held], [b for _, b in held], buf.view(s, t))
                    self.accumulate_stats[0] += time.thread_time() - t0
                    self.accumulate_stats[1] += sum(b.nbytes for _, b in held)
                    buf.held_bytes -= sum(b.nbytes for _, b in buf.held.pop(key))
                elif buf.held_bytes > HELD_CONTRIBUTIONS_MAX_BYTES:
                    self._flush_held(buf)
        with self._lock:
            if self.parity.get((job_id, v)) is not buf:
                return
            acts = jp.contribution_received(v, s, t, p)
        self._enqueue(job_id, acts)

    def _flush_held(self, buf: ParityBuffer) -> None:
        """Too much held in memory: fold what is held into the parity now and
        accumulate those stripes' later contributions one by one."""
        for (s, t), held in buf.held.items():
            dst = buf.view(s, t)
            dst[:] = 0  # a reused segment: not yet overwritten by a combine
            for c, b in held:
                self.code.mul_accumulate(c, b, dst)
            buf.direct.add((s, t))
        buf.held.clear()
        buf.held_bytes = 0

    # -- the peer server ----------------------------------------------------------------
    def _handle(self, sender: str, h: dict, payload):
        self.peer_last_seen[sender] = time.monotonic()
        op = h.get("op")
        if op == "ping":
            self._gossip(sender, h.get("committed", {}))
            return {"committed": self.committed_versions()}, None
        if op == "contrib":
            self._bounded_counts(h.get("counts"))
            if payload is None or len(payload) != self.bs:
                raise ValueError(f"contribution must carry exactly {self.bs} bytes")
            self._accumulate(h, payload)
            return {"ok": True}, None
        if op == "announce":
            self._bounded_counts([h["block_count"]] * self.n)
            ann = proto.Announce(h["node"], int(h["block_count"]), tuple(h["ranks"]),
                                 tuple(unpack_blobs(h["sizes"], payload)))
            with self._lock:
                acts = self.job(h["job"]).announce_received(int(h["v"]), ann)
            self._enqueue(h["job"], acts)
            return {"ok": True}, None
        if op == "vote":
            with self._lock:
                acts = self.job(h["job"]).vote_received(int(h["v"]), sender, h["ranks"])
            self._enqueue(h["job"], acts)
            return {"ok": True}, None
        if op == "fence":  # inline: when the restarting trainer's restore returns,
            self.fence(h["job"])  # every node has dropped the old run's rounds
            return {"ok": True}, None
        if op == "jobs":
            return {"jobs": self.store.jobs_summary()}, None
        if op == "round":
            info = self._round_info(h["job"], int(h["v"]))
            return {"size": len(info)}, info
        if op == "fetch":
            return self._fetch(h)
        if op == "suspect":
            self._on_suspect(h)
            return {"ok": True}, None
        if op == "rank_manifest":
            _, m, _ = self._local_rank(h["job"], int(h["v"]), int(h["rank"]))
            return {"ok": True}, m.SerializeToString()
        if op == "rank_block":
            _, m, seg = self._local_rank(h["job"], int(h["v"]), int(h["rank"]))
            j, bs = int(h["j"]), m.block_size_bytes
            if not 0 <= j * bs < m.payload_bytes:
                raise ValueError(f"rank {m.rank} has no block {j}")
            mv = memoryview(seg.buf)[j * bs:min((j + 1) * bs, m.payload_bytes)]
            if self.store.unsafe_skip_verify:  # test-only broken build (store.py): unchecked
                return {"ok": True}, mv
            # The stored checksum is sent as the payload's: the receiver verifies it.
            return {"ok": True, KNOWN_XXH3: m.block_checksums[j]}, mv
        raise ValueError(f"unknown op {op!r}")

    def _bounded_counts(self, counts) -> tuple[int, ...]:
        """Block counts from the network, checked before anything is sized from them:
        one per group member, each at most what this node's budget could hold parity for."""
        limit = max(1, self.store.memory_budget_bytes // self.bs) * max(1, self.k)
        if (not isinstance(counts, list) or len(counts) != self.n
                or not all(type(c) is int and 0 <= c <= limit for c in counts)):
            raise ValueError(f"block counts must be {self.n} integers in 0..{limit}")
        return tuple(counts)

    def committed_versions(self) -> dict[str, int]:
        with self._lock:
            return {j: jp.committed_version for j, jp in self.jobs.items()}

    def _gossip(self, sender: str, committed: dict) -> None:
        self.peer_committed[sender] = dict(committed)
        for job_id, v in committed.items():
            with self._lock:
                jp = self.jobs.get(job_id)
                acts = jp.committed_elsewhere(int(v)) if jp else []
            self._enqueue(job_id, acts)

    def _heartbeat(self) -> None:
        """Ping every other node each interval; each ping runs in a pool thread, and a
        peer whose ping is still in flight is skipped this round. Pings used to run one
        after the other: a dead peer's ping waited out the timeout, so the round took
        longer than the timeout and every peer pinged after the dead one looked dead too
        (a degraded read then left a live group member out of its sources)."""
        interval = self.spec.heartbeat_interval_ms / 1000
        # The group first, and the first round at once: a fresh daemon must learn the commits.
        peers = [nd.id for nd in sorted(self.spec.nodes, key=lambda nd: nd.id not in self.group)
                 if nd.id != self.me]
        busy: set[str] = set()
        busy_lock = threading.Lock()

        def ping(node: str) -> None:
            try:
                rep, _ = self.peer(node, control=True).call(
                    {"op": "ping", "committed": self.committed_versions()},
                    timeout_ms=self.spec.heartbeat_timeout_ms)
                self.peer_last_seen[node] = time.monotonic()
                self._gossip(node, rep.get("committed", {}))
            except (PeerUnavailableError, RemoteError):
                pass
            except Exception as exc:  # never let one peer's trouble stop the heartbeats
                log.warning("heartbeat to %s: %s", node, exc)
            finally:
                with busy_lock:
                    busy.discard(node)

        pool = ThreadPoolExecutor(max(1, min(len(peers), 64)), thread_name_prefix="snapshotd-ping")
        try:
            while True:
                first = []
                for node in peers:
                    with busy_lock:
                        if node in busy:
                            continue
                        busy.add(node)
                    f = pool.submit(ping, node)
                    if node in self.group:
                        first.append(f)
                if not self._first_round.is_set():
                    for f in first:
                        f.result()
                    self._first_round.set()
                if self._stop.wait(interval):
                    return
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- retained round information (for rebuilding a peer) --------------------------------
    def _round_info(self, job_id: str, v: int) -> dict:
        with self._lock:
            jp = self.jobs.get(job_id)
            r = jp.rounds.get(v) if jp else None
            if r is None or r.layout is None:
                raise KeyError(f"job {job_id!r} version {v} is not retained here")
            return json.dumps(self._round_doc(job_id, r)).encode()

    def _round_doc(self, job_id: str, r) -> dict:
        summary = self.store.jobs_summary().get(job_id, {})
        jp = self.jobs.get(job_id)
        return {"counts": list(r.layout.block_counts), "world_size": summary.get("world_size", 0),
                "rank_nodes": {str(k): n for k, n in (jp.rank_nodes.items() if jp else ())},
                "announces": {n: {"block_count": a.block_count, "ranks": list(a.ranks),
                                  "manifests": [base64.b64encode(x).decode() for x in a.manifests]}
                              for n, a in r.announces.items()}}

    def _record_path(self, job_id: str) -> str:
        d = os.path.join(self.store.state_dir, "cluster")
        os.makedirs(d, mode=0o700, exist_ok=True)
        return os.path.join(d, f"{job_id}.json")

    def _save_record(self, job_id: str, v: int) -> None:
        """Persist what a restarted daemon needs to keep serving version v: the
        layout, every group member's announce and our parity buffer's index."""
        try:
            info = json.loads(self._round_info(job_id, v))
        except KeyError:
            return
        buf = self.parity.get((job_id, v))
        info["v"] = v
        if buf is not None:
            info["parity"] = {"name": buf.name, "blocks": [list(b) for b in buf.index],
                              "checksums": [buf.checksums.get(i) for i in range(len(buf.index))]}
        path = self._record_path(job_id)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)

    def load_records(self) -> None:
        """After a restart: restore the committed rounds (and parity) we had persisted;
        release every other cluster segment (pooled parity, copies of remote shards)."""
        self._load_records()
        keep = {buf.name for buf in self.parity.values()}
        for name in self.store.aux_names():
            if name not in keep:
                self.store.release_aux(name)

    def _load_records(self) -> None:
        d = os.path.join(self.store.state_dir, "cluster")
        if not os.path.isdir(d):
            return
        for fn in os.listdir(d):
            if not fn.endswith(".json"):
                continue
            job_id = fn[:-5]
            with open(os.path.join(d, fn)) as f:
                info = json.load(f)
            v = int(info["v"])
            if self.store.committed_version(job_id) != v:
                continue
            self._install_round(job_id, v, info)
            par = info.get("parity")
            if par:
                seg = self.store.aux(par["name"])
                if seg is None:
                    log.warning("job %s v%d: parity segment lost; it will be rebuilt", job_id, v)
                    self.degraded[job_id] = "parity lost in a restart"
                    continue
                self.parity[(job_id, v)] = ParityBuffer(
                    par["name"], seg, {tuple(b): i for i, b in enumerate(par["blocks"])}, self.bs,
                    {i: c for i, c in enumerate(par["checksums"]) if c is not None})

    def _install_round(self, job_id: str, v: int, info: dict) -> None:
        with self._lock:
            jp = self.job(job_id)
            jp.committed_version = max(jp.committed_version, v)
            r = jp.round(v)
            r.layout = pl.place_group(self.n, self.m, tuple(info["counts"]))
            for node, a in info["announces"].items():
                r.announces[node] = proto.Announce(node, a["block_count"], tuple(a["ranks"]),
                                                   tuple(base64.b64decode(x) for x in a["manifests"]))
            for rk, node in info.get("rank_nodes", {}).items():
                jp.rank_nodes.setdefault(int(rk), node)
            r.local_data = r.parity_done = r.contributions_started = True
            r.contributions_sent = r.voted = True

    def fence(self, job_id: str, broadcast: bool = False) -> None:
        """The job restarts from its committed version: drop every uncommitted round
        here (and, for the node whose trainer restarted, on every node of the job)."""
        with self._lock:
            dropped = self.job(job_id).fence()
            for v in dropped:
                self._release_parity((job_id, v))
        self.store.fence(job_id, keep_version=self._rebuilding.get(job_id, 0))
        if dropped:
            log.info("job %s: fenced, dropped uncommitted versions %s", job_id, dropped)
        if broadcast:
            self._broadcast([nd.id for nd in self.spec.nodes], {"op": "fence", "job": job_id})

    def drop_job(self, job_id: str) -> int:
        """The job is dropped on this node (DropJob): release its parity buffers, the
        pooled ones, copies of other nodes' shards and its round record. Returns bytes freed."""
        with self._lock:
            keys = [k for k in self.parity if k[0] == job_id]
            freed = sum(self.parity[k].segment.size for k in keys)
            freed += sum(seg.size for _, seg in self._parity_pool.get(job_id, []))
            for key in keys:
                self._release_parity(key)  # into the pool (or freed), which goes next
            for name, _ in self._parity_pool.pop(job_id, []):
                self.store.release_aux(name)
            for key in [k for k in self._remote if k[0] == job_id]:
                self.store.release_aux(self._remote.pop(key)[0])
            self.jobs.pop(job_id, None)
            self.degraded.pop(job_id, None)
        try:
            os.unlink(self._record_path(job_id))
        except FileNotFoundError:
            pass
        return freed

    def _local_rank(self, job_id: str, v: int, rank: int):
        """A rank's shard of version v, for a peer's copy. Not while we are rebuilding v:
        the segment exists from the start of a rebuild but holds its bytes only at the
        end (the peer decodes the rank from the group instead)."""
        if self._rebuilding.get(job_id) == v:
            raise KeyError(f"{self.me} is still rebuilding version {v} of job {job_id!r}")
        for r, m, seg in self.store.local_shards(job_id, v):
            if r == rank:
                return r, m, seg
        raise KeyError(f"{self.me} does not hold rank {rank} of job {job_id!r} version {v}")

    def owner_of(self, job_id: str, rank: int, version: int = 0) -> str | None:
        """The node that holds ``rank``: from the votes seen, else from a peer's record
        of the round (a replacement node that could not rebuild has seen no votes)."""
        with self._lock:
            owner = self.job(job_id).rank_nodes.get(rank)
        if owner is not None:
            return owner
        v = version or self.latest_committed(job_id)
        for node in self.group:
            if node == self.me or not v:
                continue
            try:
                rep = self.peer(node).call({"op": "round", "job": job_id, "v": v})
            except (PeerUnavailableError, RemoteError):
                continue
            known = json.loads(bytes(rep[1])).get("rank_nodes", {})
            with self._lock:
                jp = self.job(job_id)
                for rk, nd in known.items():
                    jp.rank_nodes.setdefault(int(rk), nd)
                return jp.rank_nodes.get(rank)
        return None

    def open_remote_shard(self, job_id: str, rank: int, version: int = 0):
        """Copy another node's committed shard of ``rank`` into a local segment (for a
        restore that gathers data-parallel slices). Returns (segment name, manifest)."""
        v = version or self.latest_committed(job_id)
        with self._lock:
            cached = self._remote.get((job_id, rank, v))
        if cached is not None:
            return cached
        owner = self.owner_of(job_id, rank, v)
        if owner is None:
            raise InsufficientShardsError(
                f"job {job_id!r}: no node is known to hold rank {rank} of version {v}")
        if owner != self.me and owner not in self.alive_peers():
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
            if not (is_corrupt_reply(exc) or isinstance(exc, ChecksumMismatchError)):
                raise
            return self._decode_corrupt_copy(job_id, rank, v, owner, "restore copy", exc)
        with self._lock:
            self._remote[(job_id, rank, v)] = (name, m)
        return name, m

    def _copy_from_owner(self, job_id: str, rank: int, v: int, owner: str):
        """Copy ``owner``'s shard of ``rank`` into a local aux segment, checksum-verified."""
        client = self.peer(owner)
        rep = client.call({"op": "rank_manifest", "job": job_id, "v": v, "rank": rank})
        m = pb.ShardManifest.FromString(bytes(rep[1]))
        name, seg = self.store.create_aux(f"{job_id}.remote.r{rank}.v{v}", max(1, m.payload_bytes))
        bs = m.block_size_bytes
        reqs = [({"op": "rank_block", "job": job_id, "v": v, "rank": rank, "j": j}, None)
                for j in range((m.payload_bytes + bs - 1) // bs)]
        mv = memoryview(seg.buf)

        def put(i, header, data):
            mv[i * bs:i * bs + len(data)] = data

        try:
            client.call_many(reqs, window=8, on_reply=put)
            self.store._verify(seg.buf, m, f"copy of rank {rank} from {owner}")
        except BaseException:
            self.store.release_aux(name)
            raise
        return name, m

    def decode_own_rank(self, job_id: str, rank: int, v: int, why: Exception):
        """Our own copy of ``rank`` failed its checksum (a bit flipped in RAM, say): never
        serve it. Decode the rank from the other nodes of our group instead, as a degraded
        read would, and leave our block to the scrubber (which also repairs it). With too
        few good sources the restore fails with the checksum error, and the reason.
        Returns (segment name, manifest) like ``open_remote_shard``."""
        with self._lock:
            cached = self._remote.get((job_id, rank, v))
        if cached is not None:
            return cached
        return self._decode_corrupt_copy(job_id, rank, v, self.me, "restore", why)

    def _decode_corrupt_copy(self, job_id: str, rank: int, v: int, owner: str, found_by: str,
                             why: Exception):
        """``owner``'s copy of ``rank`` failed its checksum: never use it. Report the
        block, decode the rank from the rest of the owner's group (checksums verified)
        and leave the block to the owner's scrubber. With fewer than k good sources: the
        checksum error, and why the decode failed too."""
        self.note_corrupt(job_id, v, "data", owner, found_by, {"rank": rank})
        try:
            out = self._degraded_copy(job_id, rank, v, owner, owner_up=True)
        except Exception as exc:
            raise ChecksumMismatchError(f"{why}; decoding rank {rank} from the group failed too: "
                                        f"{exc}") from None
        log.warning("job %s: %s's copy of rank %d v%d failed its checksum (%s); served a copy "
                    "decoded from the group", job_id, owner, rank, v, why)
        return out

    def _retained_round(self, job_id: str, v: int, nodes) -> tuple[dict | None, list[str]]:
        """The round record of version v (layout, every member's manifests) and which of
        ``nodes`` retain it (ourselves included, asked locally): the sources of a rebuild."""
        info, holders = None, []
        for node in nodes:
            try:
                if node == self.me:
                    doc = json.loads(self._round_info(job_id, v))
                else:
                    doc = json.loads(bytes(self.peer(node).call({"op": "round", "job": job_id, "v": v})[1]))
            except (KeyError, PeerUnavailableError, RemoteError) as exc:
                log.info("job %s v%d: %s cannot serve it: %s", job_id, v, node, exc)
                continue
            info = info or doc
            holders.append(node)
        return info, holders

    def _degraded_copy(self, job_id: str, rank: int, v: int, owner: str, owner_up: bool = False):
        """A degraded read: ``owner`` is down, so decode its shard of ``rank`` from the
        survivors of owner's group (k blocks per lost block, as a rebuild would, but only
        that rank's data blocks). Returns (segment name, manifest) like a copy."""
        gi, oi = self.spec.group_of(owner)
        group = tuple(self.spec.groups[gi])
        alive = self.alive_peers() | {self.me}
        info, holders = self._retained_round(job_id, v, [x for x in group if x != owner and x in alive])
        what = (f"job {job_id!r} rank {rank} version {v}: its node {owner} "
                + ("no longer holds it" if owner_up else "is down"))
        if info is None or owner not in info.get("announces", {}):
            raise InsufficientShardsError(f"{what} and no live node of its group {gi} retains the version")
        layout = pl.place_group(self.n, self.m, self._bounded_counts(info["counts"]))
        alive_idx = {group.index(x) for x in holders}
        plan = plan_recovery(layout, alive_idx, [oi], version=v, group=gi)
        if isinstance(plan, Unrecoverable):
            raise InsufficientShardsError(f"{what}, and {plan.reason}")
        ann = info["announces"][owner]
        first, m = 0, None
        for r, blob in zip(ann["ranks"], ann["manifests"]):
            man = pb.ShardManifest.FromString(base64.b64decode(blob))
            if int(r) == rank:
                m = man
                break
            first += mf.num_blocks(man.payload_bytes, self.bs)
        if m is None:
            raise InsufficientShardsError(f"{what}, and its announce does not list that rank")
        name, seg = self.store.create_aux(f"{job_id}.remote.r{rank}.v{v}", max(1, m.payload_bytes))
        spans = {first + i: (seg, off, min(self.bs, m.payload_bytes - off))
                 for i, off in enumerate(range(0, m.payload_bytes, self.bs))}
        repairs = [replace(rp, outputs=tuple(o for o in rp.outputs if o.kind == "data" and o.block in spans))
                   for rp in plan.repairs]
        plan = replace(plan, repairs=tuple(rp for rp in repairs if rp.outputs))
        t0 = time.monotonic()
        try:
            self._run_repairs(job_id, v, plan, spans, None, group=group, layout=layout, alive=alive_idx,
                              found_by="degraded read")
            self.store._verify(seg.buf, m, f"degraded read of rank {rank} (node {owner} down)")
        except Exception:
            self.store.release_aux(name)
            raise
        log.info("%s: decoded its %d bytes from %s in %.2f s", what, m.payload_bytes, holders,
                 time.monotonic() - t0)
        with self._lock:
            self._remote[(job_id, rank, v)] = (name, m)
        return name, m

    # -- restore and rebuild -------------------------------------------------------------
    def latest_committed(self, job_id: str) -> int:
        """The newest version any live node of the job reports committed."""
        if self._threads and not self._first_round.is_set():
            # Just started (e.g. a replaced node): until the peers were asked once, we
            # would answer 0, and a trainer starting with us would restore nothing.
            self._first_round.wait(len(self.group) * self.spec.heartbeat_timeout_ms / 1000)
        with self._lock:
            mine = self.job(job_id).committed_version
        alive = self.alive_peers()
        others = [c.get(job_id, 0) for p, c in self.peer_committed.items() if p in alive]
        return max([mine] + others)

    def ensure_restorable(self, job_id: str, version: int = 0) -> None:
        """Before a restore: make sure this node holds ``version`` (0 = latest committed),
        promoting a locally complete version or rebuilding from peers."""
        v = version or self.latest_committed(job_id)
        if v == 0 or self.store.committed_version(job_id) >= v:
            return
        with self._lock:
            acts = self.job(job_id).committed_elsewhere(v)
        self._enqueue(job_id, acts)
        if self.store.committed_version(job_id) < v:
            self.rebuild(job_id, v)

    def rebuild(self, job_id: str, v: int) -> dict:
        """Rebuild this node's data and parity of version v from the group's survivors."""
        with self._rebuild_lock:
            if self.store.committed_version(job_id) >= v:
                return {}
            # Until it commits, a job restart's fence must not free the slots being
            # rebuilt (v is committed elsewhere), and peers must not copy from them.
            self._rebuilding[job_id] = v
            try:
                return self._rebuild_locked(job_id, v)
            finally:
                self._rebuilding.pop(job_id, None)

    def _rebuild_locked(self, job_id: str, v: int) -> dict:
        self.degraded[job_id] = f"rebuilding version {v}"
        t0 = time.monotonic()
        info, holders = self._retained_round(job_id, v, [x for x in self.group if x != self.me])
        if info is None:
            raise InsufficientShardsError(
                f"job {job_id!r} version {v}: no live node of group {self.group_index} "
                f"({', '.join(self.group)}) retains it")
        layout = pl.place_group(self.n, self.m, self._bounded_counts(info["counts"]))
        alive = {self.group.index(n) for n in holders}
        plan = plan_recovery(layout, alive, [self.my_index], version=v, group=self.group_index)
        if isinstance(plan, Unrecoverable):
            self.degraded[job_id] = plan.reason
            raise InsufficientShardsError(f"job {job_id!r}: {plan.reason}")
        log.info("job %s: rebuilding version %d from %s: %d stripes, fetching %.1f MiB", job_id, v,
                 holders, len(plan.repairs), sum(plan.fetch_counts(self.bs).values()) / 2**20)
        try:
            t_plan = time.monotonic()
            mine = info["announces"][self.me]
            manifests = [pb.ShardManifest.FromString(base64.b64decode(x)) for x in mine["manifests"]]
            spans, segs = [], []  # node block j -> (segment, offset, length)
            for rank, m in zip(mine["ranks"], manifests):
                _, seg = self.store.install_rebuilt(job_id, int(info["world_size"]), len(manifests),
                                                    v, int(rank), m, prefault=False)
                segs.append(seg)
                for off in range(0, m.payload_bytes, self.bs):
                    spans.append((seg, off, min(self.bs, m.payload_bytes - off)))
            parity = self._parity_buffer(job_id, v, layout, prefault=False) if self.m else None
            if parity is not None:
                segs.append(parity.segment)
            # Map the fresh pages (~5 GB/s in one call, against ~1.5 GB/s fault by
            # fault) while the first blocks are on their way.
            mapper = threading.Thread(target=lambda: [shm.populate(x) for x in segs],
                                      name="snapshotd-rebuild-map", daemon=True)
            mapper.start()
            t_alloc = time.monotonic()
            try:
                nbytes = self._run_repairs(job_id, v, plan, spans, parity, layout=layout, alive=alive)
            finally:
                mapper.join()
            t_repair = time.monotonic()
            for rank in mine["ranks"]:
                self.store.verify_shard(job_id, int(rank), v)
            self._install_round(job_id, v, info)
            self._seal_parity(job_id, v)
            t_seal = time.monotonic()
            phases = {"plan": t_plan - t0, "allocate": t_alloc - t_plan,
                      "fetch_decode": t_repair - t_alloc, "verify_seal": t_seal - t_repair}
        except Exception:
            # Nothing half-rebuilt stays behind: the next try starts clean.
            self.store.fence(job_id)
            with self._lock:
                self._release_parity((job_id, v))
            raise
        self.store.commit_version(job_id, v)
        with self._lock:
            self._save_record(job_id, v)
        dt = time.monotonic() - t0
        self.degraded.pop(job_id, None)
        self.rebuild_stats = {"job": job_id, "version": v, "bytes": nbytes, "seconds": dt,
                              "fetched_bytes": sum(plan.fetch_counts(self.bs).values()),
                              "phases_s": {k: round(x, 4) for k, x in phases.items()}}
        self.metrics.rebuilt(job_id, v, dt, nbytes)
        log.info("job %s: rebuilt version %d (%d bytes) in %.2f s, %.1f MiB/s; phases %s", job_id, v,
                 nbytes, dt, nbytes / 2**20 / max(dt, 1e-9), self.rebuild_stats["phases_s"])
        return self.rebuild_stats

    def _run_repairs(self, job_id: str, v: int, plan, spans, parity, batch: int = 16,
                     group: tuple[str, ...] | None = None, layout=None, alive=frozenset(),
                     found_by: str = "rebuild") -> int:
        """Carry out a recovery plan: fetch sources per node in parallel, decode.
        The next batch is fetched while this one decodes (ISA-L releases the GIL), and
        full blocks are decoded straight into their destination. ``spans`` maps a data
        output's block j to (segment, offset, length); ``group``: the plan's group
        (default ours). A source that fails its checksum is never decoded: its stripe
        is re-planned around it from the other nodes of ``alive`` (group-local indices
        of ``layout``), and the rebuild fails only with fewer than k good sources."""
        k = self.k
        group = group or self.group
        zero = np.zeros(self.bs, np.uint8)
        scratch = np.empty(self.bs, np.uint8)
        repairs = list(plan.repairs)
        batches = [repairs[i:i + batch] for i in range(0, len(repairs), batch)]
        progress = Progress(log, f"job {job_id!r} v{v} rebuild", sum(len(r.outputs) for r in repairs) * self.bs)

        def fetch_batch(chunk):
            per_node: dict[str, list] = {}
            for ri, rep in enumerate(chunk):
                for src in rep.fetches():
                    per_node.setdefault(group[src.node], []).append(
                        ((ri, src), (fetch_header(job_id, v, rep.stripe, src), None)))
            got: dict = {}
            corrupt: list = []  # (ri, src) whose block failed its checksum: never used
            errs = []

            def fetch(node, items):
                bad: list = []
                try:
                    self._fetch_verified(node, items, got, bad)
                except Exception as exc:
                    errs.append(f"{node}: {exc}")
                corrupt.extend((key, node) for key in bad)

            ts = [threading.Thread(target=fetch, args=it) for it in per_node.items()]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if errs:
                raise InsufficientShardsError(
                    f"rebuild of job {job_id!r} v{v}: fetch failed (a block that fails its "
                    f"checksum is corrupt and never used): {errs}")
            return got, corrupt

        def sources(ri, rep, got, bad):
            if not bad:
                return {src.shard_index(k): (zero if src.kind == "zero" else got[(ri, src)])
                        for src in rep.sources}
            if layout is None:
                raise InsufficientShardsError(
                    f"job {job_id!r} version {v}: stripe {rep.stripe}: corrupt sources "
                    f"{[describe_shard(x, n) for x, n in bad]} and no layout to re-plan")
            for x, holder in bad:
                self._corrupt_source(job_id, v, rep.stripe, x, holder, found_by)
            have = {src: got[(ri, src)] for src in rep.fetches() if (ri, src) in got}
            return self._refetch_stripe(job_id, v, layout, alive, group, rep.stripe, rep.outputs,
                                        [x for x, _ in bad], have, found_by)

        def dest(rep, o):
            if o.kind == "parity":
                return parity.view(rep.stripe, o.index), None
            seg, off, n = spans[o.block]
            if n == self.bs:
                return np.frombuffer(seg.buf, np.uint8, n, off), None
            return scratch, (seg, off, n)

        written = 0
        with ThreadPoolExecutor(1) as ex:
            nxt = ex.submit(fetch_batch, batches[0]) if batches else None
            for bi, chunk in enumerate(batches):
                got, corrupt = nxt.result()
                nxt = ex.submit(fetch_batch, batches[bi + 1]) if bi + 1 < len(batches) else None
                bad: dict = {}
                for (ri, src), holder in corrupt:
                    bad.setdefault(ri, []).append((src, holder))
                for ri, rep in enumerate(chunk):
                    avail = sources(ri, rep, got, bad.get(ri))
                    for o in rep.outputs:  # one at a time: partial blocks share scratch
                        out, partial = dest(rep, o)
                        self.code.reconstruct(avail, [o.shard_index(k)], {o.shard_index(k): out})
                        if partial is not None:
                            seg, off, n = partial
                            memoryview(seg.buf)[off:off + n] = out[:n].data
                        written += self.bs if partial is None else partial[2]
                progress.update(written, "fetch+decode")
        return written

    def _fetch(self, h: dict):
        job_id, v, kind = h["job"], int(h["v"]), h["kind"]
        if kind == "data":
            data, known = self.store.block_reader(job_id, v, self.bs, with_checksum=True)(int(h["j"]))
            hdr = {"ok": True}
            if known is not None:
                hdr[KNOWN_XXH3] = known  # the stored checksum: the receiver verifies it
            return hdr, data
        with self._lock:
            buf = self.parity.get((job_id, v))
        if buf is None:
            raise KeyError(f"no parity for job {job_id!r} version {v} here")
        s_, t = int(h["s"]), int(h["t"])
        view = buf.view(s_, t)
        want = buf.checksums.get(buf.index[(s_, t)])
        if want is None:
            raise ChecksumMismatchError(f"{self.me}: parity of job {job_id!r} v{v} is not sealed")
        # The stored checksum travels as the payload's xxh3: a corrupt block is refused
        # by the receiver (and never decoded), without hashing it twice here.
        return {"ok": True, KNOWN_XXH3: want}, view


def pack_blobs(blobs) -> tuple[list[int], bytes]:
    return [len(b) for b in blobs], b"".join(blobs)


def unpack_blobs(sizes, payload) -> list[bytes]:
    data = bytes(payload) if payload is not None else b""
    if sum(sizes) != len(data):
        raise ValueError(f"blob sizes {sum(sizes)} != payload {len(data)}")
    out, off = [], 0
    for n in sizes:
        out.append(data[off:off + n])
        off += n
    return out
