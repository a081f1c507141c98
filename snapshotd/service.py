"""gRPC face of the daemon: the Snapshotd servicer, error mapping and token check.

Each RPC is a thin translation between protobuf messages and :class:`ShardStore`
calls. Errors are mapped to gRPC status codes in exactly one place
(:func:`_status_of`): every :class:`~snapshotd.errors.SnapshotdError` carries its code;
anything else is an INTERNAL error, logged with its traceback. A refused request never
changes the store and never stops the server.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os

import grpc

from snapshotd._proto import snapshotd_pb2 as pb
from snapshotd._proto import snapshotd_pb2_grpc as pb_grpc
from snapshotd.errors import InvalidRequestError, SnapshotdError
from snapshotd.store import ShardStore

log = logging.getLogger("snapshotd.service")

TOKEN_METADATA_KEY = "x-snapshotd-token"
STREAM_CHUNK_BYTES = 4 << 20
MAX_MESSAGE_BYTES = 64 << 20


def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, SnapshotdError):
        return getattr(grpc.StatusCode, exc.grpc_code_name)
    return grpc.StatusCode.INTERNAL


def _rpc(method):
    """Run an RPC body; turn exceptions into a status on the call's context."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SnapshotdError as exc:
            log.warning("%s refused: %s", method.__name__, exc)
            context.abort(_status_of(exc), str(exc))
        except ValueError as exc:  # e.g. a bad segment name from shm.check_name
            log.warning("%s refused: %s", method.__name__, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return wrapper


def _stream_rpc(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except SnapshotdError as exc:
            log.warning("%s refused: %s", method.__name__, exc)
            context.abort(_status_of(exc), str(exc))

    return wrapper


class SnapshotdServicer(pb_grpc.SnapshotdServicer):
    def __init__(self, store: ShardStore, cluster=None):
        self.store = store
        self.cluster = cluster  # snapshotd.cluster.ClusterNode, or None for one node

    @_rpc
    def RegisterJob(self, request, context):
        v = self.store.register_job(request.job_id, request.world_size, request.local_world_size,
                                    request.restarting)
        if self.cluster is not None:
            if request.restarting:
                self.cluster.fence(request.job_id, broadcast=True)
            v = self.cluster.latest_committed(request.job_id)
        return pb.RegisterJobResponse(
            latest_committed_version=v,
            block_size_bytes=self.cluster.bs if self.cluster is not None else 0)

    @_rpc
    def AcquireStaging(self, request, context):
        name, size = self.store.acquire_staging(
            request.job_id, request.rank, request.version, request.payload_bytes, request.force)
        return pb.AcquireStagingResponse(segment_name=name, segment_bytes=size)

    @_rpc
    def AdoptShard(self, request, context):
        if not request.HasField("manifest"):
            raise InvalidRequestError("AdoptShard needs a manifest")
        committed, latest = self.store.adopt(request.segment_name, request.manifest)
        return pb.AdoptShardResponse(version=request.manifest.version, committed=committed,
                                     latest_committed_version=latest)

    @_rpc
    def PushShard(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("manifest"):
            raise InvalidRequestError("PushShard: the first message must carry the manifest")

        def payload():
            if first.data:
                yield first.data
            for chunk in request_iterator:
                if chunk.HasField("manifest"):
                    raise InvalidRequestError("PushShard: only the first message may carry a manifest")
                yield chunk.data

        committed, latest = self.store.push(first.manifest, payload())
        return pb.AdoptShardResponse(version=first.manifest.version, committed=committed,
                                     latest_committed_version=latest)

    @_rpc
    def Commit(self, request, context):
        ok, missing, latest = self.store.commit(request.job_id, request.version)
        return pb.CommitResponse(committed=ok, missing_ranks=missing,
                                 latest_committed_version=latest)

    @_rpc
    def ListVersions(self, request, context):
        latest, versions = self.store.list_versions(request.job_id)
        return pb.ListVersionsResponse(
            latest_committed_version=latest,
            versions=[pb.VersionInfo(version=v, committed=c, delivered_ranks=r, bytes=b)
                      for v, c, r, b in versions])

    @_rpc
    def OpenShard(self, request, context):
        if self.cluster is not None:
            try:
                self.cluster.ensure_restorable(request.job_id, request.version)
            except SnapshotdError:
                # This node's own shards are lost for good (more than m losses). Other
                # nodes' ranks can still be served -- CheckFree needs its neighbours'.
                if self.cluster.owner_of(request.job_id, request.rank, request.version) in (
                        None, self.cluster.me):
                    raise
            if not self.store.holds_rank(request.job_id, request.rank):
                name, m = self.cluster.open_remote_shard(request.job_id, request.rank, request.version)
                return pb.OpenShardResponse(segment_name=name, manifest=m)
        name, m, _ = self.store.committed_shard(request.job_id, request.rank, request.version)
        return pb.OpenShardResponse(segment_name=name, manifest=m)

    @_stream_rpc
    def FetchShard(self, request, context):
        _, m, seg = self.store.committed_shard(request.job_id, request.rank, request.version)
        yield pb.FetchShardChunk(manifest=m)
        for off in range(0, m.payload_bytes, STREAM_CHUNK_BYTES):
            end = min(off + STREAM_CHUNK_BYTES, m.payload_bytes)
            yield pb.FetchShardChunk(data=seg.buf[off:end])

    @_rpc
    def Stats(self, request, context):
        s = self.store.stats()
        return pb.StatsResponse(
            node_id=s["node_id"], memory_budget_bytes=s["memory_budget_bytes"],
            bytes_reserved=s["bytes_reserved"], bytes_committed=s["bytes_committed"],
            jobs=[pb.JobStats(**j) for j in s["jobs"]],
            requests_refused=s["requests_refused"], pid=os.getpid(),
            cluster_json=json.dumps(self.cluster.status()) if self.cluster is not None else "")

    @_rpc
    def DropJob(self, request, context):
        return pb.DropJobResponse(bytes_freed=self.store.drop_job(request.job_id))


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse every call without the right token (health checks excepted)."""

    def __init__(self, token: str, on_refused=None):
        self._token = token.encode()
        self._on_refused = on_refused

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        got = dict(details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if isinstance(got, str):
            got = got.encode()
        if got and hmac.compare_digest(got, self._token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if self._on_refused is not None:
            self._on_refused()
        msg = "missing snapshotd token" if not got else "wrong snapshotd token"
        log.warning("%s: %s", details.method, msg)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
