"""The scrubber: finds corrupt blocks this node holds, and repairs them from the group.

* **Scrubber.** A background thread re-hashes every block this node holds for its
  committed versions (data and parity) against the stored checksums, at most
  ``scrub_rate_bytes_per_s``, a full pass at most every ``scrub_interval_s``. It holds no
  lock while hashing; a mismatch counts only if the block is still the committed
  version's afterwards (a slot reused meanwhile is not corruption).
* **Suspects.** A block a peer (peer op ``suspect``) or a degraded read found corrupt is
  checked at once, between the blocks of a pass.
* **Repair.** A corrupt block of our own is decoded from k good shards of its stripe on
  the group's other nodes and written back only if it matches the stored checksum; until
  then the job shows as degraded (``snapshotd status``, the chaos harness's ``whole()``).

The decisions (what a pass hashes, pacing) are the pure functions of
:mod:`snapshotd.core.integrity`. Every corrupt block found goes to
:class:`~snapshotd.node.cluster.corrupt.CorruptBlocks` (logged, counted once, listed).

Call order: construct; set ``scrub_rate_bytes_per_s`` / ``scrub_interval_s``;
:meth:`start`; at stop, set ``stop`` and :meth:`wake`, then join the thread.
"""

from __future__ import annotations

import logging
import threading
import time

import xxhash

from snapshotd.core import placement as pl
from snapshotd.core.blockmap import map_manifests
from snapshotd.core.integrity import ScrubItem, next_pass_delay_s, pace_delay_s, scrub_items
from snapshotd.core.recovery import Shard
from snapshotd.wire.errors import ChecksumMismatchError, InsufficientShardsError

from .corrupt import CorruptBlocks
from .jobs import JobTable
from .parity import ParityBuffers
from .repairs import RepairRunner

log = logging.getLogger("snapshotd.cluster")  # the name operators filter on

DEFAULT_SCRUB_RATE_BYTES_PER_S = 64 << 20
DEFAULT_SCRUB_INTERVAL_S = 600.0


