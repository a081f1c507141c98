"""Fuzz target for every gRPC request handler of the daemon (issue 18).

The real ``SnapshotdServicer`` runs in-process over a real ``ShardStore`` (real shm on a
private prefix, real state dir) and real ``JobTokens``; only the gRPC context is fake
(:class:`FakeContext` records the abort code and the error-code trailer, and raises as
grpc's does). An input is a flags byte and length-prefixed parts
(:func:`fuzz_targets.split_parts`): flags choose the RPC and the job token sent; each part
is one request message (only PushShard takes more than one).

The contract checked on every input:

* the handler returns its response type, or aborts with a documented status
  (:data:`REFUSAL_CODES`: never INTERNAL or UNKNOWN) whose trailer names the error class;
  no other exception escapes;
* a refused request leaves the store as it was (:func:`store_state`: stats, every job's
  versions, the shm segments, the durable index and the job-token file; see
  :func:`same_state` for what is not counted). A refused PushShard too: since issue 18
  a push is received and verified before it takes a staging slot
  (:func:`staging_problems` lists what the older contract forbade);
* bodies that do not parse never reach the servicer (``RequestParseGuard``); a part of a
  PushShard stream that does not parse is raised into the stream as
  ``MalformedRequestError``, as the guard does.

The store starts each input from one baseline (:func:`_baseline`): job ``fz`` (2 ranks,
version 1 committed, version 2 delivered by rank 0, rank 1 staging version 2) and job
``sec`` bound to a job token. A request that changed it rebuilds the baseline. Segment
names in inputs may start with ``{prefix}``, which becomes the store's prefix.
"""

from __future__ import annotations

import atexit
import functools
import glob
import json
import logging
import os
import shutil
import tempfile

import grpc

from fuzz_targets import split_parts

RPCS = ("RegisterJob", "AcquireStaging", "AdoptShard", "PushShard", "Commit", "ListVersions",
        "OpenShard", "FetchShard", "Stats", "DropJob")


