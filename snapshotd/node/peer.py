"""Peer plane: request/response transport between the snapshotd daemons of a group.

Daemons exchange erasure-coded blocks of several MiB (parity contributions, rebuild
reads) plus small control messages and heartbeats. The transport is ZeroMQ over TCP:
every daemon runs one :class:`PeerServer` (a ROUTER socket served by one thread) and
holds one :class:`PeerClient` (a DEALER socket) per peer it talks to.

Wire format (version "SD1")
---------------------------
A request (DEALER -> ROUTER) and a reply (ROUTER -> DEALER) are both one ZeroMQ
multipart message of 5 or 6 frames (the ROUTER additionally sees/sends the routing
identity in front, which is not part of the protocol)::

    [0] magic       b"SD1"
    [1] sender      sender's node id, UTF-8, 1..255 bytes (a reply carries the server's id)
    [2] request_id  8 bytes, chosen by the client; the reply echoes it
    [3] header      JSON object, UTF-8, compact, starts with b"{", at most 64 KiB
    [4] mac         32 bytes HMAC-SHA256, or empty when no key is configured
    [5] payload     optional, raw bytes (may be empty: b"" is distinct from "no payload")

* A message that has a payload frame carries ``"len"`` (payload size in bytes) and
  ``"xxh3"`` (``xxhash.xxh3_64_intdigest(payload)``) in its header; the receiver checks
  both (the server replies with a ``PeerProtocolError`` error; the client raises
  :class:`PeerProtocolError`). Both keys are set by this module; callers need not.
* When a key is configured, ``mac = HMAC-SHA256(key, b"SD1" + sender + request_id +
  header)``. The payload is covered only through ``len`` + ``xxh3`` in the header.
  The server signs its replies the same way (sender = its node id) and the client
  checks that the replying sender equals the expected ``peer_id``.
* An error reply is a header ``{"error": message, "error_code": code}`` without
  payload, the code from :mod:`snapshotd.wire.errors` (``remote_error_code``); the
  client raises :class:`RemoteError`, whose ``error_class`` is the remote class.

Security notes: the MAC authenticates the sender and the header. It does NOT make the
payload tamper-proof against an active attacker: xxh3 is a fast non-cryptographic
hash (chosen because HMAC/SHA-256 over the payload runs at ~1.8 GB/s, slower than the
wire), so it detects corruption, not forgery. There is no encryption and no replay
protection. Run the peer plane on a trusted network, or pass ``curve`` (a
:class:`snapshotd.node.peer_curve.CurvePeers`; spec ``peer_encryption: curve``): every frame
is then encrypted and authenticated by ZeroMQ CURVE and only the spec's nodes connect.

Server behaviour: the handler runs in the server thread and is called as
``handler(sender_id, header, payload_memoryview_or_None) -> (reply_header,
reply_payload_or_None)``. Handler exceptions become error replies; malformed, unauthenticated or
unknown-sender messages are refused, counted in :attr:`PeerServer.refused`, and the
loop keeps serving. ``ZMQ_MAXMSGSIZE`` is set to ``max_payload_bytes + 128 KiB`` so a
forged length cannot make ZeroMQ allocate arbitrary memory (a bigger frame drops the
connection; the client then times out).

Zero copy: frames are received with ``copy=False``; handlers and callers get
memoryviews of the ZeroMQ frame buffers (they keep the frame alive as long as they are
referenced). Payloads are sent with ``copy=False``: the buffer (e.g. a memoryview of an
mmap) is handed to ZeroMQ and must not be modified until the send completes (it is
referenced until then; mutating it earlier is caught by the receiver's xxh3 check).
Bulk readers should pass ``on_reply`` to :meth:`PeerClient.call_many` so received
blocks are released as they are consumed; daemons moving multi-MiB blocks should call
:func:`tune_malloc_for_bulk_transfers` once at start-up (see its docstring).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from typing import Callable, Collection, Iterable, Sequence

import xxhash
import zmq

from snapshotd.wire.errors import (  # noqa: F401 (re-exported: the peer plane's errors)
    InvalidRequestError,
    NotHeldError,
    PeerAuthError,
    PeerProtocolError,
    PeerUnavailableError,
    RemoteError,
    SnapshotdError,
    error_for,
)

__all__ = [
    "MAGIC",
    "MAX_HEADER_BYTES",
    "PeerServer",
    "PeerClient",
    "PeerUnavailableError",
    "PeerAuthError",
    "PeerProtocolError",
    "RemoteError",
    "tune_malloc_for_bulk_transfers",
]

log = logging.getLogger(__name__)

MAGIC = b"SD1"
RID_BYTES = 8
MAC_BYTES = 32
MAX_HEADER_BYTES = 64 * 1024
MAX_NODE_ID_BYTES = 255
DEFAULT_MAX_PAYLOAD = 1 << 30
MAXMSGSIZE_SLACK = 128 * 1024
_POLL_MS = 50  # server loop wake-up interval (bounds stop() latency)
_RESERVED = ("len", "xxh3")


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- malloc


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_malloc_for_bulk_transfers(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20,
                                   top_pad: int = 64 << 20) -> bool:
    """Process-wide glibc malloc tuning for receiving multi-MiB frames; opt-in.

    ZeroMQ mallocs every received message. With glibc defaults a freed multi-MiB buffer
    is partly returned to the kernel, so the next one page-faults again (measured: ~100-270
    of 1024 pages per 4 MiB frame, and 1025 if only the trim threshold is set, because
    setting any of these options turns off glibc's dynamic mmap threshold). Serving
    frames below ``mmap_threshold`` from the heap and keeping up to ``trim_threshold``
    of freed heap removes the faults. Costs: freed memory up to ``trim_threshold`` (per
    arena) stays with the process. Call once at daemon start-up, before traffic. Returns
    False (and changes nothing) where glibc's ``mallopt`` is not available.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
                         (_M_TOP_PAD, top_pad)):
        ok = mallopt(param, int(value)) == 1 and ok
    return ok


