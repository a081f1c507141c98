"""Who is there: peer clients, heartbeats, liveness and what each peer reports committed.

:class:`Membership` owns the :class:`~snapshotd.node.peer.PeerClient` of every peer (two
per peer: ``control`` for heartbeats, the other for bulk traffic, so pings never queue
behind a transfer), the heartbeat thread (:meth:`run_heartbeats`), the time each peer was
last heard from and the committed versions it reported. Liveness is the pure rule
:func:`snapshotd.core.membership.alive`. A node heartbeats only the peers it works with
(:attr:`Membership.peers`, :func:`snapshotd.core.commit_tree.watched`): its group and
the members of its parent and child groups in the commit tree, so heartbeats per node
stay O(group size), not O(nodes); a commit gossiped on them travels the same tree.

Call order: construct; ``run_heartbeats`` in its own thread (returns when ``stop`` is
set); :meth:`close` after that thread ended. Thread-safe: ``peer`` may be called from
any thread (creating a client is a single dict store; a duplicate made by a race is
harmless), ``seen``/``gossip`` from the peer server thread and the ping pool.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from snapshotd.core.commit_tree import watched
from snapshotd.core.membership import alive
from snapshotd.core.spec import ClusterSpec
from snapshotd.node.peer import PeerClient, PeerUnavailableError, RemoteError

from . import peer_ops

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on

PING_FAILURE_LOG_EVERY_S = 30.0  # while a peer keeps failing pings: one line per this


class Membership:
    def __init__(self, spec: ClusterSpec, me: str, group: tuple[str, ...], key: bytes | None, curve,
                 stop: threading.Event, committed_versions: Callable[[], dict],
                 on_gossip: Callable[[dict], None]):
        """``committed_versions()``: what our pings report; ``on_gossip(committed)``: a
        peer reported its committed versions ({job: v})."""
        self.spec, self.me, self.group = spec, me, group
        self.key, self.curve = key, curve
        self._stop = stop
        self._committed_versions = committed_versions
        self._on_gossip = on_gossip
        self._clients: dict = {}  # (node, control) -> PeerClient
        self.last_seen: dict[str, float] = {}
        self.peer_committed: dict[str, dict[str, int]] = {}
        self.first_round = threading.Event()  # every group peer was pinged once since start
        # node -> [failed pings in a row, when we last logged it]; see _ping_failed.
        self.ping_failures: dict[str, list] = {}
        self.peers: tuple[str, ...] = watched(spec.groups, me)  # whom we heartbeat, group first
        self._thread: threading.Thread | None = None

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

    def start(self) -> threading.Thread:
        """Start the heartbeat thread (runs until ``stop`` is set)."""
        self._thread = threading.Thread(target=self.run_heartbeats, name="snapshotd-heartbeat", daemon=True)
        self._thread.start()
        return self._thread

    def wait_first_round(self) -> None:
        """Once started: until every group peer was asked once (or that timed out). Just
        started (e.g. a replaced node), we would otherwise report nothing committed."""
        if self._thread is not None and not self.first_round.is_set():
            self.first_round.wait(len(self.group) * self.spec.heartbeat_timeout_ms / 1000)

    def committed_by_alive_peers(self, job_id: str) -> list[int]:
        """The committed version of ``job_id`` each alive peer last reported (0: none)."""
        alive_now = self.alive_peers()
        return [c.get(job_id, 0) for p, c in list(self.peer_committed.items()) if p in alive_now]

    def seen(self, node: str) -> None:
        """``node`` just answered or sent us something."""
        self.last_seen[node] = time.monotonic()

    def alive_peers(self) -> set[str]:
        return alive(self.last_seen, time.monotonic(), self.spec.heartbeat_timeout_ms)

    def gossip(self, sender: str, committed: dict) -> None:
        """``sender`` reported its committed versions (a ping, or its reply to ours)."""
        self.peer_committed[sender] = dict(committed)
        self._on_gossip(committed)

    def reply_checksum_failures(self) -> int:
        """Replies from peers whose payload failed its checksum, over all clients."""
        return sum(getattr(cl, "checksum_failures", 0) for cl in list(self._clients.values()))

    def _ping_failed(self, node: str, exc: BaseException) -> None:
        """Log a failed ping: the first of a run at once, then one line per
        PING_FAILURE_LOG_EVERY_S while the peer keeps failing (with the count)."""
        now = time.monotonic()
        st = self.ping_failures.setdefault(node, [0, None])
        st[0] += 1
        if st[1] is None or now - st[1] >= PING_FAILURE_LOG_EVERY_S:
            st[1] = now
            log.warning("heartbeat to %s failed (%d in a row): %s", node, st[0], exc)

    def _ping_answered(self, node: str) -> None:
        st = self.ping_failures.pop(node, None)
        if st is not None:
            log.info("heartbeat to %s answered again after %d failed", node, st[0])

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def run_heartbeats(self) -> None:
        """Ping every watched peer each interval; each ping runs in a pool thread, and a
        peer whose ping is still in flight is skipped this round. Pings used to run one
        after the other: a dead peer's ping waited out the timeout, so the round took
        longer than the timeout and every peer pinged after the dead one looked dead too
        (a degraded read then left a live group member out of its sources)."""
        interval = self.spec.heartbeat_interval_ms / 1000
        # The group first, and the first round at once: a fresh daemon must learn the commits.
        peers = list(self.peers)
        busy: set[str] = set()
        busy_lock = threading.Lock()

        def ping(node: str) -> None:
            try:
                rep, _ = self.peer(node, control=True).call(
                    peer_ops.ping(self._committed_versions()),
                    timeout_ms=self.spec.heartbeat_timeout_ms)
                self.seen(node)
                self._ping_answered(node)
                self.gossip(node, dict(rep.ping.committed_versions))
            except (PeerUnavailableError, RemoteError) as exc:
                self._ping_failed(node, exc)
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
                if not self.first_round.is_set():
                    for f in first:
                        f.result()
                    self.first_round.set()
                if self._stop.wait(interval):
                    return
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
