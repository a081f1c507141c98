"""Committing versions across the job: carries out the pure commit protocol's actions.

:class:`CommitDriver` feeds events into each job's
:class:`~snapshotd.core.protocol.JobProtocol` (local data complete, announces,
contributions, commit messages, commits seen by peers) and carries out the frozen
actions it returns: a ``Commit`` at once, every action that talks to peers (announce,
parity contributions, vote to the group, report to the parent group, commit word to
the child groups: the commit tree of :mod:`snapshotd.core.protocol`) on one worker
thread, in order. Contributions to ourselves go
straight into our parity buffers. Each peer's acknowledgement goes back into the
protocol; what a peer did not acknowledge is re-sent by the :class:`~.resend.Resender`
until it is, or the version is committed or dropped: a failed delivery is never
dropped (issue 18). It also fences (drops uncommitted rounds) and drops jobs.

A node with no peers (one node, so no parity, in the only group: ``peerless``) has
nothing to send: every action but the commit goes to nobody. There the actions are
carried out at once on the thread that caused them (the adopting trainer's, through
the store's commit hook), one event at a time, instead of through the worker's queue
(issue 16: two thread hand-offs per save): what is left of them is sealing our (empty)
parity at the vote and the protocol's next step; the commit and its round record are
the same as in a cluster.

Call order: construct; :meth:`start` (the worker and resend threads); events from any
thread; :meth:`stop_worker` then join the threads. Thread-safety: protocol state only under
``JobTable.lock``; sending (``deliver``) never holds it. Peerless, the events are
serialised by one lock of their own (taken before the job table's or the store's).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from snapshotd.core import commit_tree
from snapshotd.core import placement as pl
from snapshotd.core import protocol as proto
from snapshotd.core.blockmap import map_manifests
from snapshotd.node.metrics import NullMetrics
from snapshotd.node.peer import PeerUnavailableError, RemoteError
from snapshotd.wire.ratelimit import WarningLimiter

from . import peer_ops
from .copies import RemoteCopies
from .jobs import JobTable
from .membership import Membership
from .parity import ParityBuffers
from .records import RoundRecords
from .resend import Resender

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on

# How long (in heartbeat timeouts) a sender keeps re-sending unanswered requests to a
# peer that its heartbeats still see alive (see CommitDriver.deliver).
BULK_RETRY_TIMEOUTS = 20

# Delta contributions are compared with the committed blocks and sent to a holder this
# many at a time, so the first leave while the rest are being read (cluster/delta.py).
CONTRIB_BATCH = 64

# Test-only fault hook: the node named here misses every commit message from its peers
# (their votes, reports and words are acknowledged and ignored; heartbeats' committed
# versions too), while it still votes itself. The others commit; it never learns of it
# except when a restore asks it to open the version (tests/integration/
# test_restore_verdict.py). Never set it in production.
MISS_COMMIT_ENV = "SNAPSHOTD_TEST_MISS_COMMIT"

# Peerless, a commit is logged at INFO at most this often per job (with the count of
# those not shown); in a cluster every commit is (the chaos tools wait for the lines).
COMMIT_LOG_INTERVAL_S = 60.0


class CommitDriver:
    def __init__(self, *, spec, me: str, my_index: int, group: tuple[str, ...], block_size_bytes: int,
                 store, jobs: JobTable, parity: ParityBuffers, records: RoundRecords,
                 copies: RemoteCopies, membership: Membership, degraded: dict, stop: threading.Event):
        self.spec, self.me, self.my_index, self.group = spec, me, my_index, group
        self.n, self.m, self.bs = len(group), spec.parity, block_size_bytes
        self.store, self.jobs, self.parity, self.records = store, jobs, parity, records
        self.copies, self.membership = copies, membership
        # The commit tree's neighbours: where our reports go up and our words go down.
        self.parent_nodes, self.child_nodes = commit_tree.neighbours(spec.groups, spec.group_of(me)[0])
        self.degraded = degraded  # job -> why it is not held whole (shared with the other parts)
        self._stop = stop
        self._actions: queue.Queue = queue.Queue()
        self.metrics = NullMetrics()  # set by ClusterNode.metrics
        # (job, v, holder) -> {(s, t, p)} the holder acknowledged: a resend skips them.
        self._acked_contribs: dict[tuple[str, int, str], set] = {}
        self.resender = Resender(jobs=jobs, enqueue=self._enqueue_resent, alive_peers=membership.alive_peers,
                                 min_backoff_s=spec.heartbeat_interval_ms / 1000, stop=stop)
        self._resend_thread: threading.Thread | None = None
        self._miss_commit = os.environ.get(MISS_COMMIT_ENV, "") == me
        self.delta = None  # .delta.DeltaParity (set by the node): deltas instead of whole blocks
        # No peers: the actions run on the calling thread, one event at a time (module docstring).
        self.peerless = self.n == 1 and not self.parent_nodes and not self.child_nodes
        self._alone = threading.RLock()
        self._commit_log = WarningLimiter(COMMIT_LOG_INTERVAL_S)
        if self._miss_commit:
            log.warning("node %s: TEST FAULT armed (%s): it ignores its peers' commit messages",
                        me, MISS_COMMIT_ENV)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Start the worker (returned) and the resend thread (stopped by stop_worker)."""
        self._resend_thread = self.resender.start()
        t = threading.Thread(target=self.run_worker, name="snapshotd-cluster", daemon=True)
        t.start()
        return t

    def stop_worker(self) -> None:
        self._actions.put(None)
        self.resender.stop()

    # -- events ---------------------------------------------------------------------------
    def on_local_complete(self, job_id: str, v: int) -> None:
        """Every local rank delivered v (called by the store, outside its lock)."""
        if self.peerless:
            with self._alone:
                self._on_local_complete(job_id, v)
        else:
            self._on_local_complete(job_id, v)

    def _on_local_complete(self, job_id: str, v: int) -> None:
        ranks, mans, raws = self.store.local_manifests(job_id, v)  # raws: as written at delivery
        count = map_manifests(ranks, mans, self.bs).total_blocks
        with self.jobs.lock:
            acts = self.jobs.job(job_id).local_data_complete(v, count, ranks, raws)
        self.enqueue(job_id, acts)

    def on_announce(self, job_id: str, v: int, ann: proto.Announce) -> None:
        with self.jobs.lock:
            acts = self.jobs.job(job_id).announce_received(v, ann)
        self.enqueue(job_id, acts)

    def on_vote(self, job_id: str, v: int, sender: str, ranks, kind: str = proto.VOTE) -> None:
        """A ``vote`` op: a vote, a report or a commit word (``kind``)."""
        if self._miss_commit and sender != self.me:
            return
        with self.jobs.lock:
            acts = self.jobs.job(job_id).step_received(v, sender, kind, ranks)
        self.enqueue(job_id, acts)

    def on_peer_committed(self, committed: dict) -> None:
        """A peer reported its committed versions ({job: v}) in a heartbeat."""
        if self._miss_commit:
            return
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

    def accumulate(self, job_id: str, v, s: int, t: int, p: int, counts: tuple, data, base: int = 0) -> None:
        """A parity contribution for us (from a peer, or from ourselves); with ``base``, the
        block's change since that committed version (None: unchanged; :mod:`.delta`)."""
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
        based = self.delta.base_buffer(job_id, v, base, counts) if base else None  # refused: raises
        buf = self.parity.buffer(job_id, v, layout)
        if not self.parity.add(buf, s, t, p, data, base=based):
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
        if self._miss_commit:  # the test hook: deaf to what the peers say committed
            return mine
        return max([mine] + self.membership.committed_by_alive_peers(job_id))

    # -- actions ----------------------------------------------------------------------------
    def enqueue(self, job_id: str, acts: list) -> None:
        if self.peerless and acts:
            with self._alone:
                for a in acts:
                    self._carry_out_alone(job_id, a)
            return
        for a in acts:
            if isinstance(a, proto.Commit):
                self._commit(job_id, a.version)
            else:
                self._actions.put((job_id, a))

    def _carry_out_alone(self, job_id: str, a) -> None:
        """An action of a peerless node, at once (under ``_alone``): what the worker would
        do, less the sends to nobody (no announce, vote, report or word has a receiver;
        with m = 0 no data block has a parity holder, so no contribution is read)."""
        if isinstance(a, proto.Commit):
            self._commit(job_id, a.version)
        elif isinstance(a, proto.SendContributions):
            with self.jobs.lock:
                jp = self.jobs.get(job_id)
                acts = jp.contributions_delivered(a.version) if jp is not None else []
            self.enqueue(job_id, acts)
        elif isinstance(a, proto.SendVote):
            self.parity.seal(job_id, a.version)

    def _enqueue_resent(self, job_id: str, acts: list) -> None:
        for a in acts:
            self._actions.put((job_id, a))

    def run_worker(self) -> None:
        while not self._stop.is_set():
            item = self._actions.get()
            if item is None:
                return
            job_id, a = item
            failures: list = []
            try:
                if isinstance(a, proto.SendAnnounce):
                    failures = self._send_announce(job_id, a)
                elif isinstance(a, proto.SendContributions):
                    failures = self._send_contributions(job_id, a)
                elif isinstance(a, proto.SendVote):
                    failures = self._send_vote(job_id, a)
                elif isinstance(a, proto.SendReport):
                    failures = self._send_tree(job_id, a, self.parent_nodes)
                elif isinstance(a, proto.SendWord):
                    failures = self._send_tree(job_id, a, self.child_nodes)
            except Exception as exc:  # e.g. the version was fenced meanwhile: the resend finds out
                log.warning("job %s v%d: %s failed: %s", job_id, a.version, type(a).__name__, exc)
                failures = [("-", exc)]
            self.resender.finished(job_id, a.version, a.kind, a.to is not None, failures)

    def broadcast(self, nodes, request, payload=None, job_id: str | None = None, v: int | None = None,
                  kind: str | None = None) -> list:
        """Deliver one ``PeerRequest`` of version ``v`` of the job to every node of
        ``nodes`` but us. With ``kind``, each acknowledgement goes into the protocol.
        Returns [(node, exc)] of the nodes it could not deliver to. The peers the
        heartbeats see alive go first: a dead one costs a reply timeout."""
        failures = []
        alive = self.membership.alive_peers()
        for node in sorted(nodes, key=lambda nd: nd not in alive):
            if node == self.me:
                continue
            try:
                self.deliver(node, [(request, payload)], job_id, v)
            except (PeerUnavailableError, RemoteError) as exc:
                failures.append((node, exc))
                if kind is None:
                    log.warning("%s to %s failed: %s", request.WhichOneof("op"), node, exc)
                continue
            if kind is not None:
                self._delivered(job_id, v, kind, node)
        return failures

    def _delivered(self, job_id: str, v: int, kind: str, node: str) -> None:
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            acts = jp.delivered(v, kind, node) if jp is not None else []
        self.enqueue(job_id, acts)

    def deliver(self, node: str, reqs: list, job_id: str | None = None, v: int | None = None,
                window: int = 8, on_acked=None) -> None:
        """Send requests the peer must all execute (announce, contributions, votes):
        ``reqs`` are ``(PeerRequest, payload[, payload_xxh3])``.

        A stall (no reply within the heartbeat timeout) is not a verdict on the peer:
        under load a busy receiver can fall behind a bulk window. While heartbeats (their
        own connection) still see the peer and version ``v`` is still being committed,
        the requests not yet acknowledged are sent again -- every handler is idempotent
        -- for up to BULK_RETRY_TIMEOUTS heartbeat timeouts; then it raises, and the
        caller's :class:`~.resend.Resender` sends what is left later. ``on_acked(i)`` is
        called for each request ``reqs[i]`` the peer acknowledged."""
        pending = list(range(len(reqs)))
        deadline = time.monotonic() + BULK_RETRY_TIMEOUTS * self.spec.heartbeat_timeout_ms / 1000
        retries = 0
        while True:
            acked: set[int] = set()
            batch = pending

            def on_reply(i, rep, d, batch=batch, acked=acked):
                acked.add(batch[i])
                if on_acked is not None:
                    on_acked(batch[i])

            try:
                self.membership.peer(node).call_many([reqs[i] for i in batch], window=window,
                                                     on_reply=on_reply)
                return
            except PeerUnavailableError as exc:
                pending = [i for i in batch if i not in acked]
                if acked:  # it answered some: alive, just behind
                    self.membership.seen(node)
                if (self._stop.is_set() or time.monotonic() > deadline
                        or node not in self.membership.alive_peers() or not self._still_open(job_id, v)):
                    raise
                retries += 1
                (log.info if retries == 1 else log.debug)(
                    "%s: %d of %d requests unanswered (%s); sending them again", node, len(pending),
                    len(reqs), exc)

    def _still_open(self, job_id: str | None, v: int | None) -> bool:
        """Version v of the job is neither committed nor dropped (nothing to retry for)."""
        if job_id is None or v is None:
            return True
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            return jp is not None and v > jp.committed_version and v in jp.rounds

    def _send_announce(self, job_id: str, a: proto.SendAnnounce) -> list:
        base = self.delta.claim(job_id, a.version) if self.delta is not None else 0
        req, blob = peer_ops.announce(job_id, a.version, a.announce, delta_base=base)
        return self.broadcast(a.to or self.group, req, blob, job_id, a.version, kind=proto.ANNOUNCE)

    def _send_contributions(self, job_id: str, a: proto.SendContributions) -> list:
        """Each real data block to the m parity holders of its stripe (``a.to``: only
        to those, and only what they have not acknowledged). [(holder, exc)] of the
        holders not (wholly) delivered to."""
        v = a.version
        # Delta parity: u > 0 when the group agreed to send changes since committed version u.
        u = self.delta.mode(job_id, v, a.layout) if self.delta is not None else 0
        blocks = self.delta.reader(job_id, v, u) if self.delta is not None else \
            self.store.block_reader(job_id, v, self.bs, with_checksum=True)
        targets = None if a.to is None else set(a.to)
        prebuild = None
        if targets is None and self.m and a.layout.parity_blocks(self.my_index):  # our own parity buffer: built beside the sends, not on demand
            prebuild = threading.Thread(target=self._prebuild, args=(job_id, v, a.layout), daemon=True)
            prebuild.start()
        per_holder: dict[str, list] = {}
        keys: dict[str, list] = {}
        for j, s, p in a.layout.data_blocks(self.my_index):
            for t, holder in pl.contribution_targets(self.n, self.m, s):  # the accumulator (H4, issue 16)
                node = self.group[holder]
                if holder == self.my_index:
                    if targets is None:
                        data, _known = blocks(j)
                        self.accumulate(job_id, v, s, t, p, tuple(a.block_counts), data, base=u)
                elif targets is None or node in targets:
                    if (s, t, p) in self._acked_contribs.get((job_id, v, node), ()):
                        continue
                    # read when sent, in batches (a delta is compared first): the holder verifies the checksum
                    per_holder.setdefault(node, []).append((j, peer_ops.contrib(job_id, v, s, t, p, a.block_counts,
                                                                                base=u)))
                    keys.setdefault(node, []).append((s, t, p))
        errs = []

        def send(node, todo):
            got = self._acked_contribs.setdefault((job_id, v, node), set())
            try:
                step = CONTRIB_BATCH if u else max(1, len(todo))  # whole blocks: views, no memory
                for lo in range(0, len(todo), step):
                    reqs = []
                    for j, req in todo[lo:lo + step]:
                        data, known = blocks(j)
                        if data is None:  # a delta of zero: said in the header, no payload
                            req.contrib.unchanged = True
                        reqs.append((req, data, known))
                    self.deliver(node, reqs, job_id, v, on_acked=lambda i, lo=lo: got.add(keys[node][lo + i]))
            except Exception as exc:
                errs.append((node, exc))
                return
            self._delivered(job_id, v, proto.CONTRIB, node)

        ts = [threading.Thread(target=send, args=(nd, r)) for nd, r in per_holder.items()]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if targets is not None:  # holders with nothing left to send had acknowledged it all
            for node in targets - set(per_holder):
                self._delivered(job_id, v, proto.CONTRIB, node)
        if prebuild is not None:
            prebuild.join()
        if errs:
            return errs
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            acts = jp.contributions_delivered(v) if jp is not None else []
        self.enqueue(job_id, acts)
        return []

    def _prebuild(self, job_id: str, v: int, layout) -> None:
        """Create our parity buffer of v before the peers' contributions need it."""
        try:
            if self._still_open(job_id, v):
                self.parity.buffer(job_id, v, layout)
        except Exception as exc:  # the first contribution builds it then
            log.warning("job %s v%d: parity buffer not built ahead: %s", job_id, v, exc)

    def _send_vote(self, job_id: str, a: proto.SendVote) -> list:
        self.parity.seal(job_id, a.version)
        return self.broadcast(a.to or self.group, peer_ops.vote(job_id, a.version, a.ranks), None,
                              job_id, a.version, kind=proto.VOTE)

    def _send_tree(self, job_id: str, a, nodes: tuple[str, ...]) -> list:
        """A report (to the parent group) or a commit word (to the child groups): the
        ``vote`` op with its step, without ranks."""
        return self.broadcast(a.to or nodes, peer_ops.vote(job_id, a.version, (), a.kind), None, job_id,
                              a.version, kind=a.kind)

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
        self._forget_acks(job_id, lambda x: x <= v)
        self.degraded.pop(job_id, None)
        self.metrics.committed(job_id, v)
        if not self.peerless:
            log.info("job %s: version %d committed", job_id, v)
            return
        shown, held = self._commit_log.allow(job_id)
        (log.info if shown else log.debug)("job %s: version %d committed%s", job_id, v,
                                           self._commit_log.held_note(held) if shown else "")

    # -- restarts and drops ------------------------------------------------------------------
    def fence(self, job_id: str, broadcast: bool = False) -> None:
        """The job restarts from its committed version: drop every uncommitted round
        here (and, for the node whose trainer restarted, on every node of the job)."""
        with self.jobs.lock:
            jp = self.jobs.job(job_id)
            dropped, committed = jp.fence(), jp.committed_version
            for v in dropped:
                self.parity.release((job_id, v))
        if self.delta is not None:  # the restarted run's versions are decided afresh
            self.delta.forget(job_id, committed)
        self.store.fence(job_id, keep_version=self.jobs.rebuilding_version(job_id))
        self._forget_acks(job_id, lambda x: x in dropped)
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
        self._forget_acks(job_id, lambda x: True)
        if self.delta is not None:
            self.delta.forget(job_id)
        return freed

    def _forget_acks(self, job_id: str, which) -> None:
        for key in [k for k in list(self._acked_contribs) if k[0] == job_id and which(k[1])]:
            self._acked_contribs.pop(key, None)
