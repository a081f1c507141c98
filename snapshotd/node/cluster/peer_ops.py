"""The cluster's side of the peer plane: the requests it sends, and the table that serves them.

The ops, their fields and their replies are listed once, in the docstring of
:mod:`snapshotd.node.peer` (schema: proto/peer.proto; required fields and other checks:
:mod:`snapshotd.node.peer.checks`). The parts of the cluster build ``PeerRequest``
messages with the functions below and read replies as ``PeerReply`` messages; the peer
server calls :meth:`PeerOps.handle`, which maps the request's op
(``request.WhichOneof("op")``) to one handler (a dict, not an if-chain) taking that
op's message and calling a part with plain arguments.

A block travels with its stored checksum (the request's or the reply's
``payload_xxh3``): the receiver verifies it. Delta parity (:mod:`.delta`): an announce
offers a base (``delta_base``), and a contribution or forwarded row against it names it
and carries the change (or, ``unchanged``, no payload at all).

Thread-safety: :meth:`PeerOps.handle` runs in the peer server thread; every handler is
fast (queues work, or reads what is held) and idempotent. The builders are pure.
"""

from __future__ import annotations

from typing import Callable

from snapshotd.core import protocol as proto
from snapshotd.core.recovery import Shard
from snapshotd.node.peer import PeerProtocolError, RemoteError, peer_pb2 as ppb
from snapshotd.wire.errors import ChecksumMismatchError

KINDS = {"data": ppb.BLOCK_KIND_DATA, "parity": ppb.BLOCK_KIND_PARITY}
KIND_NAMES = {v: k for k, v in KINDS.items()}


# -- requests ------------------------------------------------------------------------------
def announce(job_id: str, v: int, ann: proto.Announce, delta_base: int = 0) -> tuple[ppb.PeerRequest, bytes]:
    """Our announce of v; ``delta_base``: the committed version we offer as the base of
    delta contributions (0: none; see :mod:`.delta`)."""
    sizes, blob = pack_blobs(ann.manifests)
    more = {"delta_base": delta_base} if delta_base else {}
    return ppb.PeerRequest(announce=ppb.AnnounceRequest(
        job=job_id, version=v, node=ann.node, block_count=ann.block_count, ranks=list(ann.ranks),
        manifest_sizes_bytes=sizes, **more)), blob


def _delta_fields(base: int, unchanged: bool) -> dict:
    if unchanged and not base:
        raise ValueError("an unchanged contribution is a delta: it needs its base")
    return {"delta_base": base, **({"unchanged": True} if unchanged else {})} if base else {}


def contrib(job_id: str, v: int, s: int, t: int, p: int, counts, base: int = 0,
            unchanged: bool = False) -> ppb.PeerRequest:
    """One contribution; send a whole block with its adopt-time checksum as its
    payload_xxh3. With ``base``: the block's change since committed version ``base``
    (``unchanged``: none, and no payload)."""
    return ppb.PeerRequest(contrib=ppb.ContribRequest(job=job_id, version=v, stripe=s, row=t, position=p,
                                                      block_counts=list(counts),
                                                      **_delta_fields(base, unchanged)))


# The commit tree's message kinds (snapshotd.core.protocol) as the ``vote`` op's step.
COMMIT_STEPS = {proto.VOTE: ppb.COMMIT_STEP_VOTE, proto.REPORT: ppb.COMMIT_STEP_REPORT,
                proto.WORD: ppb.COMMIT_STEP_WORD}


def parity_row(job_id: str, v: int, s: int, t: int, counts, base: int = 0,
               unchanged: bool = False) -> ppb.PeerRequest:
    """Parity row t of stripe s, forwarded by its accumulator; send it with its xxh3.
    With ``base``: the row's change since committed version ``base`` (``unchanged``: none)."""
    return ppb.PeerRequest(contrib=ppb.ContribRequest(job=job_id, version=v, stripe=s, row=t, position=0,
                                                      block_counts=list(counts), forwarded=True,
                                                      **_delta_fields(base, unchanged)))


def vote(job_id: str, v: int, ranks, kind: str = proto.VOTE) -> ppb.PeerRequest:
    """A vote (as ever: no step), a report or a commit word (``kind``) of version v."""
    step = {} if kind == proto.VOTE else {"step": COMMIT_STEPS[kind]}
    return ppb.PeerRequest(vote=ppb.VoteRequest(job=job_id, version=v, ranks=list(ranks), **step))


def ping(committed: dict) -> ppb.PeerRequest:
    return ppb.PeerRequest(ping=ppb.PingRequest(committed_versions=committed))


def round_(job_id: str, v: int) -> ppb.PeerRequest:
    return ppb.PeerRequest(round=ppb.RoundRequest(job=job_id, version=v))


