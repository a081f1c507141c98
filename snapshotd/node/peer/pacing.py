"""Traffic control for the peer plane's bulk bytes: a rate limit and a DSCP mark.

A daemon sends ``m`` times its data per snapshot (parity contributions) and whole
blocks during rebuilds and degraded reads. On a link the training job shares, those
bytes compete with the job's all-reduce. ``--peer-rate`` caps them: every bulk message
waits for its bytes in a :class:`snapshotd.core.pacing.TokenBucket` before it is handed
to ZeroMQ. Only bulk ops are paced (:data:`PACED_REQUESTS` sent by a client,
:data:`PACED_REPLIES` sent back by a server), so heartbeats, pings, votes, announces
and every other control message never wait.

One :data:`PACER` per process (a daemon is one process, like the traffic counters of
:mod:`.traffic`); :func:`configure` sets it once at start (``snapshotd serve
--peer-rate 400MiB --peer-burst 4MiB``); by default it is off and costs one attribute
test per message. :meth:`Pacer.pace` is called by the peer client just before it sends
a request with a payload, and by the server's bulk thread just before it queues a reply
with one; the waiting happens in that thread (a bulk client's or the bulk thread's,
never the heartbeat client's or the serving thread's).

``--peer-dscp N`` marks every peer-plane TCP connection of the daemon (its clients'
and its server's) with DSCP ``N`` (``IP_TOS = N << 2``, through ZeroMQ's ``ZMQ_TOS``),
e.g. 8 (CS1) or 1 (LE, RFC 8622): a network whose switches (or the hosts' qdiscs)
serve such traffic after the default class lets the training job's collectives go
first, and the snapshot's bytes fill the gaps between them, at the full link rate when
the link is free. That is work-conserving where a rate limit is not, and needs no
guess of the job's spare bandwidth; it needs the network's QoS to honour the mark
(``bench/bench_shaped.py`` sets up such a link with HTB and a u32 filter). Heartbeats
share the mark (they are a few bytes per interval; the class must keep a small
guaranteed rate, as the bench's does). :func:`peer_tos` is read when a socket is made.

Thread-safety: :meth:`Pacer.pace` debits the bucket under a lock and sleeps outside
it, so concurrent senders share one budget and queue behind each other in order.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from snapshotd.core.pacing import TokenBucket
from snapshotd.wire import config as c

PACED_REQUESTS = frozenset({"contrib"})
PACED_REPLIES = frozenset({"fetch", "rank_block"})
DEFAULT_BURST_BYTES = 4 << 20
ENV_PEER_RATE = "SNAPSHOTD_PEER_RATE"
ENV_PEER_BURST = "SNAPSHOTD_PEER_BURST"
ENV_PEER_DSCP = "SNAPSHOTD_PEER_DSCP"
_peer_dscp = 0  # set once at start by configure(); 0: unmarked


class Pacer:
    """Holds bulk peer messages to ``rate_bytes_s`` (None or 0: no limit)."""

    def __init__(self, rate_bytes_s: float | None = None, burst_bytes: int = DEFAULT_BURST_BYTES,
                 clock=time.monotonic, sleep=time.sleep):
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._bucket: TokenBucket | None = None
        self.paced_bytes = 0     # bulk bytes that went through the bucket
        self.paced_messages = 0
        self.waited_s = 0.0      # total time senders slept for the limit
        self.set_rate(rate_bytes_s, burst_bytes)

    @property
    def rate_bytes_s(self) -> float | None:
        return None if self._bucket is None else self._bucket.rate_bytes_s

    def set_rate(self, rate_bytes_s: float | None, burst_bytes: int = DEFAULT_BURST_BYTES) -> None:
        """Change the limit (a fresh, full bucket); None or 0 turns pacing off."""
        if rate_bytes_s is not None and rate_bytes_s < 0:
            raise ValueError(f"peer rate must be >= 0 bytes/s, not {rate_bytes_s!r}")
        with self._lock:
            self._bucket = (TokenBucket(rate_bytes_s, burst_bytes, self._clock())
                            if rate_bytes_s else None)

    def pace(self, op: str, nbytes: int, reply: bool = False) -> float:
        """Wait until ``nbytes`` of op ``op`` may be sent; returns the seconds waited.

        ``reply``: the message is a server's reply (paced when ``op`` is in
        :data:`PACED_REPLIES`), else a client's request (:data:`PACED_REQUESTS`)."""
        if self._bucket is None or op not in (PACED_REPLIES if reply else PACED_REQUESTS):
            return 0.0
        with self._lock:
            bucket = self._bucket
            if bucket is None:
                return 0.0
            wait = bucket.delay_s(nbytes, self._clock())
            self.paced_bytes += nbytes
            self.paced_messages += 1
            self.waited_s += wait
        if wait > 0:
            self._sleep(wait)
        return wait

    def status(self) -> dict:
        with self._lock:
            return {"rate_bytes_s": self.rate_bytes_s,
                    "burst_bytes": None if self._bucket is None else self._bucket.burst_bytes,
                    "paced_bytes": self.paced_bytes, "paced_messages": self.paced_messages,
                    "waited_s": round(self.waited_s, 6)}


PACER = Pacer()


def _size(text: str) -> int:
    try:
        value = c.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def add_arguments(parser) -> None:
    """The daemon's flags (``snapshotd serve``): --peer-rate, --peer-burst, --peer-dscp."""

    parser.add_argument(
        "--peer-rate", type=_size, default=os.environ.get(ENV_PEER_RATE, "0"),
        help="cluster mode: cap on the bytes/s of bulk peer traffic (parity contributions, "
             "rebuild and degraded-read blocks; never heartbeats or votes), e.g. 400MiB, so "
             "snapshots leave room on a link the training job shares; 0 = no cap "
             f"[env {ENV_PEER_RATE}; default 0]")
    parser.add_argument(
        "--peer-burst", type=_size, default=os.environ.get(ENV_PEER_BURST, str(DEFAULT_BURST_BYTES)),
        help="with --peer-rate: bytes that may leave at once after a quiet spell "
             f"[env {ENV_PEER_BURST}; default 4MiB]")
    parser.add_argument(
        "--peer-dscp", type=_dscp, default=os.environ.get(ENV_PEER_DSCP, "0"),
        help="mark the peer plane's connections with this DSCP (e.g. 8 = CS1, 1 = LE) so a "
             "network that serves it after the default class lets the training job's "
             "collectives go first; 0 = unmarked [env "
             f"{ENV_PEER_DSCP}; default 0]")


def _dscp(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value <= 63:
        raise argparse.ArgumentTypeError(f"{text!r}: a DSCP is an integer 0..63 (e.g. 8 = CS1, 1 = LE)")
    return value


def peer_tos() -> int:
    """The IP TOS byte for peer-plane sockets (0: leave them unmarked)."""
    return _peer_dscp << 2


def configure(rate_bytes_s: int, burst_bytes: int, dscp: int = 0) -> None:
    """Set the process's :data:`PACER` and DSCP mark (once, at daemon start, before any
    peer socket is made); rate 0 = no limit, dscp 0 = unmarked."""
    global _peer_dscp
    if rate_bytes_s and not burst_bytes:
        raise ValueError("--peer-burst must be > 0 when --peer-rate is set")
    if not 0 <= dscp <= 63:
        raise ValueError(f"DSCP must be 0..63, not {dscp}")
    PACER.set_rate(rate_bytes_s or None, burst_bytes or DEFAULT_BURST_BYTES)
    _peer_dscp = int(dscp)
