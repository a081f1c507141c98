"""Round records: what a node keeps of a committed version to rebuild a peer or itself.

A round record is the layout's block counts, every group member's announce (ranks and
manifests), the rank -> node map and, in the persisted copy, our parity buffer's index
and checksums. :class:`RoundRecords` serves it to peers (peer op ``round``), asks peers
for it (:meth:`retained_round`, the sources of a rebuild or a degraded read), saves it
at each commit (one JSON file per job under the store's state directory) and loads it
after a restart (:meth:`load`), installing the round into the job's protocol state.

Thread-safety: :meth:`save` and :meth:`install_round` run under ``JobTable.lock`` (they
take it themselves; callers may hold it). :meth:`load` runs once, before the threads start.
"""

from __future__ import annotations

import base64
import json
import logging
import os

from snapshotd.core import placement as pl
from snapshotd.core import protocol as proto
from snapshotd.core.repair import block_count_limit, check_block_counts
from snapshotd.node.peer import PeerUnavailableError, RemoteError

from . import peer_ops
from .jobs import JobTable
from .parity import ParityBuffers

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on


class RoundRecords:
    def __init__(self, *, me: str, n: int, m: int, block_size_bytes: int, store, jobs: JobTable,
                 parity: ParityBuffers, membership, degraded: dict):
        self.me, self.n, self.m, self.bs = me, n, m, block_size_bytes
        self.k = n - m
        self.store, self.jobs, self.parity, self.membership = store, jobs, parity, membership
        self.degraded = degraded

    # -- the round document ---------------------------------------------------------------
    def round_info(self, job_id: str, v: int) -> bytes:
        """The JSON round record of a retained version (KeyError if it is not retained)."""
        with self.jobs.lock:
            jp = self.jobs.get(job_id)
            r = jp.rounds.get(v) if jp else None
            if r is None or r.layout is None:
                raise KeyError(f"job {job_id!r} version {v} is not retained here")
            return json.dumps(self._round_doc(job_id, r)).encode()

    def _round_doc(self, job_id: str, r) -> dict:
        summary = self.store.jobs_summary().get(job_id, {})
        jp = self.jobs.get(job_id)
        return {"counts": list(r.layout.block_counts), "world_size": summary.get("world_size", 0),
                "rank_nodes": {str(k): n for k, n in (jp.rank_nodes.items() if jp else ())},
                "announces": {n: {"block_count": a.block_count, "ranks": list(a.ranks),
                                  "manifests": [base64.b64encode(x).decode() for x in a.manifests]}
                              for n, a in r.announces.items()}}

    def bounded_counts(self, counts) -> tuple[int, ...]:
        """Block counts from the network, checked before anything is sized from them:
        one per group member, each at most what this node's budget could hold parity for."""
        return check_block_counts(counts, self.n, block_count_limit(self.store.memory_budget_bytes, self.bs, self.k))

    def layout_of(self, info: dict):
        """The group layout a round record describes (its counts checked first)."""
        return pl.place_group(self.n, self.m, self.bounded_counts(info["counts"]))

    def retained_round(self, job_id: str, v: int, nodes) -> tuple[dict | None, list[str]]:
        """The round record of version v (layout, every member's manifests) and which of
        ``nodes`` retain it (ourselves included, asked locally): the sources of a rebuild."""
        info, holders = None, []
        for node in nodes:
            try:
                if node == self.me:
                    doc = json.loads(self.round_info(job_id, v))
                else:
                    doc = json.loads(bytes(self.membership.peer(node).call(peer_ops.round_(job_id, v))[1]))
            except (KeyError, PeerUnavailableError, RemoteError) as exc:
                log.info("job %s v%d: %s cannot serve it: %s", job_id, v, node, exc)
                continue
            info = info or doc
            holders.append(node)
        return info, holders

    # -- persisted records -------------------------------------------------------------------
    def _dir(self) -> str:
        return os.path.join(self.store.state_dir, "cluster")

    def _path(self, job_id: str) -> str:
        d = self._dir()
        os.makedirs(d, mode=0o700, exist_ok=True)
        return os.path.join(d, f"{job_id}.json")

    def save(self, job_id: str, v: int) -> None:
        """Persist what a restarted daemon needs to keep serving version v: the
        layout, every group member's announce and our parity buffer's index."""
        with self.jobs.lock:
            try:
                info = json.loads(self.round_info(job_id, v))
            except KeyError:
                return
            buf = self.parity.get(job_id, v)
            info["v"] = v
            if buf is not None:
                info["parity"] = {"name": buf.name, "blocks": [list(b) for b in buf.index],
                                  "checksums": [buf.checksums.get(i) for i in range(len(buf.index))]}
            path = self._path(job_id)
            with open(path + ".tmp", "w") as f:
                json.dump(info, f)
            os.replace(path + ".tmp", path)

    def delete(self, job_id: str) -> None:
        try:
            os.unlink(self._path(job_id))
        except FileNotFoundError:
            pass

    def load(self) -> None:
        """After a restart: restore the committed rounds (and parity) we had persisted;
        release every other cluster segment (pooled parity, copies of remote shards)."""
        self._load()
        keep = self.parity.names()
        for name in self.store.aux_names():
            if name not in keep:
                self.store.release_aux(name)

    def _load(self) -> None:
        d = self._dir()
        if not os.path.isdir(d):
            return
        for fn in os.listdir(d):
            if not fn.endswith(".json"):
                continue
            job_id = fn[:-5]
            with open(os.path.join(d, fn)) as f:
                info = json.load(f)
            v = int(info["v"])
            if self.store.committed_version(job_id) != v:
                continue
            self.install_round(job_id, v, info)
            par = info.get("parity")
            if par:
                seg = self.store.aux(par["name"])
                if seg is None:
                    log.warning("job %s v%d: parity segment lost; it will be rebuilt", job_id, v)
                    self.degraded[job_id] = "parity lost in a restart"
                    continue
                self.parity.adopt(job_id, v, par["name"], seg, par["blocks"], par["checksums"])

    def install_round(self, job_id: str, v: int, info: dict) -> None:
        """Make version v's round (from a record) the job's committed, retained round."""
        with self.jobs.lock:
            jp = self.jobs.job(job_id)
            jp.committed_version = max(jp.committed_version, v)
            r = jp.round(v)
            r.layout = pl.place_group(self.n, self.m, tuple(info["counts"]))
            for node, a in info["announces"].items():
                r.announces[node] = proto.Announce(node, a["block_count"], tuple(a["ranks"]),
                                                   tuple(base64.b64decode(x) for x in a["manifests"]))
            for rk, node in info.get("rank_nodes", {}).items():
                jp.rank_nodes.setdefault(int(rk), node)
            r.local_data = r.parity_done = r.contributions_started = True
            r.contributions_sent = r.voted = True
