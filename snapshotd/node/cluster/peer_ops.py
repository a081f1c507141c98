"""The peer operations' schema: every request header we send, and the table that serves them.

All peer-op encoding lives here (and the transport in :mod:`snapshotd.node.peer`), so
that the headers can move from JSON dicts to protobuf messages by editing this module
alone. The parts of the cluster build requests with the functions below and are served
through :class:`PeerOps`, one handler per op (a dict, not an if-chain); each handler
decodes its header and calls a part with plain arguments.

Peer operations (header "op"):
  announce       {job, v, node, block_count, ranks, sizes} + packed manifests -> ack
  contrib        {job, v, s, t, p, counts} + one block                      -> ack (idempotent)
  vote           {job, v, ranks}                                            -> ack
  ping           {committed: {job: v}}                       -> {committed: {...}}
  round          {job, v}          -> {size} + the JSON round record of a retained version
  fetch          {job, v, kind: data, j} | {job, v, kind: parity, s, t}     -> the block
  jobs           {}                -> {jobs: {job: {committed, world_size, ...}}}
  suspect        {job, v, kind, j|s,t}  -> ack; a fetcher found that block of ours corrupt
  fence          {job}             -> ack; drop the job's uncommitted rounds
  rank_manifest  {job, v, rank}    -> the rank's ShardManifest
  rank_block     {job, v, rank, j} -> block j of the rank's payload

A block travels with its stored checksum (``KNOWN_XXH3``): the receiver verifies it.

Thread-safety: :meth:`PeerOps.handle` runs in the peer server thread; every handler is
fast (queues work, or reads what is held) and idempotent.
"""

from __future__ import annotations

from typing import Callable

from snapshotd.core import protocol as proto
from snapshotd.core.recovery import Shard
from snapshotd.wire.errors import ChecksumMismatchError
from snapshotd.node.peer import KNOWN_XXH3, PeerProtocolError, RemoteError

OK = {"ok": True}


# -- requests ------------------------------------------------------------------------------
def announce(job_id: str, v: int, ann: proto.Announce) -> tuple[dict, bytes]:
    sizes, blob = pack_blobs(ann.manifests)
    return {"op": "announce", "job": job_id, "v": v, "node": ann.node,
            "block_count": ann.block_count, "ranks": list(ann.ranks), "sizes": sizes}, blob


def contrib(job_id: str, v: int, s: int, t: int, p: int, counts, known: int | None) -> dict:
    hdr = {"op": "contrib", "job": job_id, "v": v, "s": s, "t": t, "p": p, "counts": list(counts)}
    if known is not None:  # the adopt-time checksum; the holder verifies it
        hdr[KNOWN_XXH3] = known
    return hdr


def vote(job_id: str, v: int, ranks) -> dict:
    return {"op": "vote", "job": job_id, "v": v, "ranks": list(ranks)}


def ping(committed: dict) -> dict:
    return {"op": "ping", "committed": committed}


def round_(job_id: str, v: int) -> dict:
    return {"op": "round", "job": job_id, "v": v}


def fetch(job_id: str, v: int, stripe: int, src: Shard) -> dict:
    hdr = {"op": "fetch", "job": job_id, "v": v, "kind": src.kind}
    if src.kind == "data":
        hdr["j"] = src.block
    else:
        hdr["s"], hdr["t"] = stripe, src.index
    return hdr


def jobs() -> dict:
    return {"op": "jobs"}


def suspect(job_id: str, v: int, stripe: int, src: Shard) -> dict:
    hdr = {"op": "suspect", "job": job_id, "v": v, "kind": src.kind}
    hdr.update({"j": src.block} if src.kind == "data" else {"s": stripe, "t": src.index})
    return hdr


def fence(job_id: str) -> dict:
    return {"op": "fence", "job": job_id}


def rank_manifest(job_id: str, v: int, rank: int) -> dict:
    return {"op": "rank_manifest", "job": job_id, "v": v, "rank": rank}


def rank_block(job_id: str, v: int, rank: int, j: int) -> dict:
    return {"op": "rank_block", "job": job_id, "v": v, "rank": rank, "j": j}