def _block_at(msg, stripe: int, src: Shard):
    msg.kind = KINDS[src.kind]
    if src.kind == "data":
        msg.block_index = src.block
    else:
        msg.stripe, msg.row = stripe, src.index
    return msg


def fetch(job_id: str, v: int, stripe: int, src: Shard) -> ppb.PeerRequest:
    return ppb.PeerRequest(fetch=_block_at(ppb.FetchRequest(job=job_id, version=v), stripe, src))


def jobs() -> ppb.PeerRequest:
    return ppb.PeerRequest(jobs=ppb.JobsRequest())


def suspect(job_id: str, v: int, stripe: int, src: Shard) -> ppb.PeerRequest:
    return ppb.PeerRequest(suspect=_block_at(ppb.SuspectRequest(job=job_id, version=v), stripe, src))


def fence(job_id: str) -> ppb.PeerRequest:
    return ppb.PeerRequest(fence=ppb.FenceRequest(job=job_id))


def rank_manifest(job_id: str, v: int, rank: int) -> ppb.PeerRequest:
    return ppb.PeerRequest(rank_manifest=ppb.RankManifestRequest(job=job_id, version=v, rank=rank))


def rank_block(job_id: str, v: int, rank: int, j: int) -> ppb.PeerRequest:
    return ppb.PeerRequest(rank_block=ppb.RankBlockRequest(job=job_id, version=v, rank=rank, block_index=j))


# -- replies -------------------------------------------------------------------------------
def ack() -> ppb.PeerReply:
    return ppb.PeerReply(ack=ppb.Ack())


def is_corrupt_reply(exc: BaseException) -> bool:
    """The fetch failed because the block is corrupt at its holder: the payload failed its
    xxh3 on arrival, or the holder's own check refused it (a rank's padded last block)."""
    if isinstance(exc, PeerProtocolError):
        return "xxh3 mismatch" in str(exc)
    return isinstance(exc, RemoteError) and exc.is_a(ChecksumMismatchError) \
        and "corrupt" in str(exc)


def pack_blobs(blobs) -> tuple[list[int], bytes]:
    return [len(b) for b in blobs], b"".join(blobs)


def unpack_blobs(sizes, payload) -> list[bytes]:
    data = bytes(payload) if payload is not None else b""
    if sum(sizes) != len(data):
        raise ValueError(f"blob sizes {sum(sizes)} != payload {len(data)}")
    out, off = [], 0
    for n in sizes:
        out.append(data[off:off + n])
        off += n
    return out


