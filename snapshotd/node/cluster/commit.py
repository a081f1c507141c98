"""Committing versions across the job: carries out the pure commit protocol's actions.

:class:`CommitDriver` feeds events into each job's
:class:`~snapshotd.core.protocol.JobProtocol` (local data complete, announces,
contributions, votes, commits seen by peers) and carries out the frozen actions it
returns: a ``Commit`` at once, every action that talks to peers (announce, parity
contributions, vote) on one worker thread, in order. Contributions to ourselves go
straight into our parity buffers. It also fences (drops uncommitted rounds) and drops
jobs.

Call order: construct; :meth:`start` (the worker thread); events from any thread;
:meth:`stop_worker` then join the thread. Thread-safety: protocol state only under
``JobTable.lock``; sending (``deliver``) never holds it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from snapshotd.core import placement as pl
from snapshotd.core import protocol as proto
from snapshotd.core.blockmap import map_manifests
from snapshotd.node.metrics import NullMetrics
from snapshotd.node.peer import PeerUnavailableError, RemoteError

from . import peer_ops
from .copies import RemoteCopies
from .jobs import JobTable
from .membership import Membership
from .parity import ParityBuffers
from .records import RoundRecords

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on

# How long (in heartbeat timeouts) a sender keeps re-sending unanswered requests to a
# peer that its heartbeats still see alive (see CommitDriver.deliver).
BULK_RETRY_TIMEOUTS = 20


class CommitDriver:
    def __init__(self, *, spec, me: str, my_index: int, group: tuple[str, ...], block_size_bytes: int,
                 store, jobs: JobTable, parity: ParityBuffers, records: RoundRecords,
                 copies: RemoteCopies, membership: Membership, degraded: dict, stop: threading.Event):
        self.spec, self.me, self.my_index, self.group = spec, me, my_index, group
        self.n, self.m, self.bs = len(group), spec.parity, block_size_bytes
        self.store, self.jobs, self.parity, self.records = store, jobs, parity, records
        self.copies, self.membership = copies, membership
        self.degraded = degraded  # job -> why it is not held whole (shared with the other parts)
        self._stop = stop
        self._actions: queue.Queue = queue.Queue()
        self.metrics = NullMetrics()  # set by ClusterNode.metrics

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run_worker, name="snapshotd-cluster", daemon=True)
        t.start()
        return t

    def stop_worker(self) -> None:
        self._actions.put(None)

    # -- events ---------------------------------------------------------------------------
    def on_local_complete(self, job_id: str, v: int) -> None:
        """Every local rank delivered v (called by the store, outside its lock)."""
        shards = self.store.local_shards(job_id, v)
        ranks = [r for r, _, _ in shards]
        count = map_manifests(ranks, [m for _, m, _ in shards], self.bs).total_blocks
        with self.jobs.lock:
            acts = self.jobs.job(job_id).local_data_complete(
                v, count, ranks, [m.SerializeToString() for _, m, _ in shards])
        self.enqueue(job_id, acts)

    def on_announce(self, job_id: str, v: int, ann: proto.Announce) -> None:
        with self.jobs.lock:
            acts = self.jobs.job(job_id).announce_received(v, ann)
        self.enqueue(job_id, acts)

    def on_vote(self, job_id: str, v: int, sender: str, ranks) -> None:
        with self.jobs.lock:
            acts = self.jobs.job(job_id).vote_received(v, sender, ranks)
        self.enqueue(job_id, acts)

    def on_peer_committed(self, committed: dict) -> None:
        """A peer reported its committed versions ({job: v}) in a heartbeat."""
        for job_id, v in committed.items():
            with self.jobs.lock:
                jp = self.jobs.get(job_id)
                acts = jp.committed_elsewhere(int(v)) if jp else []
            self.enqueue(job_id, acts)

    def committed_elsewhere(self, job_id: str, v: int) -> None:
        """Version v is committed on other nodes: promote it here if we hold it whole."""
        with self.jobs.lock:
            acts = self.jobs.job(job_id).committed_elsewhere(v)
        self.enqueue(job_id, acts)

    def accumulate(self, job_id: str, v, s: int, t: int, p: int, counts: tuple, data) -> None:
        """A parity contribution for us (from a peer, or from ourselves)."""
        # One sender's contributions arrive through the peer server thread (ours through
        # the worker), one at a time, so no (s, t, p) is ever applied by two threads at once.
        with self.jobs.lock:
            jp = self.jobs.job(job_id)
            if v <= jp.committed_version:
                return
            layout = jp.layout_from_contribution(v, tuple(counts))
            r = jp.round(v)
            if (s, t, p) not in r.expected:
                return  # a retry of something already accumulated
        buf = self.parity.buffer(job_id, v, layout)
        if not self.parity.add(buf, s, t, p, data):
            return
        with self.jobs.lock:
            if self.parity.get(job_id, v) is not buf:
                return
            acts = jp.contribution_received(v, s, t, p)
        self.enqueue(job_id, acts)

    def latest_committed(self, job_id: str) -> int:
        """The newest version any live node of the job reports committed."""
        self.membership.wait_first_round()
        with self.jobs.lock:
            mine = self.jobs.job(job_id).committed_version
        return max([mine] + self.membership.committed_by_alive_peers(job_id))

    # -- actions ----------------------------------------------------------------------------
    def enqueue(self, job_id: str, acts: list) -> None:
        for a in acts:
            if isinstance(a, proto.Commit):
                self._commit(job_id, a.version)
            else:
                self._actions.put((job_id, a))

    def run_worker(self) -> None:
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

    def broadcast(self, nodes, request, payload=None, job_id: str | None = None, v: int | None = None) -> None:
        """Deliver one ``PeerRequest`` of version ``v`` of the job to every node of ``nodes`` but us."""
        for node in nodes:
            if node == self.me:
                continue
            try:
                self.deliver(node, [(request, payload)], job_id, v)
            except (PeerUnavailableError, RemoteError) as exc:
                log.warning("%s to %s failed: %s", request.WhichOneof("op"), node, exc)

    def deliver(self, node: str, reqs: list, job_id: str | None = None, v: int | None = None,
                window: int = 8) -> None:
        """Send requests the peer must all execute (announce, contributions, votes):
        ``reqs`` are ``(PeerRequest, payload[, payload_xxh3])``.

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
                self.membership.peer(node).call_many([reqs[i] for i in batch], window=window,
                                                     on_reply=lambda i, rep, d: acked.add(batch[i]))
                return
            except PeerUnavailableError as exc:
                pending = [i for i in batch if i not in acked]
                if acked:  # it answered some: alive, just behind
                    self.membership.seen(node)
                if (self._stop.is_set() or time.monotonic() > deadline
                        or node not in self.membership.alive_peers() or not self._still_open(job_id, v)):
                    raise
                log.info("%s: %d of %d requests unanswered (%s); sending them again",
                         node, len(pending), len(reqs), exc)

    def _still_open(self, job_id: str | None, v: int | None) -> bool:
        """Version v of the job is neither committed nor dropped (nothing to retry for)."""
        if job_id is None or v is None:
            return True
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            return jp is not None and v > jp.committed_version and v in jp.rounds

    def _send_announce(self, job_id: str, a: proto.SendAnnounce) -> None:
        req, blob = peer_ops.announce(job_id, a.version, a.announce)
        self.broadcast(self.group, req, blob, job_id, a.version)

    def _send_contributions(self, job_id: str, a: proto.SendContributions) -> None:
        blocks = self.store.block_reader(job_id, a.version, self.bs, with_checksum=True)
        per_holder: dict[str, list] = {}
        for j, s, p in a.layout.data_blocks(self.my_index):
            data, known = blocks(j)
            for t, holder in enumerate(pl.stripe_parity_nodes(self.n, self.m, s)):
                if holder == self.my_index:
                    self.accumulate(job_id, a.version, s, t, p, tuple(a.block_counts), data)
                else:  # with the adopt-time checksum: the holder verifies it
                    req = peer_ops.contrib(job_id, a.version, s, t, p, a.block_counts)
                    per_holder.setdefault(self.group[holder], []).append((req, data, known))
        errs = []

        def send(node, reqs):
            try:
                self.deliver(node, reqs, job_id, a.version)
            except Exception as exc:
                errs.append((node, exc))

        ts = [threading.Thread(target=send, args=(nd, r)) for nd, r in per_holder.items()]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errs:
            raise RuntimeError(f"contributions not delivered: {errs}")
        with self.jobs.lock:
            acts = self.jobs.job(job_id).contributions_delivered(a.version)
        self.enqueue(job_id, acts)

    def _send_vote(self, job_id: str, a: proto.SendVote) -> None:
        self.parity.seal(job_id, a.version)
        self.broadcast([nd.id for nd in self.spec.nodes], peer_ops.vote(job_id, a.version, a.ranks),
                       None, job_id, a.version)

    def _commit(self, job_id: str, v: int) -> None:
        # Our own vote counts as soon as the protocol emits it, so the peers' votes can
        # complete v before the worker has sealed our parity for it. The record saved
        # below must carry the seal: a restarted daemon serves parity only by it.
        self.parity.seal(job_id, v)
        self.store.commit_version(job_id, v)
        with self.jobs.lock:
            self.parity.release_older(job_id, v)
            self.copies.release_older(job_id, v)
            self.records.save(job_id, v)
        self.degraded.pop(job_id, None)
        self.metrics.committed(job_id, v)
        log.info("job %s: version %d committed", job_id, v)

    # -- restarts and drops ------------------------------------------------------------------
    def fence(self, job_id: str, broadcast: bool = False) -> None:
        """The job restarts from its committed version: drop every uncommitted round
        here (and, for the node whose trainer restarted, on every node of the job)."""
        with self.jobs.lock:
            dropped = self.jobs.job(job_id).fence()
            for v in dropped:
                self.parity.release((job_id, v))
        self.store.fence(job_id, keep_version=self.jobs.rebuilding_version(job_id))
        if dropped:
            log.info("job %s: fenced, dropped uncommitted versions %s", job_id, dropped)
        if broadcast:
            self.broadcast([nd.id for nd in self.spec.nodes], peer_ops.fence(job_id), None, job_id)

    def drop_job(self, job_id: str) -> int:
        """The job is dropped on this node (DropJob): release its parity buffers, the
        pooled ones, copies of other nodes' shards and its round record. Returns bytes freed."""
        with self.jobs.lock:
            freed = self.parity.drop_job(job_id)
            self.copies.drop_job(job_id)
            self.jobs.drop(job_id)
            self.degraded.pop(job_id, None)
        self.records.delete(job_id)
        return freed