class Scrubber:
    def __init__(self, *, me: str, my_index: int, group: tuple[str, ...], m: int, block_size_bytes: int,
                 store, jobs: JobTable, parity: ParityBuffers, membership, repairs: RepairRunner,
                 corrupt: CorruptBlocks, degraded: dict, stop: threading.Event):
        self.me, self.my_index, self.group = me, my_index, group
        self.n, self.m, self.bs = len(group), m, block_size_bytes
        self.store, self.jobs, self.parity, self.membership = store, jobs, parity, membership
        self.repairs, self.corrupt, self.degraded = repairs, corrupt, degraded
        self._stop = stop
        self.scrub_rate_bytes_per_s = DEFAULT_SCRUB_RATE_BYTES_PER_S  # 0: no background passes
        self.scrub_interval_s = DEFAULT_SCRUB_INTERVAL_S
        self.stats = {"passes": 0, "bytes": 0, "blocks": 0, "last_pass_s": None,
                      "last_pass_bytes": 0, "running": False}
        self._own_corrupt: dict = {}  # ScrubItem -> the degraded mark it set

    # -- lifecycle and status -----------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="snapshotd-scrub", daemon=True)
        t.start()
        return t

    def wake(self) -> None:
        self.corrupt.wake.set()

    def status(self) -> dict:
        return {**self.corrupt.status(),
                "scrub": dict(self.stats, rate_bytes_per_s=self.scrub_rate_bytes_per_s,
                              interval_s=self.scrub_interval_s)}

    # -- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        last = time.monotonic()  # the first pass one interval after start
        while not self._stop.is_set():
            self._drain_suspects()
            if self.scrub_rate_bytes_per_s > 0:
                wait = next_pass_delay_s(last, time.monotonic(), self.scrub_interval_s)
                if wait <= 0:
                    last = time.monotonic()
                    self.scrub_pass()
                    continue
            else:
                wait = 3600.0
            self.corrupt.wake.wait(min(wait, 5.0))
            self.corrupt.wake.clear()

    def _drain_suspects(self) -> None:
        while True:
            s = self.corrupt.next_suspect()
            if s is None:
                return
            try:
                it = self._suspect_item(s)
                if it is not None:
                    self._scrub_one(it, {}, found_by="peer report")
            except Exception as exc:
                log.info("checking a block a peer reported (%s): %s", s, exc)

    def _suspect_item(self, s: dict) -> ScrubItem | None:
        """The scrub item of a block a peer reported, if we still hold that version."""
        job, v = s["job"], s["v"]
        if self.store.committed_version(job) != v:
            return None
        if s["kind"] == "parity":
            slot = self.parity.slot_of(job, v, s["stripe"], s["row"])
            return None if slot is None else ScrubItem(job, v, "parity", -1, slot, s["stripe"], s["row"])
        shards = self.store.local_shards(job, v)
        hit = map_manifests([r for r, _, _ in shards], [m for _, m, _ in shards], self.bs).locate(s["j"])
        return None if hit is None else ScrubItem(job, v, "data", hit[0].rank, hit[1])

    def _inventory(self) -> dict:
        """What this node holds of its committed versions: {job: {version, parity, ranks}}."""
        if self.store.unsafe_skip_verify:  # the test-only broken build checks nothing
            return {}
        targets = {j: v for j, v in self.jobs.committed_versions().items() if v}
        inv = {}
        for job, v in targets.items():
            if self.store.committed_version(job) != v:
                continue
            parity = self.parity.sealed_slots(job, v)
            try:
                ranks = {r: len(m.block_checksums) for r, m, _ in self.store.local_shards(job, v)}
            except Exception:  # dropped meanwhile
                continue
            inv[job] = {"version": v, "parity": parity, "ranks": ranks}
        return inv

    def scrub_pass(self) -> None:
        """One full pass over the committed versions' blocks, paced to the scrub rate."""
        t0 = time.monotonic()
        self.stats["running"] = True
        inv = self._inventory()
        for it in [x for x in self._own_corrupt if inv.get(x.job, {}).get("version") != x.version]:
            self._own_corrupt.pop(it, None)  # a version no longer held (a newer one committed)
        items = scrub_items(inv)
        shards: dict = {}
        done = 0
        try:
            for it in items:
                if self._stop.is_set():
                    return
                if self.corrupt.has_suspects():
                    self._drain_suspects()
                try:
                    n = self._scrub_one(it, shards, found_by="scrub")
                except Exception as exc:  # a version dropped meanwhile, a peer gone during repair
                    log.info("scrub of %s: %s", it, exc)
                    n = 0
                done += n
                self.stats["bytes"] += n
                self.stats["blocks"] += 1 if n else 0
                delay = pace_delay_s(done, t0, time.monotonic(), self.scrub_rate_bytes_per_s)
                if delay > 0 and self._stop.wait(delay):
                    return
            self.stats["passes"] += 1
            self.stats["last_pass_s"] = round(time.monotonic() - t0, 3)
            self.stats["last_pass_bytes"] = done
            if items:
                log.debug("scrub pass: %d blocks, %.1f MiB in %.1f s", len(items), done / 2**20,
                          time.monotonic() - t0)
        finally:
            self.stats["running"] = False

    def _scrub_one(self, it: ScrubItem, shards: dict, found_by: str) -> int:
        """Hash one block (no lock held); on a mismatch that is real (the version is still
        committed and the block still ours), report it and repair it. Returns bytes hashed."""
        job, v = it.job, it.version
        if it.kind == "parity":
            buf = self.parity.get(job, v)
            want = buf.checksums.get(it.index) if buf is not None else None
            if want is None:
                return 0
            try:
                got = xxhash.xxh3_64_intdigest(memoryview(buf.segment.buf)[it.index * self.bs:(it.index + 1) * self.bs])
            except (TypeError, ValueError):  # released and closed meanwhile
                return 0
            with self.jobs.lock:
                current = self.parity.get(job, v) is buf and not buf.released
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
        entry = self.corrupt.note(job, v, it.kind, self.me, found_by, where)
        what = f"corrupt {it.kind} block {where} of version {v}"
        mark = f"{what} (found by {found_by}); repairing it from the group"
        self.degraded[job] = self._own_corrupt[it] = mark
        try:
            self._repair_own(it)
        except Exception as exc:
            self.degraded[job] = self._own_corrupt[it] = f"{what} (found by {found_by}); not repaired: {exc}"
            log.warning("job %s: %s could not be repaired: %s", job, what, exc)
            return n
        self.corrupt.mark_repaired(entry, job, v, it.kind, self.me, where)
        self._clear_mark(it)
        self.corrupt.forget(job, v, it.kind, self.me, where)
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
        layout = self.jobs.retained_layout(job, v)
        if layout is None:
            raise InsufficientShardsError(f"the layout of version {v} is not retained here")
        if it.kind == "parity":
            s, target = it.stripe, Shard("parity", it.row, self.my_index, it.row)
        else:
            shards = self.store.local_shards(job, v)
            blocks = map_manifests([r for r, _, _ in shards], [mm for _, mm, _ in shards], self.bs)
            span = blocks.span_of(it.rank)
            m, seg = next(((mm, sg) for r, mm, sg in shards if r == it.rank), (None, None))
            if m is None or m.block_size_bytes != self.bs:
                raise InsufficientShardsError("the rank's blocks are not the cluster's blocks")
            j = span.first + it.index
            s, p = pl.data_stripe_of(self.n, self.m, self.my_index, j)
            target = Shard("data", p, self.my_index, j)
        alive = {self.group.index(x) for x in self.membership.alive_peers() if x in self.group}
        out = self.repairs.decode_one(job, v, layout, alive, s, target, "repair")
        if it.kind == "parity":
            buf = self.parity.get(job, v)
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


__all__ = ["Scrubber", "DEFAULT_SCRUB_RATE_BYTES_PER_S", "DEFAULT_SCRUB_INTERVAL_S"]