def _refusal_codes() -> frozenset:
    """The statuses of the error table (snapshotd/wire/errors.py), less INTERNAL and UNKNOWN."""
    from snapshotd.wire.errors import ERROR_CLASSES

    codes = {grpc.StatusCode[c.grpc_code_name] for c in ERROR_CLASSES.values()}
    return frozenset(codes - {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


REFUSAL_CODES = _refusal_codes()
JOB_TOKEN = "tok-sec"
BS = 4096
PREFIX_MARK = "{prefix}"


class Aborted(Exception):
    """What grpc's ``context.abort`` raises (an Exception the server catches)."""


class FakeContext:
    def __init__(self, metadata=()):
        self.metadata = tuple(metadata)
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers = ()

    def invocation_metadata(self):
        return self.metadata

    def set_trailing_metadata(self, md):
        self.trailers = tuple(md)

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(code, details)


class Harness:
    """The servicer over a store on a private prefix, reset to the baseline on demand."""

    def __init__(self):
        from snapshotd.node.auth import JobTokens
        from snapshotd.node.service import SnapshotdServicer
        from snapshotd.node.store import ShardStore
        from snapshotd.wire import shm
        from snapshotd.wire._proto import snapshotd_pb2 as pb

        self.pb, self.shm = pb, shm
        self._ShardStore, self._JobTokens, self._Servicer = ShardStore, JobTokens, SnapshotdServicer
        self.instance = f"fz{os.getpid()}"
        # the state dir on tmpfs: the store fsyncs its index at every change
        tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = tempfile.mkdtemp(prefix=f"snapshotd-fuzz-{os.getpid()}-", dir=tmp)
        self.store = None
        self.first_push = None
        self.resets = 0
        self.reset()
        atexit.register(self.close)

    def reset(self) -> None:
        from snapshotd.wire.limits import JOB_TOKEN_METADATA_KEY

        if self.store is not None:
            self.store.close()
        prefix = f"snapshotd.{self.instance}."
        for name in self.shm.list_segments(prefix):
            self.shm.unlink(name)
        state_dir = os.path.join(self.root, "state")
        shutil.rmtree(state_dir, ignore_errors=True)
        os.makedirs(state_dir)
        self.store = self._ShardStore("n0", state_dir, 8 << 20, instance=self.instance)
        self.tokens = self._JobTokens(state_dir)
        self.servicer = self._Servicer(self.store, job_tokens=self.tokens)
        _baseline(self, JOB_TOKEN_METADATA_KEY)
        self.baseline = store_state(self)
        self.resets += 1

    def close(self) -> None:
        if self.store is None:
            return
        self.store.close()
        self.store = None
        for name in self.shm.list_segments(f"snapshotd.{self.instance}."):
            self.shm.unlink(name)
        shutil.rmtree(self.root, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def payload_of(rank: int, version: int) -> bytes:
    """The bytes the baseline (and the seeds) deliver for ``rank`` at ``version``."""
    return bytes((rank * 31 + version * 7 + i) % 251 for i in range(2 * BS + 100 + rank))


def _deliver(h: Harness, job: str, rank: int, version: int, adopt: bool = True, md=()):
    pb = h.pb
    data = payload_of(rank, version)
    name, _ = _acquire(h, job, rank, version, len(data), md)
    seg = h.shm.open_segment(name, writable=True)
    seg.buf[:len(data)] = data
    seg.close()
    if adopt:
        m = pb.ShardManifest(job_id=job, rank=rank, version=version, payload_bytes=len(data),
                             block_size_bytes=BS, checksum_algo="xxh3_64")
        h.servicer.AdoptShard(pb.AdoptShardRequest(segment_name=name, manifest=m), FakeContext(md))
    return name


def _acquire(h: Harness, job, rank, version, n, md):
    r = h.servicer.AcquireStaging(h.pb.AcquireStagingRequest(
        job_id=job, rank=rank, version=version, payload_bytes=n), FakeContext(md))
    return r.segment_name, r.segment_bytes


def _baseline(h: Harness, token_key: str) -> None:
    pb = h.pb
    h.servicer.RegisterJob(pb.RegisterJobRequest(job_id="fz", world_size=2), FakeContext())
    for rank in (0, 1):
        _deliver(h, "fz", rank, 1)
    _deliver(h, "fz", 0, 2)
    h.staged = _deliver(h, "fz", 1, 2, adopt=False)
    md = ((token_key, JOB_TOKEN),)
    h.servicer.RegisterJob(pb.RegisterJobRequest(job_id="sec", world_size=1), FakeContext(md))
    _deliver(h, "sec", 0, 1, md=md)


def store_state(h: Harness) -> tuple:
    """Everything a request could change (compare with :func:`same_state`)."""
    s = dict(h.store.stats())
    s.pop("requests_refused", None)  # counting refusals is what a refusal should do
    jobs = h.store.jobs_summary()
    versions = {j: h.store.list_versions(j) for j in sorted(jobs)}
    files = {}
    for f in sorted(os.listdir(h.store.state_dir)):
        p = os.path.join(h.store.state_dir, f)
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                files[f] = fh.read()
    from snapshotd.node.docfile import DocFile, read_doc

    for slot in DocFile(os.path.join(h.store.state_dir, "index.json")).slots:  # the index's two
        files.pop(os.path.basename(slot), None)  # slot files hold one document (node.docfile)
    doc = read_doc(os.path.join(h.store.state_dir, "index.json"))
    if doc is not None:
        files["index.json"] = json.dumps(doc).encode()
    return s, jobs, versions, tuple(h.shm.list_segments(h.store.prefix)), files


def _norm(state: tuple, strict: bool = False) -> tuple:
    files = dict(state[4])
    if "index.json" in files:
        doc = json.loads(files["index.json"])
        for job in doc.get("jobs", {}).values():
            job.pop("last_activity", None)
            if not strict:
                for r, slots in job.get("slots", {}).items():
                    job["slots"][r] = [s for s in slots if not (s[0] == 0 and s[1] == "free")]
        files["index.json"] = doc
    return state[:4] + (files,)


def same_state(a: tuple, b: tuple, strict: bool = False) -> list[int]:
    """The parts (indexes into :func:`store_state`) that differ, ignoring the jobs'
    activity clock (``last_activity``: a request was seen) and, unless ``strict``, empty
    free ledger slots (0 bytes, no segment: they hold nothing)."""
    a, b = _norm(a, strict), _norm(b, strict)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def staging_problems(before: tuple, after: tuple, m) -> list[str]:
    """What a refused PushShard must not have done, once its manifest was valid.

    Such a push is a staging request (the store acquires a slot, then streams into it):
    the ledger has one trainer per rank, so it supersedes the rank's earlier staging
    and the versions the rank thereby moved past can never commit (``core/ledger.py``,
    ``acquire``); a refused payload does not undo that, by design. What it must not do:
    leave its own staging slot, make a segment, or touch anything committed."""
    out = []
    if not set(after[3]) <= set(before[3]):
        out.append(f"new segments {sorted(set(after[3]) - set(before[3]))}")
    if after[0]["bytes_committed"] != before[0]["bytes_committed"]:
        out.append("bytes_committed changed")
    if after[0]["bytes_reserved"] > before[0]["bytes_reserved"]:
        out.append("more bytes reserved")
    for job, (latest, versions) in before[2].items():
        now = after[2].get(job)
        if now is None or now[0] != latest or [v for v in now[1] if v[1]] != [v for v in versions if v[1]]:
            out.append(f"job {job!r}: committed versions changed: {versions} -> {now}")
    index = json.loads(after[4].get("index.json", b"{}"))
    slots = index.get("jobs", {}).get(m.job_id, {}).get("slots", {}).get(str(m.rank), [])
    if any(s[1] == "staging" and s[2] == m.version for s in slots):
        out.append(f"left a staging slot for version {m.version}")
    return out


def _first_diff(a: tuple, b: tuple) -> str:
    a, b = _norm(a, True), _norm(b, True)
    for x, y in zip(a, b):
        if x != y:
            return f"{str(y)[:1500]} -> {str(x)[:1500]}"
    return ""


_h: list[Harness] = []


def cleanup(pid: int) -> None:
    """Remove what fuzzing process ``pid`` left behind: libFuzzer ends a run (a crash,
    -max_total_time) without Python's atexit, so the parent cleans up."""
    from snapshotd.wire import shm

    for name in shm.list_segments(f"snapshotd.fz{pid}."):
        shm.unlink(name)
    for d in glob.glob(os.path.join("/dev/shm", f"snapshotd-fuzz-{pid}-*")) + glob.glob(
            os.path.join(tempfile.gettempdir(), f"snapshotd-fuzz-{pid}-*")):
        shutil.rmtree(d, ignore_errors=True)


def harness() -> Harness:
    if not _h:
        logging.disable(logging.CRITICAL)
        _h.append(Harness())
    return _h[0]


def _requests(h: Harness, rpc: str, parts: list[bytes]):
    """The request (or, for PushShard, the iterator of requests) of ``parts``;
    None when a unary body would not parse (the guard refuses it before the servicer)."""
    from google.protobuf.message import DecodeError

    from snapshotd.wire.errors import MalformedRequestError

    pb = h.pb
    cls = {"RegisterJob": pb.RegisterJobRequest, "AcquireStaging": pb.AcquireStagingRequest,
           "AdoptShard": pb.AdoptShardRequest, "PushShard": pb.PushShardChunk,
           "Commit": pb.CommitRequest, "ListVersions": pb.ListVersionsRequest,
           "OpenShard": pb.FetchShardRequest, "FetchShard": pb.FetchShardRequest,
           "Stats": pb.StatsRequest, "DropJob": pb.DropJobRequest}[rpc]

    def parse(raw: bytes):
        msg = cls()
        msg.ParseFromString(raw)
        if rpc == "AdoptShard" and msg.segment_name.startswith(PREFIX_MARK):
            msg.segment_name = h.store.prefix + msg.segment_name[len(PREFIX_MARK):]
        return msg

    if rpc != "PushShard":
        try:
            return parse(parts[0] if parts else b"")
        except DecodeError:
            return None

    def stream():
        h.first_push = None
        for i, raw in enumerate(parts):
            try:
                msg = parse(raw)
            except DecodeError as exc:
                raise MalformedRequestError(f"PushShard: a message does not parse: {exc}") from None
            if i == 0 and msg.HasField("manifest"):
                h.first_push = msg.manifest
            yield msg

    return stream()


def service(data: bytes) -> None:
    """flags: bits 0-3 the RPC (mod 10), bit 4 send job token ``tok-sec``, bit 5 send a
    wrong job token; parts: the request message(s)."""
    from snapshotd.wire.errors import ERROR_CLASSES
    from snapshotd.wire.limits import ERROR_METADATA_KEY, JOB_TOKEN_METADATA_KEY

    h = harness()
    flags, parts = split_parts(data)
    rpc = RPCS[(flags & 15) % len(RPCS)]
    md = []
    if flags & 16:
        md.append((JOB_TOKEN_METADATA_KEY, JOB_TOKEN))
    if flags & 32:
        md.append((JOB_TOKEN_METADATA_KEY, "not-" + JOB_TOKEN))
    request = _requests(h, rpc, parts)
    if request is None:
        return
    ctx = FakeContext(md)
    method = getattr(h.servicer, rpc)
    try:
        out = method(request, ctx)
        if rpc == "FetchShard":
            out = list(out)
    except Aborted:
        assert ctx.code in REFUSAL_CODES, f"{rpc} aborted with {ctx.code}: {ctx.details}"
        code = dict(ctx.trailers).get(ERROR_METADATA_KEY)  # the class the client will raise
        assert code is None or (code in ERROR_CLASSES and
                                ERROR_CLASSES[code].grpc_code_name == ctx.code.name), (code, ctx.code)
        after = store_state(h)
        problems = same_state(after, h.baseline)  # a refused PushShard too (issue 18)
        if problems:
            detail = _first_diff(after, h.baseline)
            h.reset()
            raise AssertionError(f"{rpc} was refused ({ctx.code}: {ctx.details}) but changed "
                                 f"the store ({problems}): {detail}")
        if same_state(after, h.baseline, strict=True):
            h.reset()  # a forgiven change: the next input starts from the baseline all the same
        return
    expected = {"FetchShard": list, "PushShard": h.pb.AdoptShardResponse,
                "AdoptShard": h.pb.AdoptShardResponse, "OpenShard": h.pb.OpenShardResponse,
                "ListVersions": h.pb.ListVersionsResponse}.get(rpc) or getattr(h.pb, rpc + "Response")
    assert isinstance(out, expected), (rpc, type(out))
    if same_state(store_state(h), h.baseline, strict=True):
        h.reset()


def _valid(m) -> bool:
    from snapshotd.wire import manifest as mf
    from snapshotd.wire.errors import InvalidRequestError

    if m is None:
        return False
    try:
        mf.validate_manifest(m, require_checksums=True)
    except InvalidRequestError:
        return False
    return True


TARGETS = {"service": service}
