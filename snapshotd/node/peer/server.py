"""The peer server: one ROUTER socket answering peer requests.

Call order: ``PeerServer(...)`` binds (port 0 is fine: read ``port`` back), ``start()``
starts the threads, ``stop()`` (idempotent; also ``close`` and the context manager)
stops them and closes the socket. The handler runs one request at a time and must not
call out to peers.

Threads: the serving thread receives, checks and answers. With ``inline_ops`` given,
only those ops (e.g. ``{"ping"}``) are handled on the serving thread; every other
request goes, in arrival order, to one bulk thread whose replies the serving thread
sends. A slow bulk handler (building a parity buffer of hundreds of MiB, a page-fault
storm) then cannot delay a heartbeat's answer, so it cannot make a live daemon look
dead (issue 18). Without ``inline_ops`` every request is handled on the serving thread.

Fault hook, for tests only: the environment variable :data:`STALL_ENV` set to
``NODE:OP:SECONDS[:COUNT[:MODE]]`` makes the serving thread of node NODE stall SECONDS
before it takes a request of op OP, COUNT times (default 1). MODE ``sleep`` (the
default) stalls that thread alone; ``gil`` sleeps holding the GIL, so the whole daemon
stops (its heartbeats too) as it does behind a long allocation or a page-fault storm
under the GIL. Set to ``@DIR`` instead, nothing is armed at start: the hook is armed at
run time by a file ``DIR/stall-peer-server.<NODE>`` holding that same spec, which the
node reads and deletes at its next request (the chaos harness's ``stall_server`` fault).
Unset (the default), nothing changes.

The handler: ``handler(sender_id, request, payload) -> (reply, reply_payload_or_None[,
payload_xxh3])``, ``request`` a ``peer_pb2.PeerRequest`` that passed :mod:`.checks`,
``reply`` the ``PeerReply`` its op answers (:data:`.checks.REPLY_OF`), ``payload_xxh3``
the reply payload's stored checksum when there is one (sent instead of hashing it).

``payload`` is a memoryview of the received frame (zero copy) or None. Handler exceptions
become error replies carrying the error's code (:func:`remote_error_code`); messages
that are malformed, unauthenticated, from an unknown sender or fail :mod:`.checks` are
refused, counted in :attr:`PeerServer.refused`, and the loop keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import os
import queue
import threading
from collections import Counter
from typing import Callable, Collection

import zmq

from snapshotd.node.peer.checks import check_reply, check_request
from snapshotd.node.peer.framing import (
    DEFAULT_MAX_PAYLOAD,
    MAC_BYTES,
    MAGIC,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_HEADER_BYTES,
    MAX_NODE_ID_BYTES,
    MAXMSGSIZE_SLACK,
    RID_BYTES,
    as_byte_view,
    check_key,
    check_payload,
    checksum_mismatch,
    decode_header,
    known_xxh3,
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
    InvalidRequestError,
    NotHeldError,
    PeerAuthError,
    PeerProtocolError,
    SnapshotdError,
    error_for,
)

log = logging.getLogger("snapshotd.peer")

_POLL_MS = 50  # server loop wake-up interval (bounds stop() latency)

Handler = Callable[[str, ppb.PeerRequest, "memoryview | None"], tuple]

# Test-only fault hook (see the module docstring). Never set it in production.
STALL_ENV = "SNAPSHOTD_TEST_STALL_PEER_SERVER"


def _stall_from_env(node_id: str, spec: str | None = None) -> dict | None:
    """{"op", "seconds", "left"} when :data:`STALL_ENV` (or ``spec``) names this node, else None."""
    spec = os.environ.get(STALL_ENV, "") if spec is None else spec
    if not spec or spec.startswith("@"):
        return None
    parts = spec.split(":")
    if len(parts) not in (3, 4, 5) or (len(parts) == 5 and parts[4] not in ("sleep", "gil")):
        raise ValueError(f"{STALL_ENV}={spec!r}: expected NODE:OP:SECONDS[:COUNT[:sleep|gil]]")
    if parts[0] != node_id:
        return None
    stall = {"op": parts[1], "seconds": float(parts[2]), "left": int(parts[3]) if len(parts) >= 4 else 1,
             "gil": len(parts) == 5 and parts[4] == "gil"}
    log.warning("peer server %s: TEST FAULT armed (%s=%s): the serving thread will stall %.1f s "
                "on %d %r request(s)", node_id, STALL_ENV, spec, stall["seconds"], stall["left"], stall["op"])
    return stall


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


class PeerServer:
    """ROUTER socket answering peer requests from one daemon thread.

    ``refused`` counts refused messages by reason: ``"malformed"`` (framing, magic,
    header size/schema, a request that fails :mod:`.checks`, payload over ``max_payload_bytes`` or length
    mismatch), ``"checksum"`` (payload xxh3 mismatch), ``"auth"`` (missing/wrong MAC),
    ``"unknown_peer"`` (sender not in ``allowed_peers``), ``"internal"`` (unexpected
    failure while processing; logged). ``served`` counts requests that reached the
    handler (``handler_errors`` of them raised).
    """

    def __init__(self, bind: str, node_id: str, key: bytes | None,
                 allowed_peers: Collection[str] | None, handler: Handler,
                 max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, curve=None,
                 inline_ops: Collection[str] | None = None):
        if not callable(handler):
            raise ValueError("handler must be callable")
        self.node_id = node_id
        self._node_raw = node_id_bytes(node_id, "node_id")
        self._key = check_key(key)
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
        self._stall = _stall_from_env(node_id)
        trigger = os.environ.get(STALL_ENV, "")  # "@DIR": armed at run time by a file (tests only)
        self._trigger = os.path.join(trigger[1:], f"stall-peer-server.{node_id}") if trigger.startswith("@") else None
        self.stalls = 0  # times the test fault hook stalled the serving thread
        # Requests handled off the serving thread (None: all handled on it), and the
        # inproc socket the bulk thread's replies come back through.
        self._inline = None if inline_ops is None else frozenset(inline_ops)
        self._bulk: queue.Queue | None = None
        self._bulk_thread: threading.Thread | None = None
        self._replies = self._replies_addr = None
        if self._inline is not None:
            self._bulk = queue.Queue()
            self._replies_addr = f"inproc://peer-server-replies-{id(self):x}-{os.urandom(4).hex()}"
            self._replies = zmq.Context.instance().socket(zmq.PULL)
            self._replies.setsockopt(zmq.LINGER, 0)
            self._replies.bind(self._replies_addr)
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_payload_bytes + MAXMSGSIZE_SLACK)
            if peer_tos():  # --peer-dscp (pacing.py)
                sock.setsockopt(zmq.TOS, peer_tos())
            if curve is not None:  # snapshotd.node.peer.curve.CurvePeers: encrypt, admit spec nodes only
                curve.setup_server(sock)
            sock.bind(bind)
            self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        except BaseException:
            sock.close(linger=0)
            if self._replies is not None:
                self._replies.close(linger=0)
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
        if self._bulk is not None:
            self._bulk_thread = threading.Thread(target=self._run_bulk, name=f"peer-bulk-{self.node_id}",
                                                 daemon=True)
            self._bulk_thread.start()
        self._thread = threading.Thread(target=self._run, name=f"peer-server-{self.node_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket (LINGER 0) and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._bulk is not None:
            self._bulk.put(None)
            if self._bulk_thread is not None and self._bulk_thread is not threading.current_thread():
                self._bulk_thread.join(timeout)
        if self._thread is None:
            self._sock.close(linger=0)
            if self._replies is not None:
                self._replies.close(linger=0)
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
        sock, replies = self._sock, self._replies
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if replies is not None:
            poller.register(replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if replies is not None and replies in ready:
                    try:
                        self._forward_replies()
                    except Exception:  # nor one reply: a dead loop leaves a half-alive daemon
                        self.refused["internal"] += 1
                        log.exception("peer server %s: failed to forward a bulk reply", self.node_id)
                if sock not in ready:
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
            if replies is not None:
                replies.close(linger=0)

    def _forward_replies(self) -> None:
        """Send the replies the bulk thread made (already framed and signed)."""
        while True:
            try:
                out = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._sock.send_multipart(out, zmq.NOBLOCK, copy=False)
                TRAFFIC.count("reply", frames_nbytes(out[1:]))  # [0]: the routing identity
            except zmq.ZMQError as e:  # ROUTER drops on HWM/unknown peer; anything else: log
                log.warning("peer server %s: reply not sent: %s", self.node_id, e)

    def _run_bulk(self) -> None:
        """The bulk thread: handle queued requests in arrival order; the replies go back
        to the serving thread through an inproc socket (a ZeroMQ socket has one user)."""
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self._replies_addr)

        def send(out: list) -> None:
            try:
                push.send_multipart(out, copy=False)
            except zmq.ZMQError as e:
                log.warning("peer server %s: reply not queued: %s", self.node_id, e)

        try:
            while True:
                item = self._bulk.get()
                if item is None or self._stop.is_set():
                    return
                try:
                    self._serve(*item, send=send)
                except Exception:
                    self.refused["internal"] += 1
                    log.exception("peer server %s: failed to serve a request", self.node_id)
                finally:
                    del item
        finally:
            push.close(linger=0)

    def _maybe_stall(self, op: str) -> None:
        st = self._stall
        if self._trigger is not None and (st is None or st["left"] <= 0) and os.path.exists(self._trigger):
            try:
                with open(self._trigger) as f:
                    spec = f.read().strip()
                os.unlink(self._trigger)
                st = self._stall = _stall_from_env(self.node_id, spec)
            except (OSError, ValueError) as exc:
                log.error("peer server %s: TEST FAULT trigger %s not armed: %s", self.node_id, self._trigger, exc)
        if st is not None and st["left"] > 0 and op == st["op"]:
            st["left"] -= 1
            self.stalls += 1
            log.warning("peer server %s: TEST FAULT: serving thread stalls %.1f s on a %r request%s",
                        self.node_id, st["seconds"], op, " holding the GIL" if st["gil"] else "")
            if st["gil"]:  # a PyDLL call keeps the GIL: every thread of the daemon waits
                import ctypes

                ctypes.PyDLL(None).usleep(ctypes.c_uint(int(st["seconds"] * 1e6)))
            else:
                self._stop.wait(st["seconds"])

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
                and hmac.compare_digest(mac, frame_mac(self._key, sender_raw, rid, header_raw))):
            self._refuse("auth", f"bad or missing mac from {sender!r}")
            return self._reply_error(ident, rid, PeerAuthError("unauthenticated"))
        if self._allowed is not None and sender not in self._allowed:
            self._refuse("unknown_peer", sender)
            return self._reply_error(ident, rid, PeerAuthError(f"unknown peer {sender!r}"))
        payload = frames[6].buffer if len(frames) == 7 else None
        try:
            header = decode_header(header_raw)
            if header.WhichOneof("body") != "request":
                raise PeerProtocolError("header carries no request")
            request = header.request
            op = check_request(request)
            if payload is not None:
                payload = check_payload(header, payload, self.max_payload_bytes)  # zero tail restored
        except PeerProtocolError as e:
            self._refuse("malformed", str(e))
            return self._reply_error(ident, rid, e)
        if payload is not None and not payload_checksum_ok(header, payload):
            self._refuse("checksum", f"payload xxh3 mismatch from {sender!r}")
            return self._reply_error(ident, rid, checksum_mismatch(header, "payload"))

        if self._stall is not None or self._trigger is not None:
            self._maybe_stall(op)
        if self._bulk is not None and op not in self._inline:
            self._bulk.put((ident, rid, op, sender, request, payload))
            return
        self._serve(ident, rid, op, sender, request, payload, send=self._send_frames)

    def _serve(self, ident: bytes, rid: bytes, op: str, sender: str, request, payload, send) -> None:
        """Run the handler and send its reply (or an error reply) with ``send``."""
        self.served += 1
        try:
            result = self._handler(sender, request, payload)
            del payload
            reply, reply_payload, known = (*result, None) if len(result) == 2 else result
            check_reply(op, reply)
            known = known_xxh3(known)
            reply_view = None if reply_payload is None else as_byte_view(reply_payload)
            reply_raw = encode_body("reply", reply, reply_view is not None)
            if reply_view is not None:  # the frame leaves a zero tail off (framing.payload_frame)
                extra, reply_view = payload_frame(reply_view, known)
                reply_raw += extra
        except Exception as e:
            self.handler_errors += 1
            log.debug("peer server %s: handler raised for %r", self.node_id, sender, exc_info=True)
            return self._reply_error(ident, rid, e, send)
        if reply_view is not None:  # bulk payloads wait for --peer-rate (pacing.py)
            PACER.pace(op, reply_view.nbytes, reply=True)
        send(self._frames(ident, rid, reply_raw, reply_view))

    def _frames(self, ident: bytes, rid: bytes, header_raw: bytes, payload: memoryview | None) -> list:
        mac = frame_mac(self._key, self._node_raw, rid, header_raw) if self._key is not None else b""
        out = [ident, MAGIC, self._node_raw, rid, header_raw, mac]
        if payload is not None:
            out.append(payload)
        return out

    def _send_frames(self, out: list) -> None:
        try:
            self._sock.send_multipart(out, zmq.NOBLOCK, copy=False)
            TRAFFIC.count("reply", frames_nbytes(out[1:]))  # [0]: the routing identity
        except zmq.ZMQError as e:  # ROUTER drops on HWM/unknown peer; anything else: log
            log.warning("peer server %s: reply not sent: %s", self.node_id, e)

    def _reply_error(self, ident: bytes, rid: bytes, exc: BaseException, send=None) -> None:
        message = (str(exc) or type(exc).__name__)[:MAX_ERROR_MESSAGE_CHARS]
        body = ppb.PeerError(code=remote_error_code(exc),
                             message=message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_CHARS]
                             .decode("utf-8", "ignore"))
        (send or self._send_frames)(self._frames(ident, rid, encode_body("error", body, False), None))
