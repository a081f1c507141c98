"""gRPC face of the daemon: the Snapshotd servicer, error mapping and token check.

Each RPC is a thin translation between protobuf messages and :class:`ShardStore`
calls. Errors are mapped to gRPC status codes in exactly one place
(:func:`_status_of`): every :class:`~snapshotd.wire.errors.SnapshotdError` carries its code;
anything else is an INTERNAL error, logged with its traceback. A refused request never
changes the store and never stops the server; it is logged and counted (store stats and
``snapshotd_requests_refused_total{reason=<gRPC code>}``). Bodies that do not parse as
the request message never reach the servicer (``snapshotd.node.server.RequestParseGuard``
refuses them INVALID_ARGUMENT), except a malformed message later in a request stream,
which the servicer sees as :class:`MalformedRequestError`.

Job binding (see docs/SECURITY.md): the daemon token says *who may talk to the
daemon*; a job token (metadata ``x-snapshotd-job-token``, client env
``SNAPSHOTD_JOB_TOKEN``) says *which job's snapshots a caller may touch*. A job
registered with a job token is bound to it (its SHA-256 is kept in
``STATE_DIR/job_tokens.json``, 0600); every later request naming that job must carry
the same token or is refused with PERMISSION_DENIED. Jobs registered without one stay
open to every holder of the daemon token, unless the daemon runs with
``--require-job-token``. The tokens' classes: :mod:`snapshotd.node.auth`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import grpc

from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire._proto import snapshotd_pb2_grpc as pb_grpc
from snapshotd.wire.errors import (
    AuthenticationError,
    ChecksumMismatchError,
    InvalidRequestError,
    JobAccessDeniedError,
    MalformedRequestError,
    MemoryBudgetExceededError,
    SnapshotdError,
    SnapshotInFlightError,
    error_for,
)
from snapshotd.wire.limits import (
    ERROR_METADATA_KEY,
    JOB_TOKEN_METADATA_KEY,
    MAX_JOBS,
    MAX_TOTAL_RANKS,
    STREAM_CHUNK_BYTES,
)
from snapshotd.wire.ratelimit import WarningLimiter
from snapshotd.node.auth import JobTokens
from snapshotd.node.store import ShardStore

log = logging.getLogger("snapshotd.service")

def _status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, SnapshotdError):
        return getattr(grpc.StatusCode, exc.grpc_code_name)
    return grpc.StatusCode.INTERNAL


def _abort(context, exc: SnapshotdError):
    """Answer with the error's status, its code beside it (the client raises the same class)."""
    context.set_trailing_metadata(((ERROR_METADATA_KEY, error_for(exc)),))
    context.abort(_status_of(exc), str(exc))


