"""Client side of the daemon API: a gRPC channel plus a cache of mapped segments.

``DaemonClient`` turns gRPC errors back into :mod:`snapshotd.wire.errors` exceptions (the
same classes the daemon raised), so callers catch ``DaemonUnavailableError`` or
``MemoryBudgetExceededError`` rather than status codes. Every call has a deadline:
the client never hangs on a dead daemon.

AdoptShard, the one call of every save, goes over the daemon's same-host hand-off
channel (:class:`HandoffChannel`, ZeroMQ over an ``ipc://`` file beside the Unix
socket; frames in :mod:`snapshotd.wire.handoff`) when the daemon advertises one at
registration and this client reached it through its Unix socket; otherwise, or with
``$SNAPSHOTD_HANDOFF=grpc``, over gRPC. Both raise the same classes.
"""

from __future__ import annotations

import os
import threading
import time

import grpc
import zmq
from zmq.utils.monitor import recv_monitor_message

from snapshotd.wire import errors
from snapshotd.wire import handoff as hw

from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire._proto import snapshotd_pb2_grpc as pb_grpc
from snapshotd.wire.config import ENV_JOB_TOKEN
from snapshotd.wire.limits import (
    ERROR_METADATA_KEY,
    JOB_TOKEN_METADATA_KEY,
    MAX_MESSAGE_BYTES,
    STREAM_CHUNK_BYTES,
    TOKEN_METADATA_KEY,
)

DaemonError = errors.DaemonError  # kept importable from here


# plain ints: pyzmq's enum flags cost an enum construction per use on the per-save path
_EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)


