"""Round records: what a node keeps of a committed version to rebuild a peer or itself.

A round record (``RoundRecord`` in proto/peer.proto) is the layout's block counts, the
job's world size, the rank -> node map and every group member's announce (ranks and
manifests). :class:`RoundRecords` serves it to peers (peer op ``round``: the serialised
message is the reply's payload), asks peers for it (:meth:`retained_round`, the sources
of a rebuild or a degraded read; :meth:`fetch_record`), saves it at each commit and loads
it after a restart (:meth:`load`), installing the round into the job's protocol state.

A record from the network is checked whole before anything reads it
(:meth:`parse_record`: it parses, names the job and version asked for, has no field the
schema lacks, and its block counts are bounded as the ``contrib`` and ``announce`` ops'
are, :meth:`bounded_counts`); one that fails is refused (``ValueError`` naming what is
wrong), never half-installed. Manifests stay the bytes their node announced: the readers
parse and check them (rebuild, degraded reads), as before.

On disk (this version) the record is the message itself: one file per job under the
store's state directory, ``cluster/<job>.rec``, kept in two slot files ``<job>.rec.a``/``.b``
by :class:`~snapshotd.node.docfile.DocFile` (one write per commit, never torn), whose
document is one line of JSON (``format``, ``v`` and our parity buffer's ``parity`` index
and checksums) and then the ``RoundRecord``'s bytes (:func:`encode_record_file`). Earlier
versions wrote a JSON document with every manifest in base64 (``cluster/<job>.json``, the
keys ``v``, ``counts``, ``world_size``, ``rank_nodes``, ``announces``, ``parity``); at
every commit that cost more CPU than anything else the daemon does for a save (issue 16).
Such a file is still read (:func:`record_from_json`): a daemon restarted over a state
directory of an earlier version re-adopts its commit and parity, takes whichever of the two
files holds the newer version, and removes the old one after its first save. A daemon of
an earlier version ignores the ``.rec`` files (it finds no record: it keeps the committed
shards the index names, and releases the parity segment, so the committed version is
without parity until the next commit). Operators read a record as the JSON document it
was with ``python -m snapshotd.node.cluster.records STATE_DIR JOB`` (:func:`read_record`).

A node without peers (one node, m = 0: ``peerless``) keeps no record file: nobody asks it
for a round, and its one round per commit (its own announce: the local ranks' manifests
and their block count) is what the store persists anyway, in the index and the manifest
files, before the commit is acknowledged; :meth:`RoundRecords.load` derives it from the
store's committed shards (:meth:`_derive`) as the commit made it (issue 16: the file was
~40 us of CPU per save there).

Thread-safety: :meth:`save` and :meth:`install_round` run under ``JobTable.lock`` (they
take it themselves; callers may hold it). :meth:`load` runs once, before the threads start.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import sys

from google.protobuf.message import DecodeError

from snapshotd.core import placement as pl
from snapshotd.core import protocol as proto
from snapshotd.core.blockmap import map_manifests
from snapshotd.core.repair import block_count_limit, check_block_counts
from snapshotd.node.docfile import DocFile
from snapshotd.node.peer import PeerUnavailableError, RemoteError, peer_pb2 as ppb

from . import peer_ops
from .jobs import JobTable
from .parity import ParityBuffers

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on


# -- the one conversion between the message and its JSON file ---------------------------------
def record_to_json(rec: ppb.RoundRecord) -> dict:
    """The JSON document a round record is persisted as (the file format of earlier
    versions: manifests in base64, ranks as string keys)."""
    return {"v": rec.version, "counts": list(rec.block_counts), "world_size": rec.world_size,
            "rank_nodes": {str(k): n for k, n in sorted(rec.rank_nodes.items())},
            "announces": {n: {"block_count": a.block_count, "ranks": list(a.ranks),
                              "manifests": [base64.b64encode(x).decode() for x in a.manifests]}
                          for n, a in sorted(rec.announces.items())}}


def record_from_json(job_id: str, doc) -> ppb.RoundRecord:
    """The round record a JSON document (:func:`record_to_json`'s, or an earlier version's
    file) describes; ``ValueError`` when it is not one."""
    try:
        rec = ppb.RoundRecord(job=job_id, version=int(doc["v"]),
                              block_counts=[int(c) for c in doc["counts"]],
                              world_size=int(doc.get("world_size", 0)),
                              rank_nodes={int(k): str(n) for k, n in doc.get("rank_nodes", {}).items()})
        for node, a in doc["announces"].items():
            rec.announces[str(node)].CopyFrom(ppb.RoundAnnounce(
                block_count=int(a["block_count"]), ranks=[int(r) for r in a["ranks"]],
                manifests=[base64.b64decode(x, validate=True) for x in a["manifests"]]))
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise ValueError(f"not a round record of job {job_id!r}: {type(exc).__name__}: {exc}") from None
    return rec


# -- the file this version writes ---------------------------------------------------------------
RECORD_FILE_FORMAT = 2  # (1: the JSON document of earlier versions, cluster/<job>.json)
RECORD_SUFFIX = ".rec"
LEGACY_SUFFIX = ".json"


def encode_record_file(rec: ppb.RoundRecord, parity: dict | None) -> bytes:
    """A record file's document: a JSON line (format, version, parity index) and the
    record's bytes."""
    head = {"format": RECORD_FILE_FORMAT, "v": rec.version}
    if parity is not None:
        head["parity"] = parity
    return json.dumps(head).encode() + b"\n" + rec.SerializeToString()