def _rpc(method):
    """Run an RPC body; turn exceptions into a status on the call's context."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return self.refusing(method.__name__, method, request, context)
        except SnapshotdError as exc:
            _abort(context, exc)

    return wrapper


class MetadataContext:
    """The one part of a gRPC context an RPC body reads, for a face other than gRPC
    (:mod:`snapshotd.node.handoff`): the invocation metadata, as (key, value) pairs."""

    __slots__ = ("_metadata", "raw_manifest")

    def __init__(self, metadata):
        self._metadata = tuple(metadata)
        self.raw_manifest = None  # AdoptShard: the manifest's bytes as sent, when known

    def invocation_metadata(self):
        return self._metadata


def _stream_rpc(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except SnapshotdError as exc:
            self._refused(method.__name__, _status_of(exc), exc)
            _abort(context, exc)

    return wrapper


def _metadata(context, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None


def _job_info(i) -> pb.JobInfo:
    return pb.JobInfo(job_id=i.job_id, world_size=i.world_size, local_world_size=i.local_world_size,
                      latest_committed_version=i.latest_committed_version, bytes_held=i.bytes_held,
                      segments=i.segments, last_activity_unix_s=i.last_activity, idle_s=i.idle_s,
                      state=i.state, uncommitted_versions=i.uncommitted_versions)


class SnapshotdServicer(pb_grpc.SnapshotdServicer):
    def __init__(self, store: ShardStore, cluster=None, metrics=None, job_tokens: JobTokens | None = None,
                 jobs=None):
        self.store = store
        self.cluster = cluster  # snapshotd.node.cluster.node.ClusterNode, or None for one node
        self.metrics = metrics  # snapshotd.node.metrics.DaemonMetrics, or None
        self.job_tokens = job_tokens
        if jobs is None:
            from snapshotd.node.job_keeper import JobKeeper

            jobs = JobKeeper(store, self.drop_job_extras, ttl_s=0)
        self.jobs = jobs  # snapshotd.node.job_keeper.JobKeeper: list, show, drop, gc
        self._log_limiter = WarningLimiter(10.0)
        # Advertised to registering clients while the hand-off channel serves ("" = none).
        self.handoff_endpoint = ""

    def _refused(self, method: str, code: grpc.StatusCode, exc: BaseException) -> None:
        # A refusal that repeats by design (ABORTED: a client polling for a slot, ranks
        # converging after a restart) is logged once per 10 s per method and error class;
        # every other refusal is logged each time. All are counted.
        ok, held = (self._log_limiter.allow((method, type(exc).__name__))
                    if isinstance(exc, SnapshotInFlightError) else (True, 0))
        if ok:
            log.warning("%s refused (%s): %s%s", method, code.name, exc,
                        self._log_limiter.held_note(held))
        if isinstance(exc, (JobAccessDeniedError, AuthenticationError)):
            self.store.requests_refused += 1  # the store never saw these
        if self.metrics is not None:
            self.metrics.refused_request(code.name)

    def refusing(self, name: str, body, request, context):
        """Run an RPC body; a refusal is logged and counted, then raised as a SnapshotdError
        (a ValueError, e.g. a bad segment name from shm.check_name, as InvalidRequestError)."""
        try:
            return body(self, request, context)
        except SnapshotdError as exc:
            self._refused(name, _status_of(exc), exc)
            raise
        except ValueError as exc:
            self._refused(name, grpc.StatusCode.INVALID_ARGUMENT, exc)
            raise InvalidRequestError(str(exc)) from None

    def adopt_shard(self, request, metadata, raw_manifest: bytes | None = None):
        """AdoptShard for the same-host hand-off channel: ``metadata`` as the gRPC call
        would carry it ((key, value) pairs; the daemon token is checked by the caller).
        The same body as over gRPC; a refusal is raised as the SnapshotdError gRPC's
        status would name. ``raw_manifest``: the request's manifest as it was sent (the
        store's layout check compares bytes with it, ``LayoutCache``)."""
        ctx = MetadataContext(metadata)
        ctx.raw_manifest = raw_manifest
        return self.refusing("AdoptShard", SnapshotdServicer.AdoptShard.__wrapped__, request, ctx)

    def _job_access(self, context, job_id: str, registering: bool = False) -> None:
        if self.job_tokens is not None:
            self.job_tokens.check(job_id, _metadata(context, JOB_TOKEN_METADATA_KEY), registering)

    @_rpc
    def RegisterJob(self, request, context):
        jobs = self.store.jobs_summary()
        if request.job_id not in jobs:
            ranks = sum(j["world_size"] for j in jobs.values())
            if len(jobs) >= MAX_JOBS or ranks + request.world_size > MAX_TOTAL_RANKS:
                raise MemoryBudgetExceededError(
                    f"this daemon holds {len(jobs)} jobs with {ranks} ranks; at most {MAX_JOBS} "
                    f"jobs and {MAX_TOTAL_RANKS} ranks in all: drop some first")
        self._job_access(context, request.job_id, registering=True)
        v = self.store.register_job(request.job_id, request.world_size, request.local_world_size,
                                    request.restarting)
        if self.job_tokens is not None:
            self.job_tokens.bind(request.job_id, _metadata(context, JOB_TOKEN_METADATA_KEY))
        if self.cluster is not None:
            if request.restarting:
                self.cluster.fence(request.job_id, broadcast=True)
            v = self.cluster.latest_committed(request.job_id)
        return pb.RegisterJobResponse(
            latest_committed_version=v,
            block_size_bytes=self.cluster.bs if self.cluster is not None else 0,
            handoff_endpoint=self.handoff_endpoint)

    @_rpc
    def AcquireStaging(self, request, context):
        self._job_access(context, request.job_id)
        name, size, token = self.store.acquire_for_writer(
            request.job_id, request.rank, request.version, request.payload_bytes, request.force,
            request.writer_id)
        if self.metrics is not None:
            self.metrics.staged(request.job_id, request.version)
        return pb.AcquireStagingResponse(segment_name=name, segment_bytes=size, content_token=token)

    @_rpc
    def AdoptShard(self, request, context):
        if not request.HasField("manifest"):
            raise InvalidRequestError("AdoptShard needs a manifest")
        self._job_access(context, request.manifest.job_id)
        m = request.manifest
        if request.next_version and request.next_version <= m.version:
            raise InvalidRequestError(f"AdoptShard: next_version {request.next_version} is not "
                                      f"newer than version {m.version}")
        hint = request.incremental if request.HasField("incremental") else None
        committed, latest, hashed = self.store.adopt_hinted(  # m: parsed for this call, ours to keep
            request.segment_name, m, hint, getattr(context, "raw_manifest", None), owned=True)
        if committed and self.metrics is not None:
            self.metrics.committed(m.job_id, m.version)
        resp = pb.AdoptShardResponse(version=m.version, committed=committed,
                                     latest_committed_version=latest, bytes_hashed=hashed)
        if request.next_version:
            self._stage_next(request, resp)
        return resp

    def _stage_next(self, request, resp) -> None:
        """AdoptShard's optional second part: the staging segment of the rank's next save
        (see AdoptShardRequest.next_version). Refused as AcquireStaging would be, but the
        refusal only goes into ``next_refused``: the adoption itself succeeded.

        In a cluster the grant keeps the room of the parity buffers the job's versions in
        flight still need (issue 18): a parity buffer cannot take a staged slot's memory,
        so a stage-ahead that took it would leave the adopted version unable to commit.
        Refused, the next save asks for its own slot."""
        m = request.manifest
        try:
            reserve = (self.cluster.parity.room_needed(m.job_id, (m.version,))
                       if self.cluster is not None else 0)
            name, size, token = self.store.acquire_for_writer(
                m.job_id, m.rank, request.next_version, request.next_payload_bytes, False,
                request.writer_id, reserve=reserve)
        except (SnapshotdError, ValueError) as exc:
            resp.next_refused = f"{type(exc).__name__}: {exc}"[:500]
            return
        if self.metrics is not None:
            self.metrics.staged(m.job_id, request.next_version)
        resp.next_segment_name, resp.next_segment_bytes = name, size
        resp.next_content_token = token

    @_rpc
    def PushShard(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
        except MalformedRequestError:
            self.store.requests_refused += 1  # the store never saw it (later chunks: it does)
            raise
        if first is None or not first.HasField("manifest"):
            raise InvalidRequestError("PushShard: the first message must carry the manifest")
        self._job_access(context, first.manifest.job_id)
        if self.metrics is not None:
            self.metrics.staged(first.manifest.job_id, first.manifest.version)

        def payload():
            if first.data:
                yield first.data
            for chunk in request_iterator:
                if chunk.HasField("manifest"):
                    raise InvalidRequestError("PushShard: only the first message may carry a manifest")
                yield chunk.data

        committed, latest = self.store.push(first.manifest, payload())
        if committed and self.metrics is not None:
            self.metrics.committed(first.manifest.job_id, first.manifest.version)
        return pb.AdoptShardResponse(version=first.manifest.version, committed=committed,
                                     latest_committed_version=latest)

    @_rpc
    def Commit(self, request, context):
        self._job_access(context, request.job_id)
        ok, missing, latest = self.store.commit(request.job_id, request.version)
        return pb.CommitResponse(committed=ok, missing_ranks=missing,
                                 latest_committed_version=latest)

    @_rpc
    def ListVersions(self, request, context):
        self._job_access(context, request.job_id)
        latest, versions = self.store.list_versions(request.job_id)
        return pb.ListVersionsResponse(
            latest_committed_version=latest,
            versions=[pb.VersionInfo(version=v, committed=c, delivered_ranks=r, bytes=b)
                      for v, c, r, b in versions])

    @_rpc
    def OpenShard(self, request, context):
        self._job_access(context, request.job_id)
        t0 = time.monotonic()
        out = self._open_shard(request)
        if self.metrics is not None:
            self.metrics.restore_served("open", time.monotonic() - t0)
        return out

    def _open_shard(self, request):
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
                if request.no_copy:  # the manifest only: the caller reads ranges (FetchShard)
                    name, m = self.cluster.remote_manifest(request.job_id, request.rank, request.version)
                else:
                    name, m = self.cluster.open_remote_shard(request.job_id, request.rank, request.version)
                return pb.OpenShardResponse(segment_name=name, manifest=m)
        try:
            name, m, _ = self.store.committed_shard(request.job_id, request.rank, request.version)
        except ChecksumMismatchError as exc:
            if self.cluster is None:
                raise
            name, m = self.cluster.decode_own_rank(request.job_id, request.rank,
                                                   request.version or self.store.committed_version(request.job_id),
                                                   exc)
        return pb.OpenShardResponse(segment_name=name, manifest=m)

    @_stream_rpc
    def FetchShard(self, request, context):
        self._job_access(context, request.job_id)
        t0 = time.monotonic()
        ranged = bool(request.offset or request.length)
        if ranged and self.cluster is not None and not self.store.holds_rank(request.job_id, request.rank):
            # Another node's rank: its covering blocks from its node, or decoded from the
            # stripes holding them when that node is lost (never the whole shard).
            got = self.cluster.read_range(request.job_id, request.rank, request.version,
                                          request.offset, request.length)
            try:
                yield pb.FetchShardChunk(manifest=got.manifest)
                for off in range(0, got.nbytes, STREAM_CHUNK_BYTES):
                    yield pb.FetchShardChunk(data=bytes(got.buf[off:min(off + STREAM_CHUNK_BYTES, got.nbytes)]))
            finally:
                got.release()
            if self.metrics is not None:
                self.metrics.restore_served("fetch", time.monotonic() - t0)
            return
        _, m, seg = self.store.committed_shard(request.job_id, request.rank, request.version,
                                               verify=not ranged)
        lo, hi = 0, m.payload_bytes
        if ranged:  # only the covering blocks: verified here, sent from the first one's start
            b0, b1 = mf.covering_blocks(m, request.offset, request.length)
            lo, hi = b0 * m.block_size_bytes, min(b1 * m.block_size_bytes, m.payload_bytes)
            if not self.store.unsafe_skip_verify:
                mf.verify_blocks(seg.buf[lo:hi], m, b0, f"segment of job {m.job_id!r} rank {m.rank}")
        yield pb.FetchShardChunk(manifest=m)
        for off in range(lo, hi, STREAM_CHUNK_BYTES):
            end = min(off + STREAM_CHUNK_BYTES, hi)
            yield pb.FetchShardChunk(data=seg.buf[off:end])
        if self.metrics is not None:
            self.metrics.restore_served("fetch", time.monotonic() - t0)

    @_rpc
    def Stats(self, request, context):
        s = self.store.stats()
        return pb.StatsResponse(
            node_id=s["node_id"], memory_budget_bytes=s["memory_budget_bytes"],
            bytes_reserved=s["bytes_reserved"], bytes_committed=s["bytes_committed"],
            jobs=[pb.JobStats(**j) for j in s["jobs"]],
            requests_refused=s["requests_refused"], pid=os.getpid(),
            cluster_json=json.dumps(self._cluster_status()) if self.cluster is not None else "")

    def _cluster_status(self) -> dict:
        st = self.cluster.status()
        if self.metrics is not None:
            st["redundancy"] = self.metrics.redundancy()
        return st

    def drop_job_extras(self, job_id: str) -> int:
        """What dropping a job frees besides the store: the cluster's parity and records,
        the job-token binding. Returns bytes freed."""
        freed = self.cluster.drop_job(job_id) if self.cluster is not None else 0
        if self.job_tokens is not None:
            self.job_tokens.unbind(job_id)
        return freed

    @_rpc
    def DropJob(self, request, context):
        self._job_access(context, request.job_id)
        freed = self.jobs.drop(request.job_id, force=not request.refuse_if_in_use)
        return pb.DropJobResponse(bytes_freed=freed)

    @_rpc
    def ListJobs(self, request, context):
        # Like Stats, the list is for whoever may talk to the daemon (socket owner or
        # token holder); job tokens guard a job's snapshots, not its name.
        if request.job_id:
            infos = [self.jobs.show(request.job_id)]
        else:
            infos = self.jobs.list()
        return pb.ListJobsResponse(jobs=[_job_info(i) for i in infos], job_ttl_s=self.jobs.ttl_s,
                                   active_s=self.jobs.active_s)

    @_rpc
    def CollectJobs(self, request, context):
        older = request.older_than_s if request.HasField("older_than_s") else None
        dropped, freed = self.jobs.collect(older, request.dry_run)
        return pb.CollectJobsResponse(dropped=[_job_info(i) for i in dropped], bytes_freed=freed)
