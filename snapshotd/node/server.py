"""Start and stop a daemon: store + gRPC server on a Unix socket (and optional TCP),
the cluster peer plane when a spec is given, the Prometheus endpoint when asked, and the
job garbage collector (:mod:`snapshotd.node.job_keeper`).

Start-up order, so that each signal means what it says: a stale ready file is removed
first; the health service answers NOT_SERVING from the moment the listeners accept;
then the peer plane, the socket's permission check, the metrics endpoint and the job
collector start; only then does health turn SERVING, and only after that is the ready
file written (atomically). Whoever sees the ready file, or SERVING, can connect to
every listener the daemon promised (socket, TCP, peer port, metrics). On stop, the
ready file goes first and health turns NOT_SERVING. The TCP listener does not share
its port (no SO_REUSEPORT): a second daemon given the same port fails to start instead
of silently splitting the traffic (and the probes) with the first.

The Unix socket is created 0600 (umask 0177 while binding, then chmod) and is checked
to be owned by the daemon's user before the daemon reports ready: only that user (and
root) can connect, which is what protects a token-less daemon on a shared host.

Beside the socket, the same-host hand-off channel (:mod:`snapshotd.node.handoff`,
``<socket>.ho``, as private) serves AdoptShard without gRPC; it is started with the
socket and advertised to registering clients, unless ``DaemonConfig.handoff`` is off or
``$SNAPSHOTD_HANDOFF`` is "grpc". A daemon whose channel cannot start serves gRPC alone.

Every request body is parsed by :class:`RequestParseGuard` (after the token check):
bytes that are not the method's protobuf message are refused with INVALID_ARGUMENT,
logged and counted, instead of grpc's own INTERNAL "Exception deserializing request!".
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from snapshotd.wire._proto import snapshotd_pb2_grpc as pb_grpc
from snapshotd.wire.errors import MalformedRequestError
from snapshotd.wire.limits import MAX_MESSAGE_BYTES
from snapshotd.node.metrics import DaemonMetrics
from snapshotd.node.auth import JobTokens, TokenInterceptor
from snapshotd.node.service import SnapshotdServicer
from snapshotd.node.store import ShardStore

log = logging.getLogger("snapshotd.server")

# What the health service answers for: the server as a whole ("") and the API.
HEALTH_SERVICES = ("", "snapshotd.v1.Snapshotd")


@dataclass
class DaemonConfig:
    node_id: str
    state_dir: str
    socket_path: str
    memory_budget_bytes: int
    tcp: str | None = None  # "host:port"; port 0 picks a free one
    token: str | None = None
    max_slots_per_rank: int = 3
    verify_on_adopt: bool = True
    workers: int = 16
    ready_file: str | None = None
    spec_path: str | None = None  # cluster spec: this node takes part in a cluster
    instance: str = ""  # namespace of this daemon's /dev/shm segments
    metrics_addr: str | None = None  # "host:port" of the Prometheus endpoint; None = off
    require_job_token: bool = False  # refuse to register a job without a job token
    # Cluster mode: background scrubber (snapshotd.node.cluster.scrub); rate 0 = no passes.
    scrub_rate_bytes_per_s: int = 64 << 20
    scrub_interval_s: float = 600.0
    # Jobs (snapshotd.node.job_keeper): idle non-active jobs are dropped after job_ttl_s
    # (0 = never); a job with a request in the last job_active_s is "active".
    job_ttl_s: float = 24 * 3600.0
    job_active_s: float = 600.0
    # The same-host hand-off channel for AdoptShard (snapshotd.node.handoff); also off
    # when $SNAPSHOTD_HANDOFF is "grpc".
    handoff: bool = True


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        if cfg.tcp and not cfg.token:
            raise ValueError("a TCP listener needs a token (--token or SNAPSHOTD_TOKEN)")
        if len(cfg.socket_path) > 100:
            raise ValueError(f"socket path too long for AF_UNIX: {cfg.socket_path}")
        if cfg.metrics_addr:
            from snapshotd.node.metrics import parse_addr

            parse_addr(cfg.metrics_addr)  # a clear error before anything starts
        if cfg.scrub_rate_bytes_per_s < 0 or not cfg.scrub_interval_s > 0:
            raise ValueError("--scrub-rate must be >= 0 (0 = off) and --scrub-interval-s > 0")
        self.cfg = cfg
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        self.cluster = None
        spec = None
        if cfg.spec_path:
            from snapshotd.node.spec_file import load_spec

            spec = load_spec(cfg.spec_path)
            spec.node(cfg.node_id)  # a clear error if this node is not in the spec
        self.store = ShardStore(cfg.node_id, cfg.state_dir, cfg.memory_budget_bytes,
                                cfg.max_slots_per_rank, cfg.verify_on_adopt,
                                cluster_mode=spec is not None, instance=cfg.instance)
        if spec is not None:
            from snapshotd.node.cluster.node import ClusterNode

            self.cluster = ClusterNode(spec, cfg.node_id, self.store)
            self.store.commit_hook = self.cluster.on_local_complete
            self.cluster.load_records()
            self.cluster.scrub_rate_bytes_per_s = int(cfg.scrub_rate_bytes_per_s)
            self.cluster.scrub_interval_s = float(cfg.scrub_interval_s)
        self.metrics = DaemonMetrics(self.store, self.cluster)
        if self.cluster is not None:
            self.cluster.metrics = self.metrics
        self.metrics_port: int | None = None
        interceptors = []
        self.tokens = TokenInterceptor(cfg.token, self._count_refused) if cfg.token else None
        if self.tokens is not None:
            interceptors.append(self.tokens)
        # After the token check: a caller without the token learns nothing about parsing.
        interceptors.append(RequestParseGuard(self._count_malformed))
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0)]  # a port in use is an error, not a shared port
        self.server = grpc.server(futures.ThreadPoolExecutor(cfg.workers),
                                  interceptors=interceptors, options=opts)
        from snapshotd.node.job_keeper import JobKeeper

        self.servicer = SnapshotdServicer(self.store, self.cluster, self.metrics,
                                          JobTokens(cfg.state_dir, cfg.require_job_token))
        self.jobs = JobKeeper(self.store, self.servicer.drop_job_extras, ttl_s=cfg.job_ttl_s,
                              active_s=cfg.job_active_s)
        self.servicer.jobs = self.jobs
        pb_grpc.add_SnapshotdServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        for service in HEALTH_SERVICES:  # NOT_SERVING (not NOT_FOUND) until start() is done
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.tcp_port: int | None = None
        self.handoff = None  # snapshotd.node.handoff.HandoffServer while it serves
        self._stopped = threading.Event()

    def _count_refused(self) -> None:
        self.store.requests_refused += 1
        self.metrics.refused_request("UNAUTHENTICATED")

    def _count_malformed(self, method: str, detail: str) -> None:
        log.warning("%s refused (INVALID_ARGUMENT): %s", method.rsplit("/", 1)[-1], detail)
        self.store.requests_refused += 1  # the store never saw it
        self.metrics.refused_request("INVALID_ARGUMENT")

    def _remove_ready_file(self) -> None:
        if self.cfg.ready_file:
            for path in (self.cfg.ready_file, self.cfg.ready_file + ".tmp"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def start(self) -> None:
        self._remove_ready_file()  # a previous daemon's (SIGKILLed) must not say "ready"
        sock = self.cfg.socket_path
        os.makedirs(os.path.dirname(sock) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(sock):
            os.unlink(sock)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            self.server.add_insecure_port(f"unix:{sock}")
            if self.cfg.tcp:
                try:
                    self.tcp_port = self.server.add_insecure_port(self.cfg.tcp)
                except RuntimeError as exc:  # grpc >= 1.5x raises; older ones return 0
                    raise ValueError(f"--tcp {self.cfg.tcp}: cannot listen ({exc}); is the port "
                                     "in use?") from None
                if not self.tcp_port:
                    raise ValueError(f"--tcp {self.cfg.tcp}: cannot listen; is the port in use?")
            self.server.start()
        finally:
            os.umask(old)
        if self.cluster is not None:
            self.cluster.start()
        os.chmod(sock, 0o600)
        _check_private_socket(sock)
        self._start_handoff()
        if self.cfg.metrics_addr:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_addr)
            log.info("metrics on http://%s/metrics", self.cfg.metrics_addr.rsplit(":", 1)[0] +
                     f":{self.metrics_port}")
        self.jobs.start()
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("snapshotd %s serving on unix:%s%s (budget %d bytes, state %s)",
                 self.cfg.node_id, sock,
                 f" and tcp port {self.tcp_port}" if self.tcp_port else "",
                 self.cfg.memory_budget_bytes, self.cfg.state_dir)
        if self.cluster is not None:
            log.info("cluster node %s: group %d %s, k=%d m=%d, peer port %d", self.cfg.node_id,
                     self.cluster.group_index, list(self.cluster.group), self.cluster.k,
                     self.cluster.m, self.cluster.server.port)
        if self.cfg.ready_file:
            tmp = self.cfg.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "socket": sock, "tcp_port": self.tcp_port,
                           "node_id": self.cfg.node_id, "shm_prefix": self.store.prefix,
                           "peer_port": self.cluster.server.port if self.cluster else None,
                           "metrics_port": self.metrics_port}, f)
            os.replace(tmp, self.cfg.ready_file)

    def _start_handoff(self) -> None:
        from snapshotd.wire import handoff as hw

        if not (self.cfg.handoff and hw.enabled()):
            log.info("hand-off channel off (%s=grpc or handoff=False): AdoptShard over gRPC",
                     hw.ENV_HANDOFF)
            return
        from snapshotd.node.handoff import HandoffServer

        server = HandoffServer(self.servicer, self.cfg.socket_path, self.tokens, self._count_malformed)
        try:
            endpoint = server.start()
            _check_private_socket(server.path)
        except Exception as exc:  # gRPC alone still serves everything
            log.warning("hand-off channel not started (%s); AdoptShard over gRPC only", exc)
            server.stop()
            return
        self.handoff = server
        self.servicer.handoff_endpoint = endpoint

    def stop(self, grace_s: float = 2.0) -> None:
        self._remove_ready_file()
        self.health.enter_graceful_shutdown()
        self.jobs.stop()
        if self.handoff is not None:
            self.servicer.handoff_endpoint = ""
            self.handoff.stop()
        if self.cluster is not None:
            self.cluster.stop()
        self.server.stop(grace_s).wait()
        self.metrics.close()
        self.store.close()
        try:
            os.unlink(self.cfg.socket_path)
        except FileNotFoundError:
            pass
        self._stopped.set()

    def serve_forever(self) -> None:
        self.start()

        def on_signal(signum, frame):
            log.info("signal %d: shutting down (segments are kept)", signum)
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._stopped.wait()


class MalformedRequest:
    """What a guarded deserializer returns for bytes that do not parse. grpc answers
    INTERNAL when a deserializer raises (or returns None) and never calls the handler;
    a value that is not None reaches the guarded handler, which refuses it."""

    __slots__ = ("detail",)

    def __init__(self, detail: str):
        self.detail = detail


def _message_name(deserializer) -> str:
    cls = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    name = getattr(getattr(cls, "DESCRIPTOR", None), "full_name", None)
    return name or getattr(deserializer, "__qualname__", repr(deserializer))


def _tolerant(deserializer, method: str):
    what = _message_name(deserializer)

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # whatever the parser says: these are the caller's bytes
            reason = (str(exc).rsplit(": ", 1)[-1] if isinstance(exc, DecodeError)
                      else f"{type(exc).__name__}: {exc}")
            return MalformedRequest(f"malformed request for {method}: cannot parse as {what} "
                                    f"({len(data)} bytes; {reason})")

    return parse


class RequestParseGuard(grpc.ServerInterceptor):
    """Answer INVALID_ARGUMENT, not INTERNAL, to a request body that is not the method's
    protobuf message, on every service of the server (health included).

    It rebuilds each method's handler with a deserializer that returns a
    :class:`MalformedRequest` instead of raising, and a behaviour that refuses one
    (``on_refused(method, detail)`` logs and counts, then the call is aborted). A
    malformed message in a request stream makes the servicer's iterator raise
    :class:`~snapshotd.wire.errors.MalformedRequestError`, which the servicer refuses like
    any invalid request (and which is refused here if it escapes). An empty body is a
    valid (empty) message and goes on to the servicer's own validation. The guarded
    handler of each method is built once and reused; thread-safe.
    """

    def __init__(self, on_refused):
        self._on_refused = on_refused
        self._built: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method, or a handler that takes raw bytes
        built = self._built.get(details.method)
        if built is None or built[0] is not handler:
            built = (handler, self._guard(details.method, handler))
            self._built[details.method] = built  # one entry per registered method
        return built[1]

    def _refuse(self, method: str, detail: str, context):
        self._on_refused(method, detail)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)

    def _guard(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        refuse = self._refuse
        if not h.request_streaming:
            inner = h.unary_stream if h.response_streaming else h.unary_unary

            def behavior(request, context, *rest):  # rest: a non-blocking send callback
                if isinstance(request, MalformedRequest):
                    refuse(method, request.detail, context)
                return inner(request, context, *rest)

            make = (grpc.unary_stream_rpc_method_handler if h.response_streaming
                    else grpc.unary_unary_rpc_method_handler)
        else:
            inner = h.stream_stream if h.response_streaming else h.stream_unary

            def checked(requests):
                for request in requests:
                    if isinstance(request, MalformedRequest):
                        raise MalformedRequestError(request.detail)
                    yield request

            if h.response_streaming:
                def behavior(requests, context, *rest):
                    try:
                        yield from inner(checked(requests), context, *rest)
                    except MalformedRequestError as exc:
                        refuse(method, str(exc), context)

                make = grpc.stream_stream_rpc_method_handler
            else:
                def behavior(requests, context, *rest):
                    try:
                        return inner(checked(requests), context, *rest)
                    except MalformedRequestError as exc:
                        refuse(method, str(exc), context)

                make = grpc.stream_unary_rpc_method_handler
        for attr in ("experimental_non_blocking", "experimental_thread_pool"):  # health Watch
            if hasattr(inner, attr):
                setattr(behavior, attr, getattr(inner, attr))
        return make(behavior, request_deserializer=_tolerant(h.request_deserializer, method),
                    response_serializer=h.response_serializer)


def _check_private_socket(path: str) -> None:
    """The client socket must be 0600 and ours; warn when its directory lets other
    users replace it (they could then impersonate the daemon to trainers)."""
    st = os.stat(path)
    if st.st_mode & 0o777 != 0o600 or st.st_uid != os.geteuid():
        raise RuntimeError(f"socket {path} is mode {st.st_mode & 0o777:o} owned by uid "
                           f"{st.st_uid}; expected 600 owned by uid {os.geteuid()}")
    d = os.stat(os.path.dirname(path) or ".")
    if d.st_mode & 0o022 and not d.st_mode & 0o1000:
        log.warning("socket directory %s is writable by other users (mode %o): they could "
                    "replace the socket; use a 0700 or 0750 directory", os.path.dirname(path),
                    d.st_mode & 0o7777)
