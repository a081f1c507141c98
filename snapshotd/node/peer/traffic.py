"""Bytes this process handed to its peer-plane sockets: one process-wide counter.

A daemon is one process, so :data:`TRAFFIC` is that node's peer-plane traffic: the
client counts every request it sends (all frames, payload included) and the server
every reply (fetch and rebuild reads carry their blocks in replies). These are the
bytes given to ZeroMQ, counted as they are sent (not derived from block sizes); TCP
and ZeroMQ framing add a few bytes per message on top.

Thread-safety: :meth:`Traffic.count` and :meth:`Traffic.snapshot` take one lock;
any thread may call them.
"""

from __future__ import annotations

import threading


def frames_nbytes(frames) -> int:
    """The bytes of a multipart message's frames (bytes, memoryviews, zmq Frames)."""
    total = 0
    for f in frames:
        total += f.nbytes if isinstance(f, memoryview) else len(f)
    return total


class Traffic:
    """Counters of what was sent: requests (client side) and replies (server side)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"request_bytes": 0, "requests": 0, "reply_bytes": 0, "replies": 0}

    def count(self, kind: str, nbytes: int) -> None:
        """One message of ``kind`` ("request" or "reply") of ``nbytes`` was sent."""
        with self._lock:
            self._counts[f"{kind}_bytes"] += nbytes
            self._counts["requests" if kind == "request" else "replies"] += 1

    def snapshot(self) -> dict:
        """{request_bytes, requests, reply_bytes, replies, bytes_sent} so far."""
        with self._lock:
            out = dict(self._counts)
        out["bytes_sent"] = out["request_bytes"] + out["reply_bytes"]
        return out


TRAFFIC = Traffic()
