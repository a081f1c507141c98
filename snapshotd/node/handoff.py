"""The daemon's same-host hand-off channel: AdoptShard over ZeroMQ instead of gRPC.

Every save ends with one AdoptShard; on a 2-core host gRPC's Python machinery was the
largest fixed cost of a save on both sides (issue 16). Trainers that reach the daemon
through its Unix socket are offered this channel instead (``RegisterJobResponse.
handoff_endpoint``): a ROUTER socket on an ``ipc://`` file beside the Unix socket
(:func:`snapshotd.wire.handoff.endpoint_path`), created 0600 and checked as the socket
is. Frames: :mod:`snapshotd.wire.handoff`. Every other RPC stays on gRPC.

What a request goes through is what the gRPC call goes through: the daemon token
(``TokenInterceptor.refusal``, counted and logged the same), the body's parse (a
malformed request is refused as ``RequestParseGuard`` refuses one), then the servicer's
own AdoptShard body (``SnapshotdServicer.adopt_shard``: job token, checks, metrics, the
refusal counter). A refusal travels as its error code, so the client raises the class
it would have raised over gRPC.

Threads: one thread owns the ROUTER and an inproc PULL socket. It reads and parses
each request; a small one (payload up to :data:`INLINE_MAX_PAYLOAD_BYTES`, the common
case: hashing it takes well under a millisecond) it serves itself, which saved ~0.12 ms
of daemon CPU per save against a thread hop (the demo GPT's 1.3 MB shard, 2-core VM).
A larger one goes to a small worker pool, so that hashing a large payload does not hold
up other ranks' small adoptions; a worker sends its reply frames through its own inproc
PUSH socket back to the owner thread, which writes them to the ROUTER. Nothing else
touches the sockets. ``start()`` then ``stop()``, once each; ``stop()`` removes the socket file.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import zmq

from snapshotd.wire import handoff as frames
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (
    AuthenticationError,
    DaemonError,
    MalformedRequestError,
    SnapshotdError,
    error_for,
)
from snapshotd.wire.limits import JOB_TOKEN_METADATA_KEY, MAX_MESSAGE_BYTES

log = logging.getLogger("snapshotd.handoff")

METHOD = "AdoptShard (hand-off)"
# Adoptions of payloads up to this are served on the socket's own thread (see above).
INLINE_MAX_PAYLOAD_BYTES = 4 << 20
_ids = itertools.count()


class HandoffServer:
    """Serves AdoptShard on ``ipc://<socket_path>.ho`` for ``servicer``.

    ``tokens``: the daemon's ``TokenInterceptor`` (None: no daemon token);
    ``on_malformed(method, detail)``: counts and logs a request that does not parse
    (the daemon's ``_count_malformed``).
    """

    def __init__(self, servicer, socket_path: str, tokens=None, on_malformed=None, workers: int = 4):
        self.servicer = servicer
        self.path = frames.endpoint_path(socket_path)
        self.endpoint = "ipc://" + self.path
        self.tokens = tokens
        self.on_malformed = on_malformed
        self._ctx = zmq.Context()
        self._back = f"inproc://snapshotd-handoff-{os.getpid()}-{next(_ids)}"
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="snapshotd-handoff")
        self._local = threading.local()
        self._pushes: list[zmq.Socket] = []
        self._pushes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- life ------------------------------------------------------------------------
    def start(self) -> str:
        """Bind (the file 0600) and serve; returns the endpoint."""
        if os.path.exists(self.path):  # a SIGKILLed daemon's
            os.unlink(self.path)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # A frame over this is dropped by ZeroMQ with the connection; one over
        # MAX_MESSAGE_BYTES but under it gets a clear refusal (frames.decode_request).
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + (1 << 20))
        old = os.umask(0o177)
        try:
            self._router.bind(self.endpoint)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self._back)
        self._thread = threading.Thread(target=self._serve, name="snapshotd-handoff-io", daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop serving (requests in flight get no reply: clients time out as for a dead
        daemon), close the sockets and remove the socket file."""
        if self._thread is not None:
            self._stopping = True
            self._push().send_multipart([b""])  # wakes the owner thread
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._pushes_lock:
            for s in self._pushes:
                s.close(linger=0)
            self._pushes.clear()
        self._ctx.destroy(linger=0)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- the owner thread ------------------------------------------------------------
    def _serve(self) -> None:
        router, pull = self._router, self._pull
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stopping:
                ready = dict(poller.poll())
                if pull in ready:
                    while True:  # every reply queued, then the requests
                        try:
                            msg = pull.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        if len(msg) > 1:
                            router.send_multipart(msg)
                if router in ready:
                    # One request per wake: poll is level-triggered (the next poll returns
                    # at once while more are queued), and a drain loop's last, empty
                    # receive raises zmq.Again, ~10 us of CPU per save (issue 16).
                    try:
                        msg = router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        continue
                    got = self.parse(msg[1:])
                    if isinstance(got, list):  # refused
                        router.send_multipart([msg[0], *got])
                    elif got[1].manifest.payload_bytes <= INLINE_MAX_PAYLOAD_BYTES:
                        router.send_multipart([msg[0], *self.adopt(*got)])
                    else:
                        self._pool.submit(self._work, msg[0], got)
        except zmq.ContextTerminated:
            pass
        except Exception:  # a bug here must not pass silently: the channel is gone
            log.exception("hand-off channel stopped; clients fall back to timing out")
        finally:
            router.close(linger=0)
            pull.close(linger=0)

    # -- workers ---------------------------------------------------------------------
    def _push(self) -> zmq.Socket:
        s = getattr(self._local, "push", None)
        if s is None:
            s = self._ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self._back)
            self._local.push = s
            with self._pushes_lock:
                self._pushes.append(s)
        return s

    def _work(self, ident: bytes, parsed: tuple) -> None:
        if self._stopping:
            return
        reply = self.adopt(*parsed)
        try:
            self._push().send_multipart([ident, *reply])
        except zmq.ZMQError:  # stopping
            pass

    def parse(self, parts: list[bytes]):
        """(request id, AdoptShardRequest, metadata, the manifest's bytes as sent or None)
        of a request that may go on, else the reply frames of its refusal (bad frames,
        daemon token, a body that does not parse)."""
        rid = 0
        try:
            rid = frames.read_header(parts[0])[1] if parts else 0
        except MalformedRequestError:
            pass
        try:
            rid, body, token, job_token = frames.decode_request(parts)
            if self.tokens is not None:
                why = self.tokens.refusal(token)
                if why is not None:
                    self.tokens.refuse(METHOD, why)
                    return frames.encode_error(rid, AuthenticationError.code, why)
            try:
                request = pb.AdoptShardRequest.FromString(body)
            except Exception as exc:  # the caller's bytes: whatever the parser says
                raise MalformedRequestError(
                    f"malformed request for {METHOD}: cannot parse as snapshotd.v1.AdoptShardRequest "
                    f"({len(body)} bytes; {exc})") from None
        except MalformedRequestError as exc:
            if self.on_malformed is not None:
                self.on_malformed(METHOD, str(exc))
            return frames.encode_error(rid, exc.code, str(exc))
        return (rid, request, ((JOB_TOKEN_METADATA_KEY, job_token),) if job_token else (),
                frames.manifest_bytes(body))

    def adopt(self, rid: int, request, md, raw_manifest: bytes | None = None) -> list[bytes]:
        """The servicer's AdoptShard; its reply frames (never raises)."""
        try:
            resp = self.servicer.adopt_shard(request, md, raw_manifest)
            return frames.encode_ok(rid, resp.SerializeToString())
        except SnapshotdError as exc:  # refused: already logged and counted by the servicer
            return frames.encode_error(rid, error_for(exc), str(exc))
        except Exception as exc:  # a bug: as gRPC answers an exception in a handler
            log.exception("%s failed", METHOD)
            return frames.encode_error(rid, DaemonError.code, f"Exception calling application: {exc}")

