"""The accumulator's forwards: parity rows 1..m-1 of the stripes we accumulate, to their holders.

With the accumulator route (issue 16, :mod:`snapshotd.core.placement`) the data blocks of
stripe s reach only the holder of its parity row 0, which computes every row
(:meth:`ParityBuffers.add <.parity.ParityBuffers.add>`) and hands rows 1..m-1 here
(:meth:`Forwarder.submit`). One sender thread per target peer sends them (the ``contrib``
op with ``forwarded`` set, the row's xxh3 computed once) on a connection of its own
(not the commit worker's, whose contributions to that peer would otherwise hold the
rows back until they are all sent: at 512 MiB per node that kept every forwarded row,
(m-1)/k of the data, in memory at once) and drops each row when the peer acknowledges
it. A delivery that fails (a stalled receiver, a peer that looked dead
for a while) is never dropped: what is left is sent again after a backoff (doubling from
the heartbeat interval up to :data:`RESEND_MAX_S`) for as long as the version is open; a
committed, fenced or dropped version's rows are dropped. A holder stores a forwarded row
as it comes (:meth:`Forwarder.receive_row`, on the peer server's bulk thread) and counts
it, in the commit protocol, as every data block of the stripe received (the row is
their combination), so the protocol's accounting is the same on either route.

Delta parity (:mod:`.delta`): a row computed from deltas against committed version u is
the row's change; it travels naming u (``delta_base``), or as a header alone
(``unchanged``) when no block of its stripe changed, and the holder adds it to its own
parity of u (:meth:`ParityBuffers.put_row <.parity.ParityBuffers.put_row>`), which it must
hold verified (``delta.base_buffer``), else it refuses the row and it is sent again.

Rows waiting here are private memory (m-1 blocks per accumulated stripe, at most
(m-1)/k of the node's data, usually a few blocks: they leave as fast as they are made);
``status()`` reports them.

Call order: construct; :meth:`start`; :meth:`submit` and :meth:`receive_row` from any
thread; :meth:`stop`. Thread-safety: one lock (never held while sending or while taking
``JobTable.lock``); ``submit`` only queues (it runs under a parity buffer's lock).
"""

from __future__ import annotations

import logging
import threading
import time

import xxhash

from snapshotd.node.peer import PeerClient, PeerUnavailableError, RemoteError

from . import peer_ops

log = logging.getLogger("snapshotd.cluster")

RESEND_MAX_S = 5.0  # the longest wait between two tries
BATCH = 64  # rows per delivery (the peer client keeps a window of them in flight)


class _Target:
    """Rows waiting for one peer, and that peer's sender state."""

    def __init__(self) -> None:
        self.rows: dict = {}  # (job, v, s, t) -> (counts, block or None (unchanged), xxh3, delta base)
        self.due = 0.0  # monotonic time of the next try
        self.backoff = 0.0
        self.tries = 0  # failed deliveries in the current episode
        self.last_error = ""
        self.thread: threading.Thread | None = None


