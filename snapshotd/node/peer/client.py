"""The peer client: one DEALER connection to one peer's :class:`~.server.PeerServer`.

Calls: ``call(PeerRequest, payload=None, payload_xxh3=None)`` and
``call_many([(PeerRequest, payload[, payload_xxh3]), ...], window, on_reply=...)``;
replies are ``(PeerReply, payload)``. Requests are checked by :mod:`.checks` before
anything is sent, replies on arrival (a reply of the wrong form is a
:class:`PeerProtocolError`). ``payload_xxh3`` is the payload's stored checksum when the
caller has one (sent instead of hashing again; the receiver still verifies). A payload
may be a :class:`~.framing.Deferred`, made just before its request is sent.

Thread-safety: one lock per client, so concurrent calls serialise (a heartbeat queued
behind a bulk ``call_many`` waits for it: keep a separate client for latency-sensitive
control traffic). ``close()`` is idempotent; a closed client raises
PeerUnavailableError.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from typing import Callable, Iterable

import zmq

from snapshotd.node.peer.checks import check_reply, check_request
from snapshotd.node.peer.framing import (
    DEFAULT_MAX_PAYLOAD,
    MAC_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_NODE_ID_BYTES,
    MAXMSGSIZE_SLACK,
    RID_BYTES,
    Deferred,
    as_byte_view,
    check_key,
    check_payload,
    checksum_mismatch,
    known_xxh3,
    decode_header,
    encode_body,
    frame_mac,
    node_id_bytes,
    payload_checksum_ok,
    payload_frame,
)
from snapshotd.node.peer.pacing import PACER, peer_tos
from snapshotd.node.peer.traffic import TRAFFIC, frames_nbytes
from snapshotd.wire._proto import peer_pb2 as ppb
from snapshotd.wire.errors import (
    PeerAuthError,
    PeerProtocolError,
    PeerUnavailableError,
    RemoteError,
    SnapshotdError,
)

Reply = tuple[ppb.PeerReply, "memoryview | None"]


class PeerClient:
    """DEALER connection to one peer's :class:`PeerServer`.

    ``timeout_ms`` bounds the wait for each reply (and for queueing each request); on a
    timeout, the socket is closed with LINGER 0 and recreated on the next call, so a late
    reply to an old request can never be taken for a new one (request ids are checked as
    well; mismatched replies are dropped and counted in ``discarded``).
    """

    def __init__(self, address: str, node_id: str, peer_id: str, key: bytes | None,
                 timeout_ms: int = 5000, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, curve=None):
        self.address = address
        self._curve = curve
        self.node_id = node_id
        self.peer_id = peer_id
        self._node_raw = node_id_bytes(node_id, "node_id")
        self._peer_raw = node_id_bytes(peer_id, "peer_id")
        self._key = check_key(key)
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        self.timeout_ms = int(timeout_ms)
        self.max_payload_bytes = int(max_payload_bytes)
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._closed = False
        self._rid = int.from_bytes(os.urandom(8), "big") >> 1
        self.discarded = 0  # replies dropped because their request id was not pending
        self.resets = 0     # sockets closed and recreated after a failure
        self.checksum_failures = 0  # reply payloads that failed their xxh3

    # -- calls

    def call(self, request: ppb.PeerRequest, payload=None, payload_xxh3: int | None = None,
             timeout_ms: int | None = None) -> Reply:
        """Send one request and wait for its reply: ``(PeerReply, reply_payload)``."""
        return self.call_many([(request, payload, payload_xxh3)], window=1, timeout_ms=timeout_ms)[0]

    def call_many(self, requests: Iterable[tuple], window: int = 8, timeout_ms: int | None = None,
                  on_reply: Callable[[int, ppb.PeerReply, "memoryview | None"], object] | None = None
                  ) -> list:
        """Pipeline ``(PeerRequest, payload[, payload_xxh3])`` requests, at most ``window``
        in flight.

        Returns ``[(PeerReply, reply_payload), ...]`` in request order. For bulk
        downloads pass ``on_reply(index, reply, payload)``: it is called for each reply
        in request order as soon as it can be, the payload is not retained (so ZeroMQ
        reuses warm memory instead of holding every block), and the returned list holds
        the callback's return values instead. An exception from ``on_reply`` aborts the
        batch like a failed reply.

        ``timeout_ms`` bounds each wait for the next reply (a stall), not the batch.
        Raises on the first failed reply (:class:`RemoteError`, :class:`PeerAuthError`,
        :class:`PeerProtocolError`) or on a stall (:class:`PeerUnavailableError`); the
        connection is then reset, and requests that were already sent may or may not
        have been executed by the peer. A request that fails :mod:`.checks`
        (:class:`PeerProtocolError`) fails the batch before anything is sent.
        """
        encoded = []
        for item in requests:
            request, payload, known = (*item, None) if len(item) == 2 else item
            encoded.append(self._encode(request, payload, known_xxh3(known)))
        return self._call(encoded, window, timeout_ms, on_reply)

    # -- lifecycle

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._reset(count=False)

    def __enter__(self) -> "PeerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals

    @staticmethod
    def _encode(request: ppb.PeerRequest, payload, known: int | None) -> tuple:
        """(op, header body bytes, payload view, known xxh3): checked before anything is
        sent; the payload is hashed just before sending (overlapping the transfer)."""
        op = check_request(request)
        view = payload if payload is None or isinstance(payload, Deferred) else as_byte_view(payload)
        return op, encode_body("request", request, view is not None), view, known

    def _call(self, encoded: list, window: int, timeout_ms: int | None, on_reply) -> list:
        if window < 1:
            raise ValueError("window must be >= 1")
        timeout = self.timeout_ms if timeout_ms is None else int(timeout_ms)
        if timeout <= 0:
            raise ValueError("timeout_ms must be > 0")
        with self._lock:
            if self._closed:
                raise PeerUnavailableError(f"client for peer {self.peer_id} is closed")
            if not encoded:
                return []
            return self._exchange(encoded, window, timeout, on_reply)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_payload_bytes + MAXMSGSIZE_SLACK)
                if peer_tos():  # --peer-dscp (pacing.py)
                    sock.setsockopt(zmq.TOS, peer_tos())
                if self._curve is not None:
                    self._curve.setup_client(sock, self.peer_id)
                sock.connect(self.address)
            except BaseException:
                sock.close(linger=0)
                raise
            self._sock = sock
        return self._sock

    def _reset(self, count: bool = True) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            if count:
                self.resets += 1

    def _unavailable(self, timeout: int, what: str) -> PeerUnavailableError:
        return PeerUnavailableError(
            f"peer {self.peer_id} at {self.address}: {what} within {timeout} ms")

    def _exchange(self, encoded: list, window: int, timeout: int, on_reply) -> list:
        n = len(encoded)
        sock = self._socket()
        results: list = [None] * n
        ops = [e[0] for e in encoded]
        pending: dict[bytes, int] = {}
        early: dict[int, tuple] = {}  # replies that overtook an earlier one (on_reply only)
        sent = done = delivered = 0
        try:
            while done < n:
                while sent < n and len(pending) < window:
                    rid = self._next_rid()
                    _, header_raw, view, known = encoded[sent]
                    if isinstance(view, Deferred):  # made now: a window of them at most
                        view = as_byte_view(view.make())
                    if view is not None:  # the frame leaves a zero tail off (framing.payload_frame)
                        extra, view = payload_frame(view, known)
                        header_raw += extra
                    mac = frame_mac(self._key, self._node_raw, rid, header_raw) if self._key is not None else b""
                    frames = [MAGIC, self._node_raw, rid, header_raw, mac]
                    if view is not None:
                        frames.append(view)
                    if view is not None:  # bulk payloads wait for --peer-rate (pacing.py)
                        PACER.pace(ops[sent], view.nbytes)
                    if not sock.poll(timeout, zmq.POLLOUT):
                        raise self._unavailable(timeout, "could not queue a request")
                    sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                    TRAFFIC.count("request", frames_nbytes(frames))
                    encoded[sent] = None  # drop our reference; zmq holds the buffer
                    pending[rid] = sent
                    sent += 1
                deadline = time.monotonic() + timeout / 1000.0
                while True:
                    left = int((deadline - time.monotonic()) * 1000.0 + 0.999)
                    if left <= 0 or not sock.poll(left, zmq.POLLIN):
                        raise self._unavailable(timeout, "no reply")
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    rid = frames[2].bytes if len(frames) >= 3 and len(frames[2]) == RID_BYTES else None
                    idx = pending.pop(rid, None) if rid is not None else None
                    if idx is None:
                        self.discarded += 1
                        continue
                    body, payload = self._decode_reply(frames, rid)
                    del frames
                    check_reply(ops[idx], body)
                    reply = (body, payload)
                    del payload
                    done += 1
                    if on_reply is None:
                        results[idx] = reply
                    else:
                        early[idx] = reply
                        del reply
                        while delivered in early:
                            results[delivered] = on_reply(delivered, *early.pop(delivered))
                            delivered += 1
                    break
        except BaseException as exc:
            # Replies still in flight (or an unknown socket state) must never reach a
            # later call: drop the socket. A failed single exchange leaves nothing behind.
            if pending or not isinstance(exc, (RemoteError, PeerAuthError, PeerProtocolError)):
                self._reset()
            raise
        return results

    def _next_rid(self) -> bytes:
        self._rid = (self._rid + 1) & 0xFFFFFFFFFFFFFFFF
        return self._rid.to_bytes(RID_BYTES, "big")

    def _decode_reply(self, frames: list, rid: bytes) -> tuple[ppb.PeerReply, "memoryview | None"]:
        if (len(frames) not in (5, 6) or len(frames[0]) != len(MAGIC) or frames[0].bytes != MAGIC
                or len(frames[1]) > MAX_NODE_ID_BYTES):
            raise PeerProtocolError(f"malformed reply from {self.address}")
        sender_raw = frames[1].bytes
        if sender_raw != self._peer_raw:
            raise PeerAuthError(f"reply from {sender_raw.decode('utf-8', 'replace')!r}, "
                                f"expected peer {self.peer_id!r} at {self.address}")
        if len(frames[3]) > MAX_HEADER_BYTES:
            raise PeerProtocolError(f"reply header over {MAX_HEADER_BYTES} bytes")
        header_raw = frames[3].bytes
        if self._key is not None:
            mac = frames[4].bytes if len(frames[4]) == MAC_BYTES else b""
            if not (mac and hmac.compare_digest(mac, frame_mac(self._key, sender_raw, rid, header_raw))):
                raise PeerAuthError(f"reply from peer {self.peer_id} failed authentication "
                                    "(missing or wrong MAC: keys differ?)")
        header = decode_header(header_raw)
        payload = frames[5].buffer if len(frames) == 6 else None
        body = header.WhichOneof("body")
        if body == "error":
            raise RemoteError(header.error.code or SnapshotdError.code, header.error.message,
                              peer_id=self.peer_id)
        if body != "reply":
            raise PeerProtocolError(f"reply from peer {self.peer_id} carries no reply body")
        if payload is not None:
            payload = check_payload(header, payload, self.max_payload_bytes)  # zero tail restored
            if not payload_checksum_ok(header, payload):
                self.checksum_failures += 1
                raise checksum_mismatch(header, f"reply payload from peer {self.peer_id}")
        return header.reply, payload