def _translate(exc: grpc.RpcError, what: str) -> errors.SnapshotdError:
    """The daemon's error as the class it raised: by the code beside the status, else
    by the status alone (one made by grpc itself: UNAVAILABLE, DEADLINE_EXCEEDED)."""
    status = exc.code() if hasattr(exc, "code") else None
    code = None
    try:
        for k, v in (exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ():
            if k == ERROR_METADATA_KEY:
                code = v.decode() if isinstance(v, bytes) else v
    except Exception:  # no metadata on this error object
        code = None
    err = errors.from_code(code, f"{what}: {exc.details() if hasattr(exc, 'details') else exc}",
                           status.name if status is not None else None)
    err.grpc_code = status
    return err


class HandoffChannel:
    """AdoptShard over the daemon's hand-off endpoint: a DEALER on ``ipc://<path>``.

    Thread-safe (one call at a time, under a lock). A call waits at most its timeout, then
    raises :class:`DaemonUnavailableError`, as a gRPC call past its deadline does; so it
    does, at once, when the connection drops with the request in flight (a daemon killed
    mid-call) or when the socket file is gone. A DEALER, not a REQ: a lost reply never
    wedges it; replies carry the request's id and a late one (of a call that timed out)
    is dropped. ZeroMQ reconnects by itself to a restarted daemon's new socket.
    """

    CONNECT_GRACE_S = 5.0  # no connection this long: the daemon is taken as unreachable

    def __init__(self, path: str, token: str | None, job_token: str | None):
        self.path = path
        self.endpoint = "ipc://" + path
        self._token, self._job_token = token, job_token
        self._lock = threading.Lock()
        # The process's shared context, never terminated by us: a context of our own
        # collected with a DaemonClient nobody closed would block in term() (the
        # collector clears its weak list of sockets before closing them).
        self._ctx = zmq.Context.instance()
        self._sock = self._mon = self._poller = None
        self._rid = 0
        self._closed = False
        self.sent = 0  # requests sent
        self.calls = 0  # answered calls (a reply, or a refusal) over this channel

    def _open(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection
        self._sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        self._mon = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        self._sock.connect(self.endpoint)
        self._poller = zmq.Poller()  # a call's wait for its reply (or the connection's end)
        self._poller.register(self._sock, _POLLIN)
        self._poller.register(self._mon, _POLLIN)

    def _drop(self) -> None:
        """Close the socket (what it had queued goes with it); the next call opens anew."""
        if self._sock is not None:
            self._sock.disable_monitor()
            self._mon.close(linger=0)
            self._sock.close(linger=0)
        self._sock = self._mon = self._poller = None

    def _unavailable(self, why: str, drop: bool = True) -> errors.DaemonUnavailableError:
        if drop:
            self._drop()
        err = errors.DaemonUnavailableError(f"AdoptShard: {why} ({self.endpoint})")
        err.grpc_code = grpc.StatusCode.UNAVAILABLE
        return err

    def _send(self, msg, t0: float, deadline: float, fresh: bool):
        """Send on a live connection; returns (socket, monitor). Without one, fail at once,
        as gRPC fails fast on a daemon that refuses connections: when the socket file is
        gone, or a connection attempt was refused (a SIGKILLed daemon's file, nobody
        listening: a save must not wait for its restart); else wait a short while."""
        sock, mon = self._sock, self._mon
        if sock.getsockopt(_EVENTS) & _POLLOUT:  # poll(0) without a Poller made per call
            while mon.getsockopt(_EVENTS) & _POLLIN:
                recv_monitor_message(mon)  # of earlier connections
            try:
                sock.send_multipart(msg, _NOBLOCK, copy=False)
                self.sent += 1
                return sock, mon
            except zmq.Again:  # the connection went in between
                pass
        if not fresh:
            # Not connected. What the socket saw before this call is stale (a daemon
            # restarted since may not have been retried yet, ZeroMQ backs off): anew.
            self._drop()
            self._open()
            sock, mon = self._sock, self._mon
        while True:
            if not os.path.exists(self.path):
                raise self._unavailable("the hand-off socket is gone")
            while mon.poll(0):
                if recv_monitor_message(mon)["event"] == zmq.EVENT_CONNECT_RETRIED:
                    raise self._unavailable("the daemon is not listening (connection refused)")
            now = time.monotonic()
            if now > deadline or now - t0 > self.CONNECT_GRACE_S:
                raise self._unavailable(f"cannot connect in {now - t0:.1f} s")
            if sock.poll(20, zmq.POLLOUT):
                try:
                    sock.send_multipart(msg, zmq.NOBLOCK, copy=False)
                    self.sent += 1
                    return sock, mon
                except zmq.Again:
                    pass

    def call(self, request: pb.AdoptShardRequest | bytes, timeout_s: float) -> pb.AdoptShardResponse:
        """``request``: the message, or its serialization."""
        body = request if isinstance(request, bytes) else request.SerializeToString()
        if len(body) > MAX_MESSAGE_BYTES:  # as grpc refuses to send it
            raise errors.InvalidRequestError(f"AdoptShard: request of {len(body)} bytes, at most "
                                             f"{MAX_MESSAGE_BYTES}")
        with self._lock:
            if self._closed:
                raise self._unavailable("the channel was closed (a new registration replaced it)")
            fresh = self._sock is None
            if fresh:
                self._open()
            self._rid += 1
            rid = self._rid
            t0 = time.monotonic()
            deadline = t0 + timeout_s
            msg = hw.encode_request(rid, body, self._token, self._job_token)
            sock, mon = self._send(msg, t0, deadline, fresh)
            poller = self._poller
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    # The socket stays: a late reply is told apart by its id.
                    raise self._unavailable(f"no reply in {timeout_s:g} s", drop=False)
                ready = dict(poller.poll(left_ms))
                if sock in ready:
                    try:
                        got, resp, code, msg = hw.decode_reply(sock.recv_multipart())
                    except errors.MalformedRequestError as exc:
                        raise self._unavailable(f"unreadable reply: {exc}") from None
                    if got != rid:
                        continue  # the late reply of a call that timed out
                    self.calls += 1
                    if resp is not None:
                        return pb.AdoptShardResponse.FromString(resp)
                    cls = errors.ERROR_CLASSES.get(code or "")
                    err = errors.from_code(code, f"AdoptShard: {msg}",
                                           cls.grpc_code_name if cls is not None else None)
                    err.grpc_code = getattr(grpc.StatusCode, err.grpc_code_name, None)
                    raise err
                if mon in ready:
                    if recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                        raise self._unavailable("the daemon dropped the connection during the call")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


class DaemonClient:
    def __init__(self, target: str, token: str | None = None, timeout_s: float = 30.0,
                 job_token: str | None = None):
        """``target``: "unix:/path/to.sock" or "host:port". ``job_token`` (default
        ``$SNAPSHOTD_JOB_TOKEN``) binds the jobs this client registers to it and must
        accompany every later request for them (see docs/SECURITY.md)."""
        self.target = target
        self.timeout_s = timeout_s
        job_token = job_token if job_token is not None else os.environ.get(ENV_JOB_TOKEN)
        self._token, self._job_token = token, job_token
        # The hand-off channel AdoptShard goes over, once a registration advertised one.
        self.handoff: HandoffChannel | None = None
        self._metadata = (((TOKEN_METADATA_KEY, token),) if token else ()) + (
            ((JOB_TOKEN_METADATA_KEY, job_token),) if job_token else ())
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.enable_http_proxy", 0),
                # A restarted daemon is found again within ~2 s (grpc's default backoff
                # grows to 120 s): the ranks of a job come back at nearly the same step.
                # Not "grpc.min_reconnect_backoff_ms": gRPC takes it as the minimum
                # *connect timeout* (default 20 s); at 200 ms a daemon slow to finish the
                # HTTP/2 handshake (a loaded machine) failed the channel, and a restore's
                # first call reported the daemon unreachable at once
                # (tests/client/test_transport_connect.py).
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000)]
        self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = pb_grpc.SnapshotdStub(self.channel)

    @classmethod
    def for_socket(cls, socket_path: str, **kw) -> "DaemonClient":
        return cls(f"unix:{socket_path}", **kw)

    def _call(self, name: str, request, timeout_s: float | None = None):
        try:
            return getattr(self.stub, name)(request, timeout=timeout_s or self.timeout_s,
                                            metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc, name) from None

    def register_job(self, job_id: str, world_size: int, local_world_size: int = 0,
                     restarting: bool = False):
        """Returns the RegisterJobResponse (latest committed version, block size); takes
        up the hand-off channel it advertises (see :meth:`_use_handoff`)."""
        resp = self._call("RegisterJob", pb.RegisterJobRequest(
            job_id=job_id, world_size=world_size, local_world_size=local_world_size,
            restarting=restarting))
        self._use_handoff(resp.handoff_endpoint)
        return resp

    def _use_handoff(self, endpoint: str) -> None:
        """AdoptShard over ``endpoint`` from now on, if this client reached the daemon
        through its Unix socket (the same host), the endpoint is an ``ipc://`` file and
        its file is found beside our socket path (the daemon may see that directory
        under another path: a container's mount) owned by the socket's owner, and
        ``$SNAPSHOTD_HANDOFF`` is not "grpc"; else over gRPC."""
        path = None
        if endpoint.startswith("ipc://") and self.target.startswith("unix:") and hw.enabled():
            sock = self.target[len("unix:"):]
            path = os.path.join(os.path.dirname(sock), os.path.basename(endpoint[len("ipc://"):]))
            try:  # the daemon's own file: owned as its socket is
                if os.stat(path).st_uid != os.stat(sock).st_uid:
                    path = None
            except OSError:
                path = None
        old = self.handoff
        if old is not None and old.path == path:
            return
        self.handoff = HandoffChannel(path, self._token, self._job_token) if path else None
        if old is not None:
            old.close()

    def acquire_staging(self, job_id: str, rank: int, version: int, payload_bytes: int,
                        force: bool = False, writer_id: str = ""):
        """``writer_id``: this writer's random id, for the reply's ``content_token``
        (incremental snapshots, docs/INCREMENTAL.md); "" gets a new token every time."""
        return self._call("AcquireStaging", pb.AcquireStagingRequest(
            job_id=job_id, rank=rank, version=version, payload_bytes=payload_bytes, force=force,
            writer_id=writer_id))

    def adopt(self, segment_name: str, manifest: pb.ShardManifest | bytes, next_version: int = 0,
              next_payload_bytes: int = 0, writer_id: str = "",
              hint: pb.IncrementalHint | None = None) -> pb.AdoptShardResponse:
        """Hand a filled staging segment to the daemon. ``manifest``: the message or its
        serialization (the Snapshotter's: its layout's bytes are serialized once).
        ``next_version``: also acquire the staging segment of this rank's next save, in
        the same call (its name comes back in ``next_segment_name``; ``next_refused`` says
        why not). ``hint``: which blocks were written since this writer's last adoption
        of the segment."""
        raw = isinstance(manifest, bytes)
        req = pb.AdoptShardRequest(
            segment_name=segment_name, manifest=None if raw else manifest, next_version=next_version,
            next_payload_bytes=next_payload_bytes, writer_id=writer_id, incremental=hint)
        ch = self.handoff
        if raw and ch is not None:  # field 2 (manifest) written by hand after the others
            return ch.call(hw.with_manifest(req.SerializeToString(), manifest), self.timeout_s)
        if raw:
            req.manifest.ParseFromString(manifest)
        if ch is not None:
            return ch.call(req, self.timeout_s)
        return self._call("AdoptShard", req)

    def commit(self, job_id: str, version: int) -> pb.CommitResponse:
        return self._call("Commit", pb.CommitRequest(job_id=job_id, version=version))

    def list_versions(self, job_id: str) -> pb.ListVersionsResponse:
        return self._call("ListVersions", pb.ListVersionsRequest(job_id=job_id))

    def open_shard(self, job_id: str, rank: int, version: int = 0,
                   no_copy: bool = False) -> pb.OpenShardResponse:
        """A committed shard's segment (read-only) and manifest. ``no_copy``: a shard held on
        another node comes back as its manifest only (empty ``segment_name``), not copied
        here; read its bytes with :meth:`fetch_range`."""
        return self._call("OpenShard", pb.FetchShardRequest(job_id=job_id, rank=rank, version=version,
                                                            no_copy=no_copy))

    def stats(self) -> pb.StatsResponse:
        return self._call("Stats", pb.StatsRequest())

    def drop_job(self, job_id: str, refuse_if_in_use: bool = False) -> int:
        """Drop the job here; ``refuse_if_in_use``: refused (ConflictError) when a request
        named it in the last 30 s. Returns the bytes freed."""
        return self._call("DropJob", pb.DropJobRequest(
            job_id=job_id, refuse_if_in_use=refuse_if_in_use)).bytes_freed

    def list_jobs(self, job_id: str = "") -> pb.ListJobsResponse:
        """Every job the daemon holds (or only ``job_id``: UnknownJobError if it holds none)."""
        return self._call("ListJobs", pb.ListJobsRequest(job_id=job_id))

    def collect_jobs(self, older_than_s: float | None = None,
                     dry_run: bool = False) -> pb.CollectJobsResponse:
        """Drop the jobs that are not active and idle ``older_than_s`` (default: the
        daemon's job TTL)."""
        req = pb.CollectJobsRequest(dry_run=dry_run)
        if older_than_s is not None:
            req.older_than_s = older_than_s
        return self._call("CollectJobs", req)

    def push_shard(self, manifest: pb.ShardManifest, payload) -> pb.AdoptShardResponse:
        """Stream a shard to a (possibly remote) daemon. ``payload``: a buffer."""
        mv = memoryview(payload).cast("B")

        def chunks():
            yield pb.PushShardChunk(manifest=manifest)
            for off in range(0, manifest.payload_bytes, STREAM_CHUNK_BYTES):
                yield pb.PushShardChunk(data=bytes(mv[off:off + STREAM_CHUNK_BYTES]))

        try:
            return self.stub.PushShard(chunks(), timeout=self.timeout_s * 10,
                                       metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc, "PushShard") from None

    def fetch_shard(self, job_id: str, rank: int, version: int = 0, out=None):
        """Stream a committed shard; returns (manifest, bytearray or ``out``)."""
        try:
            it = self.stub.FetchShard(pb.FetchShardRequest(job_id=job_id, rank=rank, version=version),
                                      timeout=self.timeout_s * 10, metadata=self._metadata)
            first = next(it)
            m = first.manifest
            buf = out if out is not None else bytearray(m.payload_bytes)
            mv = memoryview(buf).cast("B")
            off = 0
            for chunk in it:
                mv[off:off + len(chunk.data)] = chunk.data
                off += len(chunk.data)
        except grpc.RpcError as exc:
            raise _translate(exc, "FetchShard") from None
        if off != m.payload_bytes:
            raise errors.ChecksumMismatchError(f"FetchShard: got {off} of {m.payload_bytes} bytes")
        # The daemon verified before sending; verify what arrived too (a segment could be
        # reused mid-stream if newer versions commit meanwhile).
        from snapshotd.wire.manifest import verify_checksums

        verify_checksums(buf, m, what="fetched shard")
        return m, buf

    def fetch_range(self, job_id: str, rank: int, version: int, offset: int, length: int):
        """Bytes [offset, offset + length) of a committed shard: the daemon verifies and
        sends only the checksum blocks covering them, verified again here. Returns
        (manifest, the bytes, how many bytes crossed the channel)."""
        if offset < 0 or length < 1:
            raise errors.InvalidRequestError(f"fetch_range needs offset >= 0 and length >= 1, "
                                             f"got {offset}, {length}")
        try:
            it = self.stub.FetchShard(pb.FetchShardRequest(job_id=job_id, rank=rank, version=version,
                                                           offset=offset, length=length),
                                      timeout=self.timeout_s * 10, metadata=self._metadata)
            m = next(it).manifest
            data = bytearray()
            for chunk in it:
                data += chunk.data
        except grpc.RpcError as exc:
            raise _translate(exc, "FetchShard") from None
        from snapshotd.wire import manifest as mf

        b0, b1 = mf.covering_blocks(m, offset, length)
        lo, hi = b0 * m.block_size_bytes, min(b1 * m.block_size_bytes, m.payload_bytes)
        if len(data) != hi - lo:
            raise errors.ChecksumMismatchError(f"FetchShard: got {len(data)} of the {hi - lo} bytes "
                                               f"of blocks {b0}..{b1 - 1}")
        mf.verify_blocks(data, m, b0, "fetched range")
        return m, bytes(memoryview(data)[offset - lo:offset - lo + length]), len(data)

    def close(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
            self.handoff = None
        self.channel.close()


class SegmentCache:
    """Keeps staging segments mapped between snapshots, so copies hit warm pages.

    A name is re-opened when the file behind it changed (a restarted daemon may
    reuse a name for a new segment), detected by inode and size.

    ``on_close(seg)`` runs right before a mapping is closed: the CUDA path registers
    mappings with the driver (cudaHostRegister) and must unregister them while they
    are still mapped, or the driver keeps the pages pinned and may later DMA into them
    through a new mapping that lands at the same address.
    """

    def __init__(self, on_close=None):
        self._segs: dict[str, tuple[shm.Segment, tuple[int, int]]] = {}
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()
        self._on_close = on_close

    def _close(self, seg: shm.Segment) -> None:
        if self._on_close is not None:
            self._on_close(seg)
        seg.close()

    def get(self, name: str, writable: bool = True) -> shm.Segment:
        path = self._paths.get(name)
        if path is None:  # the name checked once (a daemon's answer: no path tricks)
            path = shm.path_of(name)
            if len(self._paths) > 256:
                self._paths.clear()
            self._paths[name] = path
        st = os.stat(path)
        key = (st.st_ino, st.st_size)
        with self._lock:
            cached = self._segs.get(name)
            if cached is not None and cached[1] == key and cached[0].writable == writable:
                return cached[0]
            if cached is not None:
                self._close(cached[0])
            # Mapped whole at once: it is about to be filled (a save) or read (a restore).
            seg = shm.open_segment(name, writable=writable, prefault=True)
            self._segs[name] = (seg, key)
            # Forget mappings of segments that no longer exist.
            for other in [n for n in self._segs if n != name]:
                if not os.path.exists(shm.path_of(other)):
                    self._close(self._segs.pop(other)[0])
            return seg

    def close(self) -> None:
        with self._lock:
            for seg, _ in self._segs.values():
                self._close(seg)
            self._segs.clear()