def decode_record_file(body: bytes) -> tuple[dict, bytes]:
    """(JSON head, record bytes) of a record file's document; ``ValueError`` when it is
    not one this version reads."""
    nl = body.find(b"\n")
    try:
        head = json.loads(body[:nl]) if nl >= 0 else None
        if not isinstance(head, dict):
            raise ValueError("no JSON head line")
        int(head["v"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a round record file: {exc}") from None
    if head.get("format") != RECORD_FILE_FORMAT:
        raise ValueError(f"round record file format {head.get('format')!r}: this daemon reads "
                         f"format {RECORD_FILE_FORMAT} (written by a newer version?)")
    return head, body[nl + 1:]


def parse_stored(job_id: str, v: int, raw: bytes) -> ppb.RoundRecord:
    """The round record of a record file (``raw``: its bytes), which must be job_id's
    version v; ``ValueError`` when it is not."""
    rec = ppb.RoundRecord()
    try:
        rec.ParseFromString(raw)
    except (DecodeError, RecursionError) as exc:
        raise ValueError(f"not a round record of job {job_id!r}: {type(exc).__name__}") from None
    if rec.job != job_id or rec.version != v:
        raise ValueError(f"the file holds job {rec.job!r} version {rec.version}, not job "
                         f"{job_id!r} version {v}")
    return rec


def _stored(job_id: str, base: str) -> tuple[int, object, dict | None, str] | None:
    """(v, a thunk that returns the record, parity, path) of the newer of the job's record
    files (``base``: the path less its suffix), or None when there is none."""
    best = None
    path = base + RECORD_SUFFIX
    body = DocFile(path).load_body()
    if body is not None:
        try:
            head, raw = decode_record_file(body)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        v = int(head["v"])
        best = (v, lambda v=v, raw=raw: parse_stored(job_id, v, raw), head.get("parity"), path)
    path = base + LEGACY_SUFFIX
    info = DocFile(path).load()
    if info is not None:
        try:
            v = int(info["v"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a round record: {exc!r}") from None
        if best is None or v > best[0]:
            best = (v, lambda: record_from_json(job_id, info), info.get("parity"), path)
    return best


def read_record(state_dir: str, job_id: str) -> dict | None:
    """The job's persisted round record as the JSON document earlier versions wrote
    (:func:`record_to_json`, plus ``parity``), from whichever file holds the newer version;
    None when there is none. For operators and tests."""
    got = _stored(job_id, os.path.join(state_dir, "cluster", job_id))
    if got is None:
        return None
    v, record, parity, _path = got
    doc = record_to_json(record())
    if parity is not None:
        doc["parity"] = parity
    return doc


class RoundRecords:
    def __init__(self, *, me: str, n: int, m: int, block_size_bytes: int, store, jobs: JobTable,
                 parity: ParityBuffers, membership, degraded: dict):
        self.me, self.n, self.m, self.bs = me, n, m, block_size_bytes
        self.k = n - m
        self.store, self.jobs, self.parity, self.membership = store, jobs, parity, membership
        self.degraded = degraded
        self._files: dict[str, DocFile] = {}  # job -> its record's file (under JobTable.lock)
        self._dir_made = False
        self._legacy_checked: set[str] = set()  # jobs whose earlier-version file is gone
        # A node without peers (set by the node: one node, m = 0, no other group) keeps no
        # file: nobody asks it for a round, and the one round it would hold is derived
        # from what the store persists anyway (the index and the manifests) at load.
        self.peerless = False

    # -- the round record -------------------------------------------------------------------
    def round_record(self, job_id: str, v: int) -> ppb.RoundRecord:
        """The round record of a retained version (KeyError if it is not retained)."""
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            r = jp.rounds.get(v) if jp else None
            if r is None or r.layout is None:
                raise KeyError(f"job {job_id!r} version {v} is not retained here")
            summary = self.store.jobs_summary().get(job_id, {})
            rec = ppb.RoundRecord(job=job_id, version=v, block_counts=list(r.layout.block_counts),
                                  world_size=summary.get("world_size", 0), rank_nodes=dict(jp.rank_nodes))
            for node, a in r.announces.items():
                rec.announces[node].CopyFrom(ppb.RoundAnnounce(
                    block_count=a.block_count, ranks=list(a.ranks), manifests=list(a.manifests)))
            return rec

    def bounded_counts(self, counts) -> tuple[int, ...]:
        """Block counts from the network, checked before anything is sized from them:
        one per group member, each at most what this node's budget could hold parity for."""
        return check_block_counts(counts, self.n, block_count_limit(self.store.memory_budget_bytes, self.bs, self.k))

    def layout_of(self, rec: ppb.RoundRecord):
        """The group layout a round record describes (its counts checked first)."""
        return pl.place_group(self.n, self.m, self.bounded_counts(list(rec.block_counts)))

    def parse_record(self, job_id: str, v: int, raw) -> ppb.RoundRecord:
        """The round record in a ``round`` reply's payload, checked whole (see the module
        docstring); ``ValueError`` naming what is wrong when it is not a sound one."""
        if raw is None:
            raise ValueError("the round reply carries no record")
        rec = ppb.RoundRecord()
        try:
            rec.ParseFromString(bytes(raw))
        except (DecodeError, RecursionError) as exc:
            raise ValueError(f"the round record does not parse: {type(exc).__name__}") from None
        size = rec.ByteSize()
        rec.DiscardUnknownFields()
        if rec.ByteSize() != size:
            raise ValueError("the round record has fields the peer schema does not know")
        if rec.job != job_id or rec.version != v:
            raise ValueError(f"the round record is of job {rec.job!r} version {rec.version}, "
                             f"not of job {job_id!r} version {v}")
        if not rec.HasField("world_size"):
            raise ValueError("the round record lacks world_size")
        self.bounded_counts(list(rec.block_counts))
        for node, a in rec.announces.items():
            if not node or len(a.manifests) != len(a.ranks) or len(set(a.ranks)) != len(a.ranks):
                raise ValueError(f"the round record's announce of {node!r} does not list one "
                                 "manifest per rank, each rank once")
            self.bounded_counts([a.block_count] * self.n)
        if not all(rec.rank_nodes.values()):
            raise ValueError("the round record maps a rank to no node")
        return rec

    def fetch_record(self, node: str, job_id: str, v: int) -> ppb.RoundRecord:
        """Peer ``node``'s round record of version v, checked (:meth:`parse_record`).
        Raises what the call raises (RemoteError: it does not retain v) or ValueError."""
        reply, payload = self.membership.peer(node).call(peer_ops.round_(job_id, v))
        if payload is not None and reply.round.record_bytes != len(payload):
            raise ValueError(f"the round reply says {reply.round.record_bytes} bytes, "
                             f"its payload is {len(payload)}")
        return self.parse_record(job_id, v, payload)

    def retained_round(self, job_id: str, v: int, nodes) -> tuple[ppb.RoundRecord | None, list[str]]:
        """The round record of version v (layout, every member's manifests) and which of
        ``nodes`` retain it (ourselves included, asked locally): the sources of a rebuild.
        A node that serves a malformed record is refused as a source (logged)."""
        rec, holders = None, []
        for node in nodes:
            try:
                got = self.round_record(job_id, v) if node == self.me else self.fetch_record(node, job_id, v)
            except (KeyError, PeerUnavailableError, RemoteError) as exc:
                log.info("job %s v%d: %s cannot serve it: %s", job_id, v, node, exc)
                continue
            except ValueError as exc:
                log.warning("job %s v%d: refused the round record %s served: %s", job_id, v, node, exc)
                continue
            if rec is None:
                rec = got
            holders.append(node)
        return rec, holders

    # -- persisted records -------------------------------------------------------------------
    def _dir(self) -> str:
        return os.path.join(self.store.state_dir, "cluster")

    def _path(self, job_id: str, suffix: str = RECORD_SUFFIX) -> str:
        return os.path.join(self._dir(), job_id + suffix)

    def _file(self, job_id: str) -> DocFile:
        """The job's record file (under JobTable.lock); the directory made once."""
        f = self._files.get(job_id)
        if f is None:
            if not self._dir_made:
                os.makedirs(self._dir(), mode=0o700, exist_ok=True)
                self._dir_made = True
            f = self._files[job_id] = DocFile(self._path(job_id))
        return f

    def save(self, job_id: str, v: int) -> None:
        """Persist what a restarted daemon needs to keep serving version v: the
        layout, every group member's announce and our parity buffer's index. A node
        without peers writes nothing (its round is derived at load, :meth:`_derive`); it
        removes a file an earlier daemon left, once, so that none goes stale."""
        if self.peerless:
            if job_id not in self._legacy_checked:
                self.delete(job_id)
                self._legacy_checked.add(job_id)
            return
        with self.jobs.lock:
            try:
                rec = self.round_record(job_id, v)
            except KeyError:
                return
            buf = self.parity.get(job_id, v)
            parity = None if buf is None else {
                "name": buf.name, "blocks": [list(b) for b in buf.index],
                "checksums": [buf.checksums.get(i) for i in range(len(buf.index))]}
            self._file(job_id).save_bytes(encode_record_file(rec, parity))
            if job_id not in self._legacy_checked:  # an earlier version's file: superseded now
                DocFile(self._path(job_id, LEGACY_SUFFIX)).delete()
                self._legacy_checked.add(job_id)

    def delete(self, job_id: str) -> None:
        with self.jobs.lock:
            f = self._files.pop(job_id, None) or DocFile(self._path(job_id))
            f.delete()
            DocFile(self._path(job_id, LEGACY_SUFFIX)).delete()
            self._legacy_checked.discard(job_id)

    def load(self) -> None:
        """After a restart: restore the committed rounds (and parity) we had persisted;
        release every other cluster segment (pooled parity, copies of remote shards)."""
        self._load()
        if self.peerless:
            self._derive()
        keep = self.parity.names()
        for name in self.store.aux_names():
            if name not in keep:
                self.store.release_aux(name)

    def _load(self) -> None:
        d = self._dir()
        if not os.path.isdir(d):
            return
        jobs = sorted({fn[:fn.rindex(sfx)] for fn in os.listdir(d) for sfx in (RECORD_SUFFIX, LEGACY_SUFFIX)
                       if fn.endswith((sfx, sfx + ".a", sfx + ".b"))})
        for job_id in jobs:
            got = _stored(job_id, os.path.join(d, job_id))
            if got is None:
                continue
            v, record, par, path = got
            if self.store.committed_version(job_id) != v:
                continue
            try:
                rec = record()
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            self.install_round(job_id, v, rec)
            if par:
                seg = self.store.aux(par["name"])
                if seg is None:
                    log.warning("job %s v%d: parity segment lost; it will be rebuilt", job_id, v)
                    self.degraded[job_id] = "parity lost in a restart"
                    continue
                self.parity.adopt(job_id, v, par["name"], seg, par["blocks"], par["checksums"])

    def _derive(self) -> None:
        """A node without peers: install each committed version's round as its commit
        made it (CommitDriver._on_local_complete: the local ranks' manifests and their
        block count; every rank on this node), from the store's committed shards, for the
        jobs whose round no file gave."""
        for job_id, info in self.store.jobs_summary().items():
            v = info["committed"]
            with self.jobs.lock:
                jp = self.jobs.get(job_id)
                if not v or (jp is not None and v in jp.rounds):
                    continue
            shards = self.store.local_shards(job_id, v)
            if not shards:
                continue
            ranks = [r for r, _, _ in shards]
            count = map_manifests(ranks, [m for _, m, _ in shards], self.bs).total_blocks
            rec = ppb.RoundRecord(job=job_id, version=v, block_counts=[count], world_size=info["world_size"],
                                  rank_nodes={r: self.me for r in ranks})
            rec.announces[self.me].CopyFrom(ppb.RoundAnnounce(
                block_count=count, ranks=ranks, manifests=[m.SerializeToString() for _, m, _ in shards]))
            self.install_round(job_id, v, rec)

    def install_round(self, job_id: str, v: int, rec: ppb.RoundRecord) -> None:
        """Make version v's round (from a checked record) the job's committed, retained
        round. Everything is built from the record before the job table changes."""
        layout = pl.place_group(self.n, self.m, tuple(rec.block_counts))
        announces = {node: proto.Announce(node, a.block_count, tuple(a.ranks), tuple(a.manifests))
                     for node, a in rec.announces.items()}
        rank_nodes = dict(rec.rank_nodes)
        with self.jobs.lock:
            jp = self.jobs.job(job_id)
            jp.committed_version = max(jp.committed_version, v)
            r = jp.round(v)
            r.layout = layout
            r.announces.update(announces)
            for rk, node in rank_nodes.items():
                jp.rank_nodes.setdefault(rk, node)
            r.local_data = r.parity_done = r.contributions_started = True
            r.contributions_sent = r.voted = True


def main(argv=None) -> int:
    """``python -m snapshotd.node.cluster.records STATE_DIR JOB``: the job's round record
    as JSON (the document earlier versions kept on disk)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m snapshotd.node.cluster.records STATE_DIR JOB", file=sys.stderr)
        return 2
    doc = read_record(args[0], args[1])
    if doc is None:
        print(f"no round record of job {args[1]!r} under {args[0]}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
