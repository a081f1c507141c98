"""Corrupt blocks in a cluster (I/O side): re-fetching around them, the scrubber, repair.

Mixed into :class:`snapshotd.node.cluster.node.ClusterNode`; the decisions are the pure
functions of :mod:`snapshotd.core.integrity`.

* **Re-fetch.** Every block fetched from a peer carries its holder's stored xxh3 and is
  verified on arrival (``snapshotd.node.peer``). One that fails is corrupt *at its holder*: it
  is never decoded. A rebuild or degraded read then drops that source for that stripe
  and fetches another one (any k of the k + m shards decode); only with fewer than k
  good sources left does it fail, naming the version, the stripe and the corrupt holders.
  The holder is told (peer op ``suspect``) so that it checks and repairs the block at once.
* **Scrubber.** A background thread re-hashes every block this node holds for its
  committed versions (data and parity) against the stored checksums, at most
  ``scrub_rate_bytes_per_s``, a full pass at most every ``scrub_interval_s``. It holds no
  lock while hashing; a mismatch counts only if the block is still the committed
  version's afterwards (a slot reused meanwhile is not corruption).
* **Repair.** A corrupt block of our own is decoded from k good shards of its stripe on
  the group's other nodes and written back only if it matches the stored checksum; until
  then the job shows as degraded (``snapshotd status``, the chaos harness's ``whole()``).

Every corrupt block found is logged as a warning, counted once
(``snapshotd_corrupt_blocks_total{kind}``) and listed in the status JSON (``corrupt``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import numpy as np
import xxhash

from snapshotd.wire import manifest as mf
from snapshotd.core import placement as pl
from snapshotd.wire.errors import ChecksumMismatchError, InsufficientShardsError
from snapshotd.core.integrity import (
    ScrubItem,
    describe_shard,
    next_pass_delay_s,
    pace_delay_s,
    replan_stripe,
    scrub_items,
)
from snapshotd.node.peer import PeerProtocolError, RemoteError
from snapshotd.core.recovery import Shard

log = logging.getLogger("snapshotd.node.cluster.node")

DEFAULT_SCRUB_RATE_BYTES_PER_S = 64 << 20
DEFAULT_SCRUB_INTERVAL_S = 600.0
CORRUPT_LOG_MAX = 100  # entries of the status JSON's "corrupt" list (newest kept)
_SUSPECTS_MAX = 1024


def is_corrupt_reply(exc: BaseException) -> bool:
    """The fetch failed because the block is corrupt at its holder: the payload failed its
    xxh3 on arrival, or the holder's own check refused it (a rank's padded last block)."""
    if isinstance(exc, PeerProtocolError):
        return "xxh3 mismatch" in str(exc)
    return isinstance(exc, RemoteError) and exc.is_a(ChecksumMismatchError) \
        and "corrupt" in str(exc)


def fetch_header(job_id: str, v: int, stripe: int, src: Shard) -> dict:
    hdr = {"op": "fetch", "job": job_id, "v": v, "kind": src.kind}
    if src.kind == "data":
        hdr["j"] = src.block
    else:
        hdr["s"], hdr["t"] = stripe, src.index
    return hdr


class IntegrityMixin:
    def _init_integrity(self) -> None:
        self.scrub_rate_bytes_per_s = DEFAULT_SCRUB_RATE_BYTES_PER_S  # 0: no background passes
        self.scrub_interval_s = DEFAULT_SCRUB_INTERVAL_S
        self.corrupt_counts = {"data": 0, "parity": 0}
        self._corrupt_log: deque = deque(maxlen=CORRUPT_LOG_MAX)
        self._corrupt_seen: set = set()  # (job, v, holder, kind, index): counted once
        self._corrupt_lock = threading.Lock()
        self._suspects: queue.Queue = queue.Queue(_SUSPECTS_MAX)
        self._scrub_wake = threading.Event()
        self.scrub_stats = {"passes": 0, "bytes": 0, "blocks": 0, "last_pass_s": None,
                            "last_pass_bytes": 0, "running": False}
        self._own_corrupt: dict = {}  # ScrubItem -> the degraded mark it set

    # -- bookkeeping --------------------------------------------------------------------
    def note_corrupt(self, job_id: str, v: int, kind: str, holder: str, found_by: str,
                     where: dict) -> dict | None:
        """Log, count (once per block) and list a corrupt block. Returns its entry, or
        None if it was already known."""
        idx = tuple(sorted(where.items()))
        key = (job_id, v, holder, kind, idx)
        with self._corrupt_lock:
            if key in self._corrupt_seen:
                return None
            if len(self._corrupt_seen) > 16 * CORRUPT_LOG_MAX:
                self._corrupt_seen.clear()
            self._corrupt_seen.add(key)
            self.corrupt_counts[kind] = self.corrupt_counts.get(kind, 0) + 1
            entry = {"job": job_id, "version": v, "kind": kind, **where, "holder": holder,
                     "found_by": found_by, "time": round(time.time(), 3), "repaired": False}
            self._corrupt_log.append(entry)
        log.warning("CORRUPT %s block %s of job %s version %d held by %s (found by %s): it failed "
                    "its checksum and is not used", kind, where, job_id, v, holder, found_by)
        return entry

    def _forget_corrupt(self, job_id: str, v: int, kind: str, holder: str, where: dict) -> None:
        """The block is good again: should it go bad once more, it is reported anew."""
        with self._corrupt_lock:
            self._corrupt_seen.discard((job_id, v, holder, kind, tuple(sorted(where.items()))))

    def integrity_status(self) -> dict:
        with self._corrupt_lock:
            entries = [dict(e) for e in self._corrupt_log]
            counts = dict(self.corrupt_counts)
        return {"corrupt": entries, "corrupt_blocks": counts,
                "scrub": dict(self.scrub_stats, rate_bytes_per_s=self.scrub_rate_bytes_per_s,
                              interval_s=self.scrub_interval_s)}

    # -- fetching around corrupt blocks ----------------------------------------------------
    def _fetch_verified(self, node: str, items: list, got: dict, corrupt: list) -> None:
        """Fetch ``items`` [(key, (header, None))] from ``node`` into ``got[key]``; a block
        that fails its checksum goes to ``corrupt`` instead. Pipelined; after a corrupt
        reply the batch is resumed after that block (the client stops at the first bad
        reply, so the next unanswered request is fetched alone to pinpoint it)."""
        rest = list(items)
        client = self.peer(node)
        while rest:
            batch = rest

            def put(i, h, d, batch=batch):
                got[batch[i][0]] = np.frombuffer(d, np.uint8)

            try:
                client.call_many([r for _, r in batch], window=8, on_reply=put)
                return
            except Exception as exc:
                if not is_corrupt_reply(exc):
                    raise
            rest = [it for it in batch if it[0] not in got]
            if not rest:
                return
            key, req = rest.pop(0)
            try:
                h, d = client.call(*req)
                got[key] = np.frombuffer(d, np.uint8)
            except Exception as exc:
                if not is_corrupt_reply(exc):
                    raise
                corrupt.append(key)

    def _refetch_stripe(self, job_id: str, v: int, layout, alive, group, stripe: int, outputs,
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
                    missing.setdefault(group[x.node], []).append((x, (fetch_header(job_id, v, stripe, x), None)))
            if not missing:
                if zero is None:
                    zero = np.zeros(self.bs, np.uint8)
                return {x.shard_index(layout.k): zero if x.kind == "zero" else have[x] for x in rep.sources}
            for node, items in missing.items():
                newly: list = []
                try:
                    self._fetch_verified(node, items, have, newly)
                except Exception as exc:  # gone, or does not hold it: another source then
                    unreachable.append(f"{node}: {exc}")
                    alive.discard(group.index(node))
                for x in newly:
                    self._corrupt_source(job_id, v, stripe, x, node, found_by)
                    bad.add(x)

    def _corrupt_source(self, job_id: str, v: int, stripe: int, x: Shard, holder: str, found_by: str) -> None:
        """A fetched source failed its checksum: record it and have its holder check it."""
        where = {"block": x.block} if x.kind == "data" else {"stripe": stripe, "row": x.index}
        suspect = {"job": job_id, "v": v, "kind": x.kind,
                   **({"j": x.block} if x.kind == "data" else {"stripe": stripe, "row": x.index})}
        if holder == self.me:  # a degraded read that fetched from ourselves
            self._queue_suspect(suspect)  # our scrubber's check records it
            return
        if self.note_corrupt(job_id, v, x.kind, holder, found_by, where) is None:
            return  # already known, its holder already told
        hdr = {"op": "suspect", "job": job_id, "v": v, "kind": x.kind}
        hdr.update({"j": x.block} if x.kind == "data" else {"s": stripe, "t": x.index})

        def tell():
            try:
                self.peer(holder).call(hdr)
            except Exception as exc:  # best effort: its scrubber finds it anyway
                log.info("could not tell %s about its corrupt block: %s", holder, exc)

        threading.Thread(target=tell, name="snapshotd-suspect", daemon=True).start()

    # -- a peer reports one of our blocks as corrupt ------------------------------------------
    def _on_suspect(self, h: dict) -> None:
        """Peer op ``suspect`` (from the peer server thread: only queued here)."""
        kind = h.get("kind")
        if kind == "data":
            where = {"j": int(h["j"])}
        elif kind == "parity":
            where = {"stripe": int(h["s"]), "row": int(h["t"])}
        else:
            raise ValueError(f"suspect: kind must be data or parity, got {kind!r}")
        self._queue_suspect({"job": str(h["job"]), "v": int(h["v"]), "kind": kind, **where})

    def _queue_suspect(self, s: dict) -> None:
        try:
            self._suspects.put_nowait(s)
        except queue.Full:  # the next pass finds it anyway
            return
        self._scrub_wake.set()

    def _suspect_item(self, s: dict) -> ScrubItem | None:
        """The scrub item of a block a peer reported, if we still hold that version."""
        job, v = s["job"], s["v"]
        if self.store.committed_version(job) != v:
            return None
        if s["kind"] == "parity":
            with self._lock:
                buf = self.parity.get((job, v))
            slot = buf.index.get((s["stripe"], s["row"])) if buf is not None else None
            return None if slot is None else ScrubItem(job, v, "parity", -1, slot, s["stripe"], s["row"])
        j, first = s["j"], 0
        for rank, m, _seg in self.store.local_shards(job, v):
            nb = mf.num_blocks(m.payload_bytes, self.bs)
            if first <= j < first + nb:
                return ScrubItem(job, v, "data", rank, j - first)
            first += nb
        return None

    # -- the scrubber ---------------------------------------------------------------------
    def _scrubber(self) -> None:
        last = time.monotonic()  # the first pass one interval after start
        while not self._stop.is_set():
            self._drain_suspects()
            if self.scrub_rate_bytes_per_s > 0:
                wait = next_pass_delay_s(last, time.monotonic(), self.scrub_interval_s)
                if wait <= 0:
                    last = time.monotonic()
                    self._scrub_pass()
                    continue
            else:
                wait = 3600.0
            self._scrub_wake.wait(min(wait, 5.0))
            self._scrub_wake.clear()

    def _drain_suspects(self) -> None:
        while True:
            try:
                s = self._suspects.get_nowait()
            except queue.Empty:
                return
            try:
                it = self._suspect_item(s)
                if it is not None:
                    self._scrub_one(it, {}, found_by="peer report")
            except Exception as exc:
                log.info("checking a block a peer reported (%s): %s", s, exc)

    def _scrub_inventory(self) -> dict:
        """What this node holds of its committed versions: {job: {version, parity, ranks}}."""
        if self.store.unsafe_skip_verify:  # the test-only broken build checks nothing
            return {}
        with self._lock:
            targets = {j: jp.committed_version for j, jp in self.jobs.items() if jp.committed_version}
        inv = {}
        for job, v in targets.items():
            if self.store.committed_version(job) != v:
                continue
            with self._lock:
                buf = self.parity.get((job, v))
            parity = []
            if buf is not None and not buf.released and buf.checksums:
                parity = [b for b, _ in sorted(buf.index.items(), key=lambda x: x[1])]
            try:
                ranks = {r: len(m.block_checksums) for r, m, _ in self.store.local_shards(job, v)}
            except Exception:  # dropped meanwhile
                continue
            inv[job] = {"version": v, "parity": parity, "ranks": ranks}
        return inv

    def _scrub_pass(self) -> None:
        """One full pass over the committed versions' blocks, paced to the scrub rate."""
        t0 = time.monotonic()
        self.scrub_stats["running"] = True
        inv = self._scrub_inventory()
        for it in [x for x in self._own_corrupt if inv.get(x.job, {}).get("version") != x.version]:
            self._own_corrupt.pop(it, None)  # a version no longer held (a newer one committed)
        items = scrub_items(inv)
        shards: dict = {}
        done = 0
        try:
            for it in items:
                if self._stop.is_set():
                    return
                if not self._suspects.empty():
                    self._drain_suspects()
                try:
                    n = self._scrub_one(it, shards, found_by="scrub")
                except Exception as exc:  # a version dropped meanwhile, a peer gone during repair
                    log.info("scrub of %s: %s", it, exc)
                    n = 0
                done += n
                self.scrub_stats["bytes"] += n
                self.scrub_stats["blocks"] += 1 if n else 0
                delay = pace_delay_s(done, t0, time.monotonic(), self.scrub_rate_bytes_per_s)
                if delay > 0 and self._stop.wait(delay):
                    return
            self.scrub_stats["passes"] += 1
            self.scrub_stats["last_pass_s"] = round(time.monotonic() - t0, 3)
            self.scrub_stats["last_pass_bytes"] = done
            if items:
                log.debug("scrub pass: %d blocks, %.1f MiB in %.1f s", len(items), done / 2**20,
                         time.monotonic() - t0)
        finally:
            self.scrub_stats["running"] = False

    def _scrub_one(self, it: ScrubItem, shards: dict, found_by: str) -> int:
        """Hash one block (no lock held); on a mismatch that is real (the version is still
        committed and the block still ours), report it and repair it. Returns bytes hashed."""
        job, v = it.job, it.version
        if it.kind == "parity":
            with self._lock:
                buf = self.parity.get((job, v))
            want = buf.checksums.get(it.index) if buf is not None else None
            if want is None:
                return 0
            try:
                got = xxhash.xxh3_64_intdigest(memoryview(buf.segment.buf)[it.index * self.bs:(it.index + 1) * self.bs])
            except (TypeError, ValueError):  # released and closed meanwhile
                return 0
            with self._lock:
                current = self.parity.get((job, v)) is buf and not buf.released
            n = self.bs
        else:
            key = (job, v)
            if key not in shards:
                shards[key] = {r: (m, seg) for r, m, seg in self.store.local_shards(job, v)}
            m, seg = shards[key].get(it.rank, (None, None))
            if m is None or it.index >= len(m.block_checksums):
                return 0
            mbs = m.block_size_bytes
            off = it.index * mbs
            n = min(mbs, m.payload_bytes - off)
            want = m.block_checksums[it.index]
            try:
                got = xxhash.xxh3_64_intdigest(memoryview(seg.buf)[off:off + n])
            except (TypeError, ValueError):
                return 0
            current = any(r == it.rank and s is seg for r, _, s in self.store.local_shards(job, v)) \
                if got != want else True
        if got == want:
            if it in self._own_corrupt:  # good again (repaired, or the holder fixed): clear
                self._clear_mark(it)
            return n
        if not current or self.store.committed_version(job) != v:
            return 0  # the slot moved on while we hashed: not corruption
        where = {k: x for k, x in it.label().items() if k not in ("job", "version", "kind")}
        entry = self.note_corrupt(job, v, it.kind, self.me, found_by, where)
        what = f"corrupt {it.kind} block {where} of version {v}"
        mark = f"{what} (found by {found_by}); repairing it from the group"
        self.degraded[job] = self._own_corrupt[it] = mark
        try:
            self._repair_own(it)
        except Exception as exc:
            self.degraded[job] = self._own_corrupt[it] = f"{what} (found by {found_by}); not repaired: {exc}"
            log.warning("job %s: %s could not be repaired: %s", job, what, exc)
            return n
        if entry is not None:
            entry["repaired"] = True
        else:
            with self._corrupt_lock:
                for e in self._corrupt_log:
                    if (e["job"], e["version"], e["kind"], e["holder"]) == (job, v, it.kind, self.me) \
                            and all(e.get(k) == x for k, x in where.items()):
                        e["repaired"] = True
        self._clear_mark(it)
        self._forget_corrupt(job, v, it.kind, self.me, where)
        log.warning("job %s: %s repaired (decoded from the group, checksum verified)", job, what)
        return n

    def _clear_mark(self, it: ScrubItem) -> None:
        mark = self._own_corrupt.pop(it, None)
        if mark is not None and self.degraded.get(it.job) == mark:
            self.degraded.pop(it.job, None)
            for x, why in list(self._own_corrupt.items()):  # another corrupt block of the job
                if x.job == it.job:
                    self.degraded[it.job] = why
                    break

    def _repair_own(self, it: ScrubItem) -> None:
        """Decode our corrupt block from k good shards of its stripe on the group's other
        nodes; write it back only if it matches the stored checksum."""
        job, v = it.job, it.version
        if not self.m:
            raise InsufficientShardsError("no parity (m = 0): nothing to decode it from")
        with self._lock:
            jp = self.jobs.get(job)
            r = jp.rounds.get(v) if jp else None
            layout = r.layout if r is not None else None
        if layout is None:
            raise InsufficientShardsError(f"the layout of version {v} is not retained here")
        if it.kind == "parity":
            s, target = it.stripe, Shard("parity", it.row, self.my_index, it.row)
        else:
            first, m, seg = 0, None, None
            for rank, mm, sg in self.store.local_shards(job, v):
                if rank == it.rank:
                    m, seg = mm, sg
                    break
                first += mf.num_blocks(mm.payload_bytes, self.bs)
            if m is None or m.block_size_bytes != self.bs:
                raise InsufficientShardsError("the rank's blocks are not the cluster's blocks")
            j = first + it.index
            s, p = pl.data_stripe_of(self.n, self.m, self.my_index, j)
            target = Shard("data", p, self.my_index, j)
        alive = {self.group.index(x) for x in self.alive_peers() if x in self.group}
        avail = self._refetch_stripe(job, v, layout, alive, self.group, s, (target,), (), {}, "repair")
        out = np.empty(self.bs, np.uint8)
        w = target.shard_index(self.k)
        self.code.reconstruct(avail, [w], {w: out})
        if it.kind == "parity":
            with self._lock:
                buf = self.parity.get((job, v))
            if buf is None:
                raise InsufficientShardsError("the parity was released meanwhile")
            if xxhash.xxh3_64_intdigest(out) != buf.checksums.get(it.index):
                raise ChecksumMismatchError("the decoded block does not match its stored checksum")
            with buf.lock:
                if buf.released:
                    raise InsufficientShardsError("the parity was released meanwhile")
                buf.view(s, it.row)[:] = out
            return
        off = it.index * self.bs
        n = min(self.bs, m.payload_bytes - off)
        if xxhash.xxh3_64_intdigest(out[:n]) != m.block_checksums[it.index]:
            raise ChecksumMismatchError("the decoded block does not match its stored checksum")
        if self.store.committed_version(job) != v:
            raise InsufficientShardsError(f"version {v} is no longer the committed one")
        memoryview(seg.buf)[off:off + n] = out[:n].data