# -- serving ---------------------------------------------------------------------------------
class PeerOps:
    """The peer server's handler: op -> the part that serves it."""

    def __init__(self, *, me: str, n: int, block_size_bytes: int, store, jobs_table, membership, commit,
                 parity, records, suspects, rebuilder, fence_job: Callable[[str], None],
                 bounded_counts: Callable, forwarder=None, delta=None):
        self.me, self.n, self.bs = me, n, block_size_bytes
        self.store, self.jobs_table, self.membership = store, jobs_table, membership
        self.commit, self.parity, self.records = commit, parity, records
        self.suspects, self.rebuilder = suspects, rebuilder
        self.fence_job, self.bounded_counts = fence_job, bounded_counts
        self.forwarder = forwarder  # .forward.Forwarder: stores the rows accumulators forward
        self.delta = delta  # .delta.DeltaParity: the bases members offer with their announces
        self.table: dict[str, Callable] = {
            "ping": self._ping, "contrib": self._contrib, "announce": self._announce,
            "vote": self._vote, "fence": self._fence, "jobs": self._jobs, "round": self._round,
            "fetch": self._fetch, "suspect": self._suspect, "rank_manifest": self._rank_manifest,
            "rank_block": self._rank_block,
        }

    def handle(self, sender: str, request: ppb.PeerRequest, payload):
        """The server's handler: ``(reply, payload[, payload_xxh3])`` for ``request``."""
        self.membership.seen(sender)
        op = request.WhichOneof("op") if isinstance(request, ppb.PeerRequest) else None
        fn = self.table.get(op) if op is not None else None
        if fn is None:
            raise ValueError(f"unknown op {op!r}")
        return fn(sender, getattr(request, op), payload)

    def _ping(self, sender, msg: ppb.PingRequest, payload):
        self.membership.gossip(sender, dict(msg.committed_versions))
        return ppb.PeerReply(ping=ppb.PingReply(committed_versions=self.jobs_table.committed_versions())), None

    def _contrib(self, sender, msg: ppb.ContribRequest, payload):
        counts = self.bounded_counts(list(msg.block_counts))
        base = msg.delta_base
        if base and (self.delta is None or base >= msg.version):
            raise ValueError(f"delta contribution against v{base} not accepted for v{msg.version} here")
        if msg.unchanged:  # delta parity: the change is zero, said explicitly
            if not base or (payload is not None and len(payload)):
                raise ValueError("an unchanged contribution needs a delta_base and carries no payload")
            payload = None
        elif payload is None or len(payload) != self.bs:
            raise ValueError(f"contribution must carry exactly {self.bs} bytes")
        if msg.forwarded:  # a parity row from the stripe's accumulator (issue 16)
            if self.forwarder is None:
                raise ValueError("forwarded parity rows are not accepted here")
            self.forwarder.receive_row(msg.job, msg.version, msg.stripe, msg.row, counts, payload, base=base)
            return ack(), None
        self.commit.accumulate(msg.job, msg.version, msg.stripe, msg.row, msg.position, counts, payload,
                               base=base)
        return ack(), None

    def _announce(self, sender, msg: ppb.AnnounceRequest, payload):
        self.bounded_counts([msg.block_count] * self.n)
        ann = proto.Announce(msg.node, msg.block_count, tuple(msg.ranks),
                             tuple(unpack_blobs(list(msg.manifest_sizes_bytes), payload)))
        if self.delta is not None:  # before the protocol sees it: it may start our contributions
            self.delta.announced(msg.job, msg.version, msg.node, msg.delta_base)
        self.commit.on_announce(msg.job, msg.version, ann)
        return ack(), None

    def _vote(self, sender, msg: ppb.VoteRequest, payload):
        kind = next((k for k, st in COMMIT_STEPS.items() if st == msg.step), None)
        if kind is None:
            raise ValueError(f"unknown commit step {msg.step}")
        self.commit.on_vote(msg.job, msg.version, sender, list(msg.ranks), kind)
        return ack(), None

    def _fence(self, sender, msg: ppb.FenceRequest, payload):  # inline: when the restarting trainer's
        self.fence_job(msg.job)  # restore returns, every node has dropped the old run's rounds
        return ack(), None

    def _jobs(self, sender, msg: ppb.JobsRequest, payload):
        rep = ppb.PeerReply(jobs=ppb.JobsReply())
        for job_id, s in self.store.jobs_summary().items():
            rep.jobs.jobs[job_id].CopyFrom(ppb.JobSummary(
                committed_version=s["committed"], world_size=s["world_size"],
                local_world_size=s["local_world_size"]))
        return rep, None

    def _round(self, sender, msg: ppb.RoundRequest, payload):
        record = self.records.round_record(msg.job, msg.version).SerializeToString()
        return ppb.PeerReply(round=ppb.RoundReply(record_bytes=len(record))), record

    def _fetch(self, sender, msg: ppb.FetchRequest, payload):
        if msg.kind == ppb.BLOCK_KIND_DATA:
            data, known = self.store.block_reader(msg.job, msg.version, self.bs,
                                                  with_checksum=True)(msg.block_index)
            return ack(), data, known  # the stored checksum: the receiver verifies it
        # The stored checksum travels as the payload's xxh3: a corrupt block is refused
        # by the receiver (and never decoded), without hashing it twice here.
        view, want = self.parity.sealed_block(msg.job, msg.version, msg.stripe, msg.row, self.me)
        return ack(), view, want

    def _suspect(self, sender, msg: ppb.SuspectRequest, payload):
        kind = KIND_NAMES.get(msg.kind)
        if kind == "data":
            where = {"j": msg.block_index}
        elif kind == "parity":
            where = {"stripe": msg.stripe, "row": msg.row}
        else:
            raise ValueError(f"suspect: kind must be data or parity, got {msg.kind!r}")
        self.suspects.queue_suspect({"job": msg.job, "v": msg.version, "kind": kind, **where})
        return ack(), None

    def _rank_manifest(self, sender, msg: ppb.RankManifestRequest, payload):
        _, m, _ = self.rebuilder.local_rank(msg.job, msg.version, msg.rank)
        return ack(), m.SerializeToString()

    def _rank_block(self, sender, msg: ppb.RankBlockRequest, payload):
        _, m, seg = self.rebuilder.local_rank(msg.job, msg.version, msg.rank)
        j, bs = msg.block_index, m.block_size_bytes
        if not 0 <= j * bs < m.payload_bytes:
            raise ValueError(f"rank {m.rank} has no block {j}")
        mv = memoryview(seg.buf)[j * bs:min((j + 1) * bs, m.payload_bytes)]
        if self.store.unsafe_skip_verify:  # test-only broken build (store.py): unchecked
            return ack(), mv
        # The stored checksum is sent as the payload's: the receiver verifies it.
        return ack(), mv, m.block_checksums[j]