# -- replies -------------------------------------------------------------------------------
def jobs_of(reply) -> dict:
    """{job: {"committed": v, ...}} from a ``jobs`` reply."""
    return reply[0].get("jobs", {})


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
                 bounded_counts: Callable):
        self.me, self.n, self.bs = me, n, block_size_bytes
        self.store, self.jobs_table, self.membership = store, jobs_table, membership
        self.commit, self.parity, self.records = commit, parity, records
        self.suspects, self.rebuilder = suspects, rebuilder
        self.fence_job, self.bounded_counts = fence_job, bounded_counts
        self.table: dict[str, Callable] = {
            "ping": self._ping, "contrib": self._contrib, "announce": self._announce,
            "vote": self._vote, "fence": self._fence, "jobs": self._jobs, "round": self._round,
            "fetch": self._fetch, "suspect": self._suspect, "rank_manifest": self._rank_manifest,
            "rank_block": self._rank_block,
        }

    def handle(self, sender: str, h: dict, payload):
        self.membership.seen(sender)
        op = h.get("op")
        fn = self.table.get(op) if isinstance(op, str) else None
        if fn is None:
            raise ValueError(f"unknown op {op!r}")
        return fn(sender, h, payload)

    def _ping(self, sender, h, payload):
        self.membership.gossip(sender, h.get("committed", {}))
        return {"committed": self.jobs_table.committed_versions()}, None

    def _contrib(self, sender, h, payload):
        counts = self.bounded_counts(h.get("counts"))
        if payload is None or len(payload) != self.bs:
            raise ValueError(f"contribution must carry exactly {self.bs} bytes")
        self.commit.accumulate(h["job"], h["v"], h["s"], h["t"], h["p"], counts, payload)
        return OK, None

    def _announce(self, sender, h, payload):
        self.bounded_counts([h["block_count"]] * self.n)
        ann = proto.Announce(h["node"], int(h["block_count"]), tuple(h["ranks"]),
                             tuple(unpack_blobs(h["sizes"], payload)))
        self.commit.on_announce(h["job"], int(h["v"]), ann)
        return OK, None

    def _vote(self, sender, h, payload):
        self.commit.on_vote(h["job"], int(h["v"]), sender, h["ranks"])
        return OK, None

    def _fence(self, sender, h, payload):  # inline: when the restarting trainer's restore
        self.fence_job(h["job"])  # returns, every node has dropped the old run's rounds
        return OK, None

    def _jobs(self, sender, h, payload):
        return {"jobs": self.store.jobs_summary()}, None

    def _round(self, sender, h, payload):
        info = self.records.round_info(h["job"], int(h["v"]))
        return {"size": len(info)}, info

    def _fetch(self, sender, h, payload):
        job_id, v, kind = h["job"], int(h["v"]), h["kind"]
        if kind == "data":
            data, known = self.store.block_reader(job_id, v, self.bs, with_checksum=True)(int(h["j"]))
            hdr = {"ok": True}
            if known is not None:
                hdr[KNOWN_XXH3] = known  # the stored checksum: the receiver verifies it
            return hdr, data
        # The stored checksum travels as the payload's xxh3: a corrupt block is refused
        # by the receiver (and never decoded), without hashing it twice here.
        view, want = self.parity.sealed_block(job_id, v, int(h["s"]), int(h["t"]), self.me)
        return {"ok": True, KNOWN_XXH3: want}, view

    def _suspect(self, sender, h, payload):
        kind = h.get("kind")
        if kind == "data":
            where = {"j": int(h["j"])}
        elif kind == "parity":
            where = {"stripe": int(h["s"]), "row": int(h["t"])}
        else:
            raise ValueError(f"suspect: kind must be data or parity, got {kind!r}")
        self.suspects.queue_suspect({"job": str(h["job"]), "v": int(h["v"]), "kind": kind, **where})
        return OK, None

    def _rank_manifest(self, sender, h, payload):
        _, m, _ = self.rebuilder.local_rank(h["job"], int(h["v"]), int(h["rank"]))
        return {"ok": True}, m.SerializeToString()

    def _rank_block(self, sender, h, payload):
        _, m, seg = self.rebuilder.local_rank(h["job"], int(h["v"]), int(h["rank"]))
        j, bs = int(h["j"]), m.block_size_bytes
        if not 0 <= j * bs < m.payload_bytes:
            raise ValueError(f"rank {m.rank} has no block {j}")
        mv = memoryview(seg.buf)[j * bs:min((j + 1) * bs, m.payload_bytes)]
        if self.store.unsafe_skip_verify:  # test-only broken build (store.py): unchecked
            return {"ok": True}, mv
        # The stored checksum is sent as the payload's: the receiver verifies it.
        return {"ok": True, KNOWN_XXH3: m.block_checksums[j]}, mv