# --------------------------------------------------------------------------- helpers


def _mac(key: bytes, sender: bytes, rid: bytes, header: bytes) -> bytes:
    h = hmac.new(key, MAGIC, hashlib.sha256)
    h.update(sender)
    h.update(rid)
    h.update(header)
    return h.digest()


def _as_byte_view(obj) -> memoryview:
    """A flat, C-contiguous, unsigned-byte memoryview of any buffer-protocol object."""
    try:
        mv = obj if isinstance(obj, memoryview) else memoryview(obj)
    except TypeError as e:
        raise PeerProtocolError(f"payload must support the buffer protocol, not {type(obj).__name__}") from e
    if not mv.c_contiguous:
        raise PeerProtocolError("payload must be C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


_PAYLOAD_FIELDS_MAX = len(',"len":,"xxh3":') + 2 * 20  # two 64-bit decimals


def _encode_header_base(header: dict, with_payload: bool) -> bytes:
    """JSON of ``header`` without the reserved payload keys; size-checked leaving room
    for them when ``with_payload``, so a header that passes here is always sendable."""
    if not isinstance(header, dict):
        raise PeerProtocolError(f"header must be a dict, not {type(header).__name__}")
    if any(k in header for k in _RESERVED):
        header = {k: v for k, v in header.items() if k not in _RESERVED}
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise PeerProtocolError(f"header is not JSON-serialisable: {e}") from e
    limit = MAX_HEADER_BYTES - (_PAYLOAD_FIELDS_MAX if with_payload else 0)
    if len(raw) > limit:
        raise PeerProtocolError(f"header is {len(raw)} bytes, over the {limit}-byte limit")
    return raw


# A sender that already knows its payload's xxh3 (a stored block checksum) passes it as
# header[KNOWN_XXH3]; it is sent as "xxh3" instead of hashing the payload again. The
# receiver still verifies, so bytes corrupted at rest are caught end to end.
KNOWN_XXH3 = "known_xxh3"


def _add_payload_fields(base: bytes, payload: memoryview, known: int | None = None) -> bytes:
    """Append "len" and "xxh3" of ``payload`` to an encoded JSON object (no re-encoding)."""
    digest = xxhash.xxh3_64_intdigest(payload) if known is None else int(known)
    tail = b'"len":%d,"xxh3":%d}' % (payload.nbytes, digest)
    return base[:-1] + (b"," if len(base) > 2 else b"") + tail


def _encode_header(header: dict, payload: memoryview | None) -> bytes:
    known = header.pop(KNOWN_XXH3, None) if isinstance(header, dict) else None
    base = _encode_header_base(header, payload is not None)
    return base if payload is None else _add_payload_fields(base, payload, known)


def _decode_header(raw: bytes) -> dict:
    if len(raw) > MAX_HEADER_BYTES:
        raise PeerProtocolError(f"header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
    if not raw.startswith(b"{"):  # also rules out re-framing tricks across frame borders
        raise PeerProtocolError("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: deep nesting
        raise PeerProtocolError(f"header is not valid JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise PeerProtocolError("header is not a JSON object")
    return header


def _check_payload(header: dict, payload: memoryview, max_payload: int) -> None:
    n = payload.nbytes
    if n > max_payload:
        raise PeerProtocolError(f"payload of {n} bytes is over the {max_payload}-byte limit")
    want_len, want_xxh = header.get("len"), header.get("xxh3")
    if type(want_len) is not int or type(want_xxh) is not int:
        raise PeerProtocolError("a message with a payload needs integer 'len' and 'xxh3' in its header")
    if want_len != n:
        raise PeerProtocolError(f"payload is {n} bytes, header says {want_len}")


def _payload_checksum_ok(header: dict, payload: memoryview) -> bool:
    return xxhash.xxh3_64_intdigest(payload) == header["xxh3"]


def _node_id_bytes(node_id: str, what: str) -> bytes:
    if not isinstance(node_id, str) or not node_id:
        raise ValueError(f"{what} must be a non-empty str")
    raw = node_id.encode("utf-8")
    if len(raw) > MAX_NODE_ID_BYTES:
        raise ValueError(f"{what} is longer than {MAX_NODE_ID_BYTES} bytes")
    return raw


def _check_key(key: bytes | None) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise ValueError("key must be non-empty bytes or None")
    return bytes(key)


# --------------------------------------------------------------------------- server

Handler = Callable[[str, dict, "memoryview | None"], "tuple[dict, object | None]"]


class PeerServer:
    """ROUTER socket answering peer requests from one daemon thread.

    ``refused`` counts refused messages by reason: ``"malformed"`` (framing, magic,
    header size/JSON, payload over ``max_payload_bytes`` or length mismatch),
    ``"checksum"`` (payload xxh3 mismatch), ``"auth"`` (missing/wrong MAC),
    ``"unknown_peer"`` (sender not in ``allowed_peers``), ``"internal"`` (unexpected
    failure while processing; logged). ``served`` counts requests that reached the
    handler (``handler_errors`` of them raised).
    """

    def __init__(self, bind: str, node_id: str, key: bytes | None,
                 allowed_peers: Collection[str] | None, handler: Handler,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, curve=None):
        self.node_id = node_id
        self._node_raw = _node_id_bytes(node_id, "node_id")
        self._key = _check_key(key)
        self._allowed = None if allowed_peers is None else frozenset(allowed_peers)
        self._handler = handler
        if max_payload_bytes < 0:
            raise ValueError("max_payload_bytes must be >= 0")
        self.max_payload_bytes = int(max_payload_bytes)
        self.refused: Counter[str] = Counter()
        self.served = 0
        self.handler_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_payload_bytes + MAXMSGSIZE_SLACK)
            if curve is not None:  # snapshotd.node.peer_curve.CurvePeers: encrypt, admit spec nodes only
                curve.setup_server(sock)
            sock.bind(bind)
            self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock = sock
        tail = self.endpoint.rsplit(":", 1)[-1]
        self.port: int | None = int(tail) if self.endpoint.startswith("tcp://") and tail.isdigit() else None

    # -- lifecycle

    def start(self) -> "PeerServer":
        if self._closed:
            raise RuntimeError("server is stopped")
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._run, name=f"peer-server-{self.node_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket (LINGER 0) and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is None:
            self._sock.close(linger=0)
        elif self._thread is not threading.current_thread():  # stop() from the handler: no join
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("peer server %s: thread did not stop within %.1fs (busy handler?)",
                            self.node_id, timeout)

    close = stop

    def __enter__(self) -> "PeerServer":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- loop

    def _run(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                while not self._stop.is_set():
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._process(frames)
                    except Exception:  # never let one message kill the loop
                        self.refused["internal"] += 1
                        log.exception("peer server %s: failed to process a message", self.node_id)
                    finally:
                        del frames
        except Exception:
            log.exception("peer server %s: loop failed", self.node_id)
        finally:
            sock.close(linger=0)

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        n = self.refused[reason]  # a flood must not flood the log: the first 10, then every 100th
        (log.warning if n <= 10 or n % 100 == 0 else log.debug)(
            "peer server %s: refused (%s): %s", self.node_id, reason, detail)

    def _process(self, frames: list) -> None:
        # frames[0] is the ROUTER routing identity; the protocol frames follow.
        if len(frames) not in (6, 7):
            return self._refuse("malformed", f"{len(frames) - 1} frames")
        ident = frames[0].bytes
        if len(frames[1]) != len(MAGIC) or frames[1].bytes != MAGIC:
            return self._refuse("malformed", "bad magic")
        if len(frames[3]) != RID_BYTES:
            return self._refuse("malformed", "bad request id")
        rid = frames[3].bytes
        # From here on the message is framed well enough to answer.
        try:
            if not 0 < len(frames[2]) <= MAX_NODE_ID_BYTES:
                raise PeerProtocolError("bad sender id length")
            sender_raw = frames[2].bytes
            sender = sender_raw.decode("utf-8")
            if len(frames[4]) > MAX_HEADER_BYTES:
                raise PeerProtocolError(f"header over {MAX_HEADER_BYTES} bytes")
        except (PeerProtocolError, UnicodeDecodeError) as e:
            self._refuse("malformed", str(e))
            return self._reply_error(ident, rid, PeerProtocolError(str(e)))
        header_raw = frames[4].bytes
        mac = frames[5].bytes if len(frames[5]) <= MAC_BYTES else b"!"
        if self._key is not None and not (
                len(mac) == MAC_BYTES
                and hmac.compare_digest(mac, _mac(self._key, sender_raw, rid, header_raw))):
            self._refuse("auth", f"bad or missing mac from {sender!r}")
            return self._reply_error(ident, rid, PeerAuthError("unauthenticated"))
        if self._allowed is not None and sender not in self._allowed:
            self._refuse("unknown_peer", sender)
            return self._reply_error(ident, rid, PeerAuthError(f"unknown peer {sender!r}"))
        payload = frames[6].buffer if len(frames) == 7 else None
        try:
            header = _decode_header(header_raw)
            if payload is not None:
                _check_payload(header, payload, self.max_payload_bytes)
        except PeerProtocolError as e:
            self._refuse("malformed", str(e))
            return self._reply_error(ident, rid, e)
        if payload is not None and not _payload_checksum_ok(header, payload):
            self._refuse("checksum", f"payload xxh3 mismatch from {sender!r}")
            return self._reply_error(ident, rid, PeerProtocolError("payload xxh3 mismatch"))

        self.served += 1
        try:
            result = self._handler(sender, header, payload)
            del payload
            reply_header, reply_payload = result
            reply_view = None if reply_payload is None else _as_byte_view(reply_payload)
            reply_raw = _encode_header(reply_header, reply_view)
        except Exception as e:
            self.handler_errors += 1
            log.debug("peer server %s: handler raised for %r", self.node_id, sender, exc_info=True)
            return self._reply_error(ident, rid, e)
        self._send(ident, rid, reply_raw, reply_view)

    def _send(self, ident: bytes, rid: bytes, header_raw: bytes, payload: memoryview | None) -> None:
        mac = _mac(self._key, self._node_raw, rid, header_raw) if self._key is not None else b""
        out = [ident, MAGIC, self._node_raw, rid, header_raw, mac]
        if payload is not None:
            out.append(payload)
        try:
            self._sock.send_multipart(out, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:  # ROUTER drops on HWM/unknown peer; anything else: log
            log.warning("peer server %s: reply not sent: %s", self.node_id, e)

    def _reply_error(self, ident: bytes, rid: bytes, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        body = {"error": message[:16384], "error_code": remote_error_code(exc)}
        self._send(ident, rid, _encode_header(body, None), None)



def remote_error_code(exc: BaseException) -> str:
    """The code an error reply carries (see :mod:`snapshotd.wire.errors`). A handler's
    KeyError ("not held here") and ValueError (a bad request) have codes of their own;
    anything else foreign is the base code (an internal error)."""
    if isinstance(exc, SnapshotdError):
        return error_for(exc)
    if isinstance(exc, KeyError):
        return NotHeldError.code
    if isinstance(exc, ValueError):
        return InvalidRequestError.code
    return SnapshotdError.code


# --------------------------------------------------------------------------- client

Reply = tuple[dict, "memoryview | None"]


class PeerClient:
    """DEALER connection to one peer's :class:`PeerServer`.

    Thread-safe: one lock per client, so concurrent calls serialise (a heartbeat queued
    behind a bulk ``call_many`` waits for it, and its ``timeout_ms`` starts only once it
    holds the lock: keep a separate client for latency-sensitive control traffic).
    ``timeout_ms``
    bounds the wait for each reply (and for queueing each request); on a timeout, the
    socket is closed with LINGER 0 and recreated on the next call, so a late reply to
    an old request can never be taken for a new one (request ids are checked as well;
    mismatched replies are dropped and counted in ``discarded``).
    """

    def __init__(self, address: str, node_id: str, peer_id: str, key: bytes | None,
                 timeout_ms: int = 5000, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, curve=None):
        self.address = address
        self._curve = curve
        self.node_id = node_id
        self.peer_id = peer_id
        self._node_raw = _node_id_bytes(node_id, "node_id")
        self._peer_raw = _node_id_bytes(peer_id, "peer_id")
        self._key = _check_key(key)
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

    # -- public API

    def call(self, header: dict, payload=None, timeout_ms: int | None = None) -> Reply:
        """Send one request and wait for its reply: ``(reply_header, reply_payload)``."""
        return self.call_many([(header, payload)], window=1, timeout_ms=timeout_ms)[0]

    def call_many(self, requests: Sequence[tuple[dict, object]] | Iterable[tuple[dict, object]],
                  window: int = 8, timeout_ms: int | None = None,
                  on_reply: Callable[[int, dict, "memoryview | None"], object] | None = None) -> list:
        """Pipeline requests, at most ``window`` in flight; replies in request order.

        Returns ``[(reply_header, reply_payload), ...]`` in request order. For bulk
        downloads pass ``on_reply(index, header, payload)``: it is called for each reply
        in request order as soon as it can be, the payload is not retained (so ZeroMQ
        reuses warm memory instead of holding every block), and the returned list holds
        the callback's return values instead. An exception from ``on_reply`` aborts the
        batch like a failed reply.

        ``timeout_ms`` bounds each wait for the next reply (a stall), not the batch.
        Raises on the first failed reply (:class:`RemoteError`, :class:`PeerAuthError`,
        :class:`PeerProtocolError`) or on a stall (:class:`PeerUnavailableError`); the
        connection is then reset, and requests that were already sent may or may not
        have been executed by the peer.
        """
        requests = list(requests)
        if window < 1:
            raise ValueError("window must be >= 1")
        timeout = self.timeout_ms if timeout_ms is None else int(timeout_ms)
        if timeout <= 0:
            raise ValueError("timeout_ms must be > 0")
        with self._lock:
            if self._closed:
                raise PeerUnavailableError(f"client for peer {self.peer_id} is closed")
            if not requests:
                return []
            return self._exchange(requests, window, timeout, on_reply)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._reset(count=False)

    def __enter__(self) -> "PeerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, self.max_payload_bytes + MAXMSGSIZE_SLACK)
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

    def _exchange(self, requests: list, window: int, timeout: int, on_reply=None) -> list:
        n = len(requests)
        # Validate and encode every header up front, so a bad request fails before
        # anything is sent; hash payloads just before sending (overlaps the transfer).
        encoded = []
        for header, payload in requests:
            view = None if payload is None else _as_byte_view(payload)
            known = header.get(KNOWN_XXH3) if isinstance(header, dict) else None
            if known is not None:
                header = {k: v for k, v in header.items() if k != KNOWN_XXH3}
            encoded.append((_encode_header_base(header, view is not None), view, known))
        sock = self._socket()
        results: list = [None] * n
        pending: dict[bytes, int] = {}
        early: dict[int, Reply] = {}  # replies that overtook an earlier one (on_reply only)
        sent = done = delivered = 0
        try:
            while done < n:
                while sent < n and len(pending) < window:
                    rid = self._next_rid()
                    header_raw, view, known = encoded[sent]
                    if view is not None:
                        header_raw = _add_payload_fields(header_raw, view, known)
                    mac = _mac(self._key, self._node_raw, rid, header_raw) if self._key is not None else b""
                    frames = [MAGIC, self._node_raw, rid, header_raw, mac]
                    if view is not None:
                        frames.append(view)
                    if not sock.poll(timeout, zmq.POLLOUT):
                        raise self._unavailable(timeout, "could not queue a request")
                    sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
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
                    reply = self._decode_reply(frames, rid)
                    del frames
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

    def _decode_reply(self, frames: list, rid: bytes) -> Reply:
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
            if not (mac and hmac.compare_digest(mac, _mac(self._key, sender_raw, rid, header_raw))):
                raise PeerAuthError(f"reply from peer {self.peer_id} failed authentication "
                                    "(missing or wrong MAC: keys differ?)")
        header = _decode_header(header_raw)
        payload = frames[5].buffer if len(frames) == 6 else None
        if "error" in header:
            raise RemoteError(str(header.get("error_code", SnapshotdError.code)), header["error"],
                              peer_id=self.peer_id)
        if payload is not None:
            _check_payload(header, payload, self.max_payload_bytes)
            if not _payload_checksum_ok(header, payload):
                self.checksum_failures += 1
                raise PeerProtocolError(f"reply payload from peer {self.peer_id}: xxh3 mismatch")
        return header, payload