class Forwarder:
    def __init__(self, *, me: str, group: tuple, jobs, parity, commit, membership, stop: threading.Event,
                 min_backoff_s: float, send=None):
        """``send(node, reqs, job_id, v, on_acked=...)`` delivers requests (raising
        PeerUnavailableError or RemoteError); default: our own client per peer."""
        self.me, self.group = me, tuple(group)
        self._send = send or self._send_own
        self._clients: dict = {}  # node -> PeerClient of our own (touched by its sender thread only)
        self.jobs, self.parity, self.commit, self.membership = jobs, parity, commit, membership
        self._stop = stop
        self.min_backoff_s = max(0.01, float(min_backoff_s))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._targets: dict[str, _Target] = {}
        self._started = False
        self.stats = {"rows_sent": 0, "rows_received": 0, "rows_dropped": 0, "failed_deliveries": 0,
                      "waiting_peak_bytes": 0}
        self._waiting_bytes = 0
        self.delta = None  # .delta.DeltaParity: checks the base a delta row names (set by the node)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start one sender thread per peer of the group."""
        with self._lock:
            self._started = True
            for node in self.group:
                if node != self.me:
                    tg = self._targets.setdefault(node, _Target())
                    tg.thread = threading.Thread(target=self._run, args=(node,), daemon=True,
                                                 name=f"snapshotd-forward-{node}")
                    tg.thread.start()

    def stop(self) -> None:
        with self._wake:
            self._wake.notify_all()
        for tg in list(self._targets.values()):
            if tg.thread is not None and tg.thread is not threading.current_thread():
                tg.thread.join(5)
        for c in list(self._clients.values()):
            c.close()

    def _send_own(self, node: str, reqs: list, job_id=None, v=None, on_acked=None) -> None:
        c = self._clients.get(node)
        if c is None:
            mb = self.membership
            nd = mb.spec.node(node)
            c = self._clients[node] = PeerClient(f"tcp://{nd.host}:{nd.peer_port}", self.me, node, mb.key,
                                                 timeout_ms=mb.spec.heartbeat_timeout_ms, curve=mb.curve)
        c.call_many(reqs, window=8, on_reply=lambda i, rep, d: on_acked(i))

    # -- the accumulator's side ---------------------------------------------------------------
    def submit(self, job_id: str, v: int, s: int, counts: tuple, rows: list, base: int = 0) -> None:
        """Rows [(t, block)] of stripe s of version v, computed here, for their holders.
        With ``base`` (delta parity) each block is the row's change since version ``base``,
        None when nothing changed."""
        with self._wake:
            for t, block in rows:
                node = self.group[(s + t) % len(self.group)]
                tg = self._targets.setdefault(node, _Target())
                if (job_id, v, s, t) not in tg.rows and block is not None:
                    self._waiting_bytes += block.nbytes
                xx = None if block is None else xxhash.xxh3_64_intdigest(block)
                tg.rows[(job_id, v, s, t)] = (tuple(counts), block, xx, int(base))
            self.stats["waiting_peak_bytes"] = max(self.stats["waiting_peak_bytes"], self._waiting_bytes)
            self._wake.notify_all()

    def _open(self, job_id: str, v: int) -> bool:
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            return jp is not None and v > jp.committed_version and v in jp.rounds

    def _run(self, node: str) -> None:
        tg = self._targets[node]
        while not self._stop.is_set():
            with self._wake:
                now = time.monotonic()
                if not tg.rows or tg.due > now:
                    self._wake.wait(min(tg.due - now, 1.0) if tg.rows else 1.0)
                    continue
                batch = sorted(tg.rows)[:BATCH]
            closed = {(j, v) for j, v in {(k[0], k[1]) for k in batch} if not self._open(j, v)}
            if closed:
                with self._wake:
                    for key in [k for k in tg.rows if (k[0], k[1]) in closed]:
                        self._waiting_bytes -= _nbytes(tg.rows.pop(key)[1])
                        self.stats["rows_dropped"] += 1
                continue
            self._deliver(node, tg, batch)

    def _deliver(self, node: str, tg: _Target, batch: list) -> None:
        with self._lock:
            items = [(key, tg.rows[key]) for key in batch if key in tg.rows]
        reqs = [(peer_ops.parity_row(job, v, s, t, counts, base=base, unchanged=block is None), block, xx)
                for (job, v, s, t), (counts, block, xx, base) in items]
        done: list = []

        def acked(i: int) -> None:
            done.append(items[i][0])

        err = None
        try:
            # A stall raises: we wait a backoff and send what is left, while the version is open.
            self._send(node, reqs, items[0][0][0], items[0][0][1], on_acked=acked)
        except (PeerUnavailableError, RemoteError) as exc:
            err = exc
        except Exception as exc:  # never let the sender thread die
            log.exception("forward of parity rows to %s failed", node)
            err = exc
        del reqs
        with self._wake:
            for key in done:
                row = tg.rows.pop(key, None)
                if row is not None:
                    self._waiting_bytes -= _nbytes(row[1])
            self.stats["rows_sent"] += len(done)
            if err is None:
                if tg.tries:
                    log.info("parity rows to %s delivered after %d failed tries", node, tg.tries)
                tg.tries, tg.backoff, tg.due = 0, 0.0, 0.0
                return
            self.stats["failed_deliveries"] += 1
            tg.tries += 1
            tg.last_error = str(err)[:300]
            tg.backoff = min(RESEND_MAX_S, max(self.min_backoff_s, tg.backoff * 2))
            tg.due = time.monotonic() + tg.backoff
        if tg.tries == 1:
            log.warning("forwarded parity rows to %s not acknowledged (%s); re-sending with backoff until "
                        "they are, or their versions commit or are dropped", node, err)

    # -- the holder's side ------------------------------------------------------------------------
    def receive_row(self, job_id: str, v: int, s: int, t: int, counts: tuple, data, base: int = 0) -> None:
        """Parity row t of stripe s, forwarded by the stripe's accumulator: store it and
        count every real data block of the stripe as received for row t. With ``base``:
        the row's change since that committed version (None: unchanged), added to our
        parity of it (refused, ConflictError, when we do not hold it verified)."""
        with self.jobs.lock:
            jp = self.jobs.job(job_id)
            if v <= jp.committed_version:
                return
            layout = jp.layout_from_contribution(v, tuple(counts))
            if not 0 <= s < layout.num_stripes or not 0 < t < layout.m \
                    or layout.stripe_nodes(s)[1][t] != jp.my_index:
                raise ValueError(f"parity row {t} of stripe {s} is not held by {self.me}")
            positions = [p for p, (_nd, _j, real) in enumerate(layout.stripe_blocks(s)) if real]
            r = jp.round(v)
            if not any((s, t, p) in r.expected for p in positions):
                return  # a retry of something already stored
        based = None
        if base:
            if self.delta is None:
                raise ValueError("delta parity rows are not accepted here")
            based = self.delta.base_buffer(job_id, v, base, tuple(counts))
        buf = self.parity.buffer(job_id, v, layout)
        if not self.parity.put_row(buf, s, t, data, base=based):
            return
        acts: list = []
        with self.jobs.lock:
            if self.parity.get(job_id, v) is not buf:
                return
            for p in positions:
                acts += jp.contribution_received(v, s, t, p)
        with self._lock:
            self.stats["rows_received"] += 1
        self.commit.enqueue(job_id, acts)

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict:
        """{"waiting": {peer: {"rows", "tries", "last_error"}}, counters, and (for the
        memory accounting) the bytes of rows waiting now and at most, and the most
        contributions one parity buffer held at once."""
        with self._lock:
            waiting = {node: {"rows": len(tg.rows), "tries": tg.tries, "last_error": tg.last_error}
                       for node, tg in self._targets.items() if tg.rows}
            out = {"waiting": waiting, **self.stats, "waiting_bytes": self._waiting_bytes}
        if self.parity is not None:
            out["held_peak_bytes"] = self.parity.held_peak_bytes
        return out


def _nbytes(block) -> int:
    return 0 if block is None else block.nbytes
