"""Carrying out repair plans: fetch the sources from the group, verify, decode.

:class:`RepairRunner` runs a :class:`~snapshotd.core.recovery.RecoveryPlan` (a rebuild,
a degraded read) and single-stripe repairs (the scrubber's repair of our own block).

* Every block fetched from a peer carries its holder's stored xxh3 and is verified on
  arrival (``snapshotd.node.peer``). One that fails is corrupt *at its holder*: it is
  never decoded. The stripe is then re-planned around it
  (:func:`snapshotd.core.integrity.replan_stripe`) and another source fetched (any k of
  the k + m shards decode); only with fewer than k good sources left does it fail,
  naming the version, the stripe and the corrupt holders. The holder is told (peer op
  ``suspect``) so that it checks and repairs the block at once.
* The next batch is fetched while this one decodes (ISA-L releases the GIL), and full
  blocks are decoded straight into their destination.

Thread-safety: no state of its own beyond its collaborators; safe from any thread.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from snapshotd.core.integrity import describe_shard, replan_stripe
from snapshotd.core.recovery import Shard
from snapshotd.node.metrics import Progress
from snapshotd.wire.errors import InsufficientShardsError

from . import peer_ops
from .corrupt import CorruptBlocks

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on


class RepairRunner:
    def __init__(self, *, me: str, group: tuple[str, ...], k: int, block_size_bytes: int, code,
                 membership, corrupt: CorruptBlocks):
        self.me, self.group, self.k, self.bs, self.code = me, group, k, block_size_bytes, code
        self.membership, self.corrupt = membership, corrupt

    def run(self, job_id: str, v: int, plan, spans, parity, batch: int = 16,
            group: tuple[str, ...] | None = None, layout=None, alive=frozenset(),
            found_by: str = "rebuild") -> int:
        """Carry out a recovery plan: fetch sources per node in parallel, decode.
        ``spans`` maps a data output's block j to (segment, offset, length); ``parity``:
        the parity buffer parity outputs go into; ``group``: the plan's group (default
        ours). A source that fails its checksum is never decoded: its stripe is
        re-planned around it from the other nodes of ``alive`` (group-local indices of
        ``layout``), and the run fails only with fewer than k good sources. Returns the
        bytes written."""
        k = self.k
        group = group or self.group
        zero = np.zeros(self.bs, np.uint8)
        scratch = np.empty(self.bs, np.uint8)
        repairs = list(plan.repairs)
        batches = [repairs[i:i + batch] for i in range(0, len(repairs), batch)]
        progress = Progress(log, f"job {job_id!r} v{v} rebuild", sum(len(r.outputs) for r in repairs) * self.bs)

        def fetch_batch(chunk):
            per_node: dict[str, list] = {}
            for ri, rep in enumerate(chunk):
                for src in rep.fetches():
                    per_node.setdefault(group[src.node], []).append(
                        ((ri, src), (peer_ops.fetch(job_id, v, rep.stripe, src), None)))
            got: dict = {}
            corrupt: list = []  # (ri, src) whose block failed its checksum: never used
            errs = []

            def fetch(node, items):
                bad: list = []
                try:
                    self.fetch_verified(node, items, got, bad)
                except Exception as exc:
                    errs.append(f"{node}: {exc}")
                corrupt.extend((key, node) for key in bad)

            ts = [threading.Thread(target=fetch, args=it) for it in per_node.items()]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if errs:
                raise InsufficientShardsError(
                    f"rebuild of job {job_id!r} v{v}: fetch failed (a block that fails its "
                    f"checksum is corrupt and never used): {errs}")
            return got, corrupt

        def sources(ri, rep, got, bad):
            if not bad:
                return {src.shard_index(k): (zero if src.kind == "zero" else got[(ri, src)])
                        for src in rep.sources}
            if layout is None:
                raise InsufficientShardsError(
                    f"job {job_id!r} version {v}: stripe {rep.stripe}: corrupt sources "
                    f"{[describe_shard(x, n) for x, n in bad]} and no layout to re-plan")
            for x, holder in bad:
                self.corrupt_source(job_id, v, rep.stripe, x, holder, found_by)
            have = {src: got[(ri, src)] for src in rep.fetches() if (ri, src) in got}
            return self.refetch_stripe(job_id, v, layout, alive, group, rep.stripe, rep.outputs,
                                       [x for x, _ in bad], have, found_by)

        def dest(rep, o):
            if o.kind == "parity":
                return parity.view(rep.stripe, o.index), None
            seg, off, n = spans[o.block]
            if n == self.bs:
                return np.frombuffer(seg.buf, np.uint8, n, off), None
            return scratch, (seg, off, n)

        written = 0
        with ThreadPoolExecutor(1) as ex:
            nxt = ex.submit(fetch_batch, batches[0]) if batches else None
            for bi, chunk in enumerate(batches):
                got, corrupt = nxt.result()
                nxt = ex.submit(fetch_batch, batches[bi + 1]) if bi + 1 < len(batches) else None
                bad: dict = {}
                for (ri, src), holder in corrupt:
                    bad.setdefault(ri, []).append((src, holder))
                for ri, rep in enumerate(chunk):
                    avail = sources(ri, rep, got, bad.get(ri))
                    for o in rep.outputs:  # one at a time: partial blocks share scratch
                        out, partial = dest(rep, o)
                        self.code.reconstruct(avail, [o.shard_index(k)], {o.shard_index(k): out})
                        if partial is not None:
                            seg, off, n = partial
                            memoryview(seg.buf)[off:off + n] = out[:n].data
                        written += self.bs if partial is None else partial[2]
                progress.update(written, "fetch+decode")
        return written

    def decode_one(self, job_id: str, v: int, layout, alive, stripe: int, target: Shard,
                   found_by: str) -> np.ndarray:
        """Decode one block (``target``, a shard of ``stripe`` of our group) from k good
        shards of its stripe on the nodes in ``alive``."""
        avail = self.refetch_stripe(job_id, v, layout, alive, self.group, stripe, (target,), (), {}, found_by)
        out = np.empty(self.bs, np.uint8)
        w = target.shard_index(self.k)
        self.code.reconstruct(avail, [w], {w: out})
        return out

    def fetch_verified(self, node: str, items: list, got: dict, corrupt: list) -> None:
        """Fetch ``items`` [(key, (PeerRequest, None))] from ``node`` into ``got[key]``; a block
        that fails its checksum goes to ``corrupt`` instead. Pipelined; after a corrupt
        reply the batch is resumed after that block (the client stops at the first bad
        reply, so the next unanswered request is fetched alone to pinpoint it)."""
        rest = list(items)
        client = self.membership.peer(node)
        while rest:
            batch = rest

            def put(i, reply, d, batch=batch):
                got[batch[i][0]] = np.frombuffer(d, np.uint8)

            try:
                client.call_many([r for _, r in batch], window=8, on_reply=put)
                return
            except Exception as exc:
                if not peer_ops.is_corrupt_reply(exc):
                    raise
            rest = [it for it in batch if it[0] not in got]
            if not rest:
                return
            key, req = rest.pop(0)
            try:
                _, d = client.call(*req)
                got[key] = np.frombuffer(d, np.uint8)
            except Exception as exc:
                if not peer_ops.is_corrupt_reply(exc):
                    raise
                corrupt.append(key)

    def refetch_stripe(self, job_id: str, v: int, layout, alive, group, stripe: int, outputs,
                       excluded, have: dict, found_by: str) -> dict:
        """Sources for one stripe that avoid every block known corrupt: re-plans, fetches
        what is missing into ``have`` (Shard -> block) and repeats while new corrupt blocks
        turn up. Returns {shard index: block} for ``ErasureCode.reconstruct``."""
        bad = set(excluded)
        alive = set(alive)
        unreachable: list[str] = []
        zero = None
        while True:
            rep = replan_stripe(layout, stripe, alive, bad, outputs)
            if rep is None:
                held = ", ".join(describe_shard(x, group[x.node]) for x in sorted(bad)) or "none"
                targets = {o.node for o in outputs}
                down = [nd for i, nd in enumerate(group) if i not in alive and i not in targets]
                raise InsufficientShardsError(
                    f"job {job_id!r} version {v}: stripe {stripe} has fewer than k={layout.k} good "
                    f"sources left (corrupt: {held}; down or unreachable: {', '.join(down) or 'none'}; "
                    "a block that fails its checksum is never used)"
                    + (f"; fetch errors: {'; '.join(unreachable)}" if unreachable else ""))
            missing: dict = {}
            for x in rep.fetches():
                if x not in have:
                    missing.setdefault(group[x.node], []).append((x, (peer_ops.fetch(job_id, v, stripe, x), None)))
            if not missing:
                if zero is None:
                    zero = np.zeros(self.bs, np.uint8)
                return {x.shard_index(layout.k): zero if x.kind == "zero" else have[x] for x in rep.sources}
            for node, items in missing.items():
                newly: list = []
                try:
                    self.fetch_verified(node, items, have, newly)
                except Exception as exc:  # gone, or does not hold it: another source then
                    unreachable.append(f"{node}: {exc}")
                    alive.discard(group.index(node))
                for x in newly:
                    self.corrupt_source(job_id, v, stripe, x, node, found_by)
                    bad.add(x)

    def corrupt_source(self, job_id: str, v: int, stripe: int, x: Shard, holder: str, found_by: str) -> None:
        """A fetched source failed its checksum: record it and have its holder check it."""
        where = {"block": x.block} if x.kind == "data" else {"stripe": stripe, "row": x.index}
        if holder == self.me:  # a degraded read that fetched from ourselves
            self.corrupt.queue_suspect({"job": job_id, "v": v, "kind": x.kind,  # our scrubber records it
                                        **({"j": x.block} if x.kind == "data" else {"stripe": stripe, "row": x.index})})
            return
        if self.corrupt.note(job_id, v, x.kind, holder, found_by, where) is None:
            return  # already known, its holder already told
        req = peer_ops.suspect(job_id, v, stripe, x)

        def tell():
            try:
                self.membership.peer(holder).call(req)
            except Exception as exc:  # best effort: its scrubber finds it anyway
                log.info("could not tell %s about its corrupt block: %s", holder, exc)

        threading.Thread(target=tell, name="snapshotd-suspect", daemon=True).start()
