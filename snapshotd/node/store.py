"""The daemon's shard store: shared-memory segments, memory budget, durable index.

Carries out the plans of :class:`snapshotd.core.ledger.JobLedger`. Every shard lives in a
named segment ``snapshotd.<node>.<job>.r<rank>.s<slot>.g<generation>`` under /dev/shm,
so the bytes survive the trainer (the daemon owns them) and the daemon too: a small
JSON index and one manifest file per held segment live in ``state_dir``; a restarted
daemon re-adopts the committed segments, unlinks everything else with its prefix, and
loses nothing that was committed.

Thread-safety: every public method may be called from any gRPC worker thread. State
changes happen under one lock; hashing of large payloads happens outside it.
Budget: a segment's bytes are reserved (and, with posix_fallocate, really allocated)
before a trainer may write a byte, and a request that would exceed the budget or the
free space of /dev/shm is refused with MemoryBudgetExceededError. Nothing changes then.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from snapshotd.wire import manifest as mf
from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (
    ConflictError,
    InvalidRequestError,
    MemoryBudgetExceededError,
    UnknownJobError,
    VersionNotFoundError,
)
from snapshotd.core.ledger import JobLedger, Slot, SlotState
from snapshotd.node.store_cluster import ClusterStoreMixin, Held

log = logging.getLogger("snapshotd.node.store")
INDEX_FORMAT = 1
# Test-only: a deliberately broken build for the chaos harness (tests/test_chaos.py).
# "1" turns off every checksum check of held and fetched blocks. Never set it in use.
ENV_UNSAFE_SKIP_VERIFY = "SNAPSHOTD_UNSAFE_SKIP_VERIFY"


class ShardStore(ClusterStoreMixin):
    def __init__(self, node_id: str, state_dir: str, memory_budget_bytes: int,
                 max_slots_per_rank: int = 3, verify_on_adopt: bool = True,
                 cluster_mode: bool = False, instance: str = ""):
        if not node_id or "." in node_id or not shm._NAME_RE.match(node_id):
            raise InvalidRequestError(f"invalid node id {node_id!r}: use [A-Za-z0-9_-]")
        self.node_id = node_id
        self.state_dir = state_dir
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.max_slots_per_rank = max_slots_per_rank
        self.verify_on_adopt = verify_on_adopt
        self.unsafe_skip_verify = os.environ.get(ENV_UNSAFE_SKIP_VERIFY) == "1"
        if self.unsafe_skip_verify:
            log.warning("!!! %s=1: CHECKSUM VERIFICATION IS OFF; corrupt blocks WILL be restored. "
                        "This is a test-only broken build; never use it for training. !!!",
                        ENV_UNSAFE_SKIP_VERIFY)
        if instance and ("." in instance or not shm._NAME_RE.match(instance)):
            raise InvalidRequestError(f"invalid instance name {instance!r}: use [A-Za-z0-9_-]")
        # ``instance`` keeps several clusters on one machine (tests, demos) apart.
        self.prefix = f"snapshotd.{instance}.{node_id}." if instance else f"snapshotd.{node_id}."
        self._lock = threading.RLock()
        self._jobs: dict[str, JobLedger] = {}
        self._held: dict[str, Held] = {}  # segment name -> held
        self._by_slot: dict[tuple[str, int, int], str] = {}  # (job, rank, slot) -> name
        self.requests_refused = 0
        # Cluster mode: versions commit when every node holds data and parity. The
        # cluster sets ``commit_hook(job, version)``, called once every local rank
        # delivered a version, and commits with ``commit_version``.
        self.cluster_mode = cluster_mode
        self.commit_hook = None
        self._aux: dict[str, shm.Segment] = {}  # parity and other cluster segments
        self._aux_sizes: dict[str, int] = {}
        # xxhash releases the GIL: large payloads are hashed on all cores at once.
        self._hashers = ThreadPoolExecutor(min(8, os.cpu_count() or 1),
                                           thread_name_prefix="snapshotd-hash")
        os.makedirs(os.path.join(state_dir, "manifests"), mode=0o700, exist_ok=True)
        self._recover()

    # -- naming and persistence ---------------------------------------------------
    def _segment_name(self, job: str, rank: int, slot: Slot) -> str:
        return f"{self.prefix}{job}.r{rank}.s{slot.index}.g{slot.generation}"

    def _manifest_path(self, name: str) -> str:
        return os.path.join(self.state_dir, "manifests", name + ".pb")

    def _persist(self) -> None:
        doc = {"format": INDEX_FORMAT, "node_id": self.node_id, "jobs": {},
               "aux": dict(self._aux_sizes)}
        for job, led in self._jobs.items():
            doc["jobs"][job] = {
                "world_size": led.world_size,
                "local_world_size": led.local_world_size,
                "committed_version": led.committed_version,
                "slots": {
                    str(r): [[s.size, s.state.value, s.version, s.generation] for s in ss]
                    for r, ss in led.slots.items()
                },
            }
        path = os.path.join(self.state_dir, "index.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _recover(self) -> None:
        """Re-adopt committed segments named in the index; clean up everything else."""
        path = os.path.join(self.state_dir, "index.json")
        doc = {"jobs": {}}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (OSError, ValueError) as exc:
                log.error("index %s unreadable (%s); starting empty", path, exc)
        for job, j in doc.get("jobs", {}).items():
            led = JobLedger(job, int(j["world_size"]), self.max_slots_per_rank,
                            committed_version=int(j["committed_version"]),
                            local_world_size=int(j.get("local_world_size", 0)),
                            auto_commit=not self.cluster_mode)
            for r, ss in j["slots"].items():
                led.slots[int(r)] = [
                    Slot(index=i, size=size, state=SlotState(st), version=v, generation=g)
                    for i, (size, st, v, g) in enumerate(ss)
                ]
            led.abandon_uncommitted()
            lost = []
            for r, ss in led.slots.items():
                for s in ss:
                    name = self._segment_name(job, r, s)
                    if s.state is SlotState.COMMITTED:
                        try:
                            seg = shm.open_segment(name, writable=True)
                            with open(self._manifest_path(name), "rb") as f:
                                m = pb.ShardManifest.FromString(f.read())
                            if seg.size != s.size or m.version != s.version:
                                raise ValueError("size or version differs from the index")
                        except (OSError, ValueError) as exc:
                            lost.append((r, name, str(exc)))
                            continue
                        self._held[name] = Held(seg, m)
                        self._by_slot[(job, r, s.index)] = name
                    else:
                        s.size = 0  # uncommitted segments are unlinked below
            if lost:
                log.error("job %s: committed version %d lost on this node (%s); "
                          "dropping it", job, led.committed_version, lost)
                for name in [n for (jj, _, _), n in self._by_slot.items() if jj == job]:
                    self._held.pop(name).segment.close()
                self._by_slot = {k: v for k, v in self._by_slot.items() if k[0] != job}
                for ss in led.slots.values():
                    for s in ss:
                        s.state, s.version, s.size = SlotState.FREE, 0, 0
                led.committed_version = 0
            self._jobs[job] = led
        for name, size in doc.get("aux", {}).items():
            try:
                seg = shm.open_segment(name, writable=True)
                if seg.size != size:
                    seg.close()
                    raise ValueError("size differs from the index")
            except (OSError, ValueError) as exc:
                log.warning("aux segment %s not re-adopted: %s", name, exc)
                continue
            self._aux[name], self._aux_sizes[name] = seg, size
        keep = set(self._held) | set(self._aux)
        for name in shm.list_segments(self.prefix):
            if name not in keep:
                shm.unlink(name)
                log.info("unlinked stale segment %s", name)
        for fn in os.listdir(os.path.join(self.state_dir, "manifests")):
            if fn[:-3] not in keep:
                os.unlink(os.path.join(self.state_dir, "manifests", fn))
        self._persist()
        if self._jobs:
            log.info("recovered %d job(s): %s", len(self._jobs), {
                j: led.committed_version for j, led in self._jobs.items()})

    # -- checksums ------------------------------------------------------------------
    def _checksums(self, buf, m: pb.ShardManifest) -> list[int]:
        bs, n = m.block_size_bytes, m.payload_bytes
        nblocks = mf.num_blocks(n, bs)
        workers = self._hashers._max_workers
        if nblocks < 2 * workers:
            return mf.block_checksums(buf, n, bs)
        per = -(-nblocks // workers)
        mv = memoryview(buf)
        parts = [self._hashers.submit(mf.block_checksums, mv[i * per * bs:min((i + 1) * per * bs, n)],
                                      min((i + 1) * per * bs, n) - i * per * bs, bs)
                 for i in range(workers) if i * per * bs < n]
        return [c for p in parts for c in p.result()]

    def _verify(self, buf, m: pb.ShardManifest, what: str) -> None:
        if self.unsafe_skip_verify:
            return
        got = self._checksums(buf, m)
        if got != list(m.block_checksums):
            bad = [i for i, (a, b) in enumerate(zip(got, m.block_checksums)) if a != b]
            mf.raise_mismatch(m, bad, len(got), what)

    # -- accounting ---------------------------------------------------------------
    def bytes_reserved(self) -> int:
        with self._lock:
            return sum(led.bytes_allocated() for led in self._jobs.values()) + \
                sum(self._aux_sizes.values())

    def bytes_committed(self) -> int:
        with self._lock:
            total = 0
            for (job, r, idx), name in self._by_slot.items():
                m = self._held[name].manifest
                if m is not None and self._jobs[job].slots[r][idx].state is SlotState.COMMITTED:
                    total += m.payload_bytes
            return total

    def _refuse(self, exc: Exception) -> Exception:
        self.requests_refused += 1
        return exc

    def _make_room(self, needed: int, keep: tuple[str, int, int] | None = None) -> None:
        """Ensure ``needed`` more bytes fit the budget, releasing FREE segments if needed.

        ``keep`` (job, rank, slot) is the slot being resized: it is not released (its
        current size is already accounted for in ``needed``). If releasing every other
        FREE segment would not be enough, nothing is released.
        """
        if self.bytes_reserved() + needed <= self.memory_budget_bytes:
            return
        releasable = sum(s.size for job, led in self._jobs.items() for r, ss in led.slots.items()
                         for s in ss if s.state is SlotState.FREE and (job, r, s.index) != keep)
        if self.bytes_reserved() - releasable + needed > self.memory_budget_bytes:
            raise self._refuse(MemoryBudgetExceededError(
                f"{needed} more bytes would exceed the memory budget of "
                f"{self.memory_budget_bytes} bytes ({self.bytes_reserved()} reserved)"
            ))
        for job, led in self._jobs.items():
            for r, ss in led.slots.items():
                for s in ss:
                    if s.state is SlotState.FREE and s.size and (job, r, s.index) != keep:
                        self._release_segment(job, r, s)
                        s.size = 0
                        if self.bytes_reserved() + needed <= self.memory_budget_bytes:
                            return
        raise self._refuse(MemoryBudgetExceededError(
            f"{needed} more bytes would exceed the memory budget of "
            f"{self.memory_budget_bytes} bytes ({self.bytes_reserved()} reserved)"
        ))

    def _release_segment(self, job: str, rank: int, slot: Slot) -> None:
        name = self._by_slot.pop((job, rank, slot.index), None)
        if name is None:
            return
        held = self._held.pop(name, None)
        if held is not None and held.segment is not None:
            held.segment.close()
        shm.unlink(name)
        try:
            os.unlink(self._manifest_path(name))
        except FileNotFoundError:
            pass

    # -- jobs -----------------------------------------------------------------------
    def register_job(self, job_id: str, world_size: int, local_world_size: int = 0,
                     restarting: bool = False) -> int:
        """``local_world_size``: ranks of the job on this node (0 = all; one node).
        ``restarting``: drop the job's uncommitted versions (see ``fence``)."""
        mf.validate_job_id(job_id)
        if not 1 <= world_size <= 1 << 20:
            raise self._refuse(InvalidRequestError(f"world_size must be in [1, 2^20], got {world_size}"))
        if not 0 <= local_world_size <= world_size:
            raise self._refuse(InvalidRequestError(
                f"local_world_size must be in [0, world_size={world_size}], got {local_world_size}"))
        with self._lock:
            led = self._jobs.get(job_id)
            if led is not None:
                if led.world_size != world_size or (
                        local_world_size and led.local_world_size != local_world_size):
                    raise self._refuse(ConflictError(
                        f"job {job_id!r} is registered with world_size {led.world_size} "
                        f"(local {led.local_world_size}), not {world_size} (local "
                        f"{local_world_size or world_size}); drop it first to change its size"))
                if restarting:
                    self.fence(job_id)
                return led.committed_version
            self._jobs[job_id] = JobLedger(job_id, world_size, self.max_slots_per_rank,
                                           local_world_size=local_world_size,
                                           auto_commit=not self.cluster_mode)
            self._persist()
            return 0

    def fence(self, job_id: str, keep_version: int = 0) -> list[tuple[int, int]]:
        """Free every uncommitted slot of the job (its trainers start over), but those
        of ``keep_version`` (a version committed elsewhere, being rebuilt here)."""
        with self._lock:
            led = self._jobs.get(job_id)
            if led is None:
                return []
            freed = led.abandon_uncommitted(keep_version)
            self._forget_freed(job_id, freed)
            if freed:
                self._persist()
            return freed

    def _job(self, job_id: str) -> JobLedger:
        led = self._jobs.get(job_id)
        if led is None:
            raise self._refuse(UnknownJobError(f"unknown job {job_id!r} (register it first)"))
        return led

    def drop_job(self, job_id: str) -> int:
        with self._lock:
            led = self._job(job_id)
            freed = led.bytes_allocated()
            for r, ss in led.slots.items():
                for s in ss:
                    self._release_segment(job_id, r, s)
            del self._jobs[job_id]
            self._persist()
            return freed

    # -- writing a shard --------------------------------------------------------------
    def acquire_staging(self, job_id: str, rank: int, version: int, nbytes: int,
                        force: bool = False) -> tuple[str, int]:
        with self._lock:
            led = self._job(job_id)
            try:
                plan = led.acquire(rank, version, nbytes, force)
            except Exception as exc:
                raise self._refuse(exc)
            slot = led.slots[rank][plan.slot]
            if plan.new_size is not None:
                delta = plan.new_size - plan.old_size
                self._make_room(max(delta, 0), keep=(job_id, rank, slot.index))
                if delta > shm.free_bytes():
                    raise self._refuse(MemoryBudgetExceededError(
                        f"{shm.SHM_DIR} has {shm.free_bytes()} bytes free, {delta} needed"))
                self._release_segment(job_id, rank, slot)
                slot.size = 0
                name = f"{self.prefix}{job_id}.r{rank}.s{slot.index}.g{plan.generation}"
                seg = shm.create(name, plan.new_size)
                try:
                    # Really allocate the pages now: a full tmpfs must be a clean
                    # refusal here, not a SIGBUS in the trainer later.
                    fd = os.open(shm.path_of(name), os.O_RDWR)
                    try:
                        os.posix_fallocate(fd, 0, plan.new_size)
                    finally:
                        os.close(fd)
                    shm.populate(seg)  # we hash it at every hand-off: map it once, now
                except OSError as exc:
                    seg.close()
                    shm.unlink(name)
                    raise self._refuse(MemoryBudgetExceededError(
                        f"cannot allocate {plan.new_size} bytes in {shm.SHM_DIR}: {exc}"))
                self._held[name] = Held(seg, None)
                self._by_slot[(job_id, rank, slot.index)] = name
            slot = led.apply_staging(plan, version)
            name = self._by_slot[(job_id, rank, slot.index)]
            self._held[name].manifest = None
            self._persist()
            return name, slot.size

    def adopt(self, segment_name: str, m: pb.ShardManifest) -> tuple[bool, int]:
        """Take ownership of a staged segment as ``m.rank``'s shard of ``m.version``."""
        try:
            mf.validate_manifest(m)
        except Exception as exc:
            raise self._refuse(exc)
        with self._lock:
            led = self._job(m.job_id)
            slot = led.slot_of(m.rank, m.version, SlotState.STAGING)
            name = self._by_slot.get((m.job_id, m.rank, slot.index)) if slot else None
            if name != segment_name:
                raise self._refuse(ConflictError(
                    f"segment {segment_name!r} is not the staging segment of job "
                    f"{m.job_id!r} rank {m.rank} version {m.version}"))
            seg = self._held[name].segment
            if m.payload_bytes > slot.size:
                raise self._refuse(InvalidRequestError(
                    f"payload of {m.payload_bytes} bytes does not fit the {slot.size}-byte segment"))
        m = _copy(m)
        buf = seg.buf if seg.buf is not None else b""
        try:
            if m.block_checksums and self.verify_on_adopt:
                self._verify(buf, m, f"adopted segment {segment_name}")
            elif not m.block_checksums:
                m.block_checksums.extend(self._checksums(buf, m))
        except Exception as exc:
            raise self._refuse(exc)
        return self._deliver(m, name)

    def _deliver(self, m: pb.ShardManifest, name: str) -> tuple[bool, int]:
        with self._lock:
            led = self._job(m.job_id)
            slot = led.slot_of(m.rank, m.version, SlotState.STAGING)
            if slot is None or self._by_slot.get((m.job_id, m.rank, slot.index)) != name:
                raise self._refuse(ConflictError(
                    f"job {m.job_id!r} rank {m.rank} version {m.version}: the staging slot "
                    "was taken over while the shard was verified"))
            with open(self._manifest_path(name), "wb") as f:
                f.write(m.SerializeToString())
            self._held[name].manifest = m
            try:
                d = led.deliver(m.rank, m.version)
            except Exception as exc:
                self._held[name].manifest = None
                try:
                    os.unlink(self._manifest_path(name))
                except FileNotFoundError:
                    pass
                self._persist()
                raise self._refuse(exc)
            self._forget_freed(m.job_id, d.freed)
            self._persist()
            hook = self.commit_hook if (d.local_complete and not d.committed) else None
            result = d.committed, led.committed_version
        if hook is not None:
            hook(m.job_id, m.version)
        return result

    def _forget_freed(self, job_id: str, freed) -> None:
        for r, idx in freed:
            n = self._by_slot.get((job_id, r, idx))
            if n is not None:
                self._held[n].manifest = None
                try:
                    os.unlink(self._manifest_path(n))
                except FileNotFoundError:
                    pass

    def push(self, m: pb.ShardManifest, chunks) -> tuple[bool, int]:
        """Receive a shard over the network: ``chunks`` yields the payload in order."""
        mf.validate_manifest(m, require_checksums=True)
        with self._lock:
            existing = set(self._held)
            name, size = self.acquire_staging(m.job_id, m.rank, m.version, m.payload_bytes)
            created = name not in existing
        seg = self._held[name].segment
        off = 0
        try:
            for data in chunks:
                if len(data) > m.payload_bytes - off:
                    raise InvalidRequestError(
                        f"push carries more than the {m.payload_bytes} bytes its manifest declares")
                with self._lock:  # the slot may have been taken over by a newer version
                    if not self._owns_staging(m, name):
                        raise ConflictError(
                            f"job {m.job_id!r} rank {m.rank} version {m.version}: the staging "
                            "slot was taken over while the shard was pushed")
                    if data:
                        seg.buf[off:off + len(data)] = data
                off += len(data)
            if off != m.payload_bytes:
                raise InvalidRequestError(
                    f"push carried {off} bytes, its manifest declares {m.payload_bytes}")
            self._verify(seg.buf if seg.buf is not None else b"", m, "pushed shard")
        except Exception as exc:
            self._abandon_staging(m.job_id, m.rank, m.version, name, release=created)
            raise self._refuse(exc)
        return self._deliver(_copy(m), name)

    def _owns_staging(self, m: pb.ShardManifest, name: str) -> bool:
        led = self._jobs.get(m.job_id)
        slot = led.slot_of(m.rank, m.version, SlotState.STAGING) if led else None
        return slot is not None and self._by_slot.get((m.job_id, m.rank, slot.index)) == name

    def _abandon_staging(self, job: str, rank: int, version: int, name: str,
                         release: bool = False) -> None:
        with self._lock:
            led = self._jobs.get(job)
            slot = led.slot_of(rank, version, SlotState.STAGING) if led else None
            if slot is not None and self._by_slot.get((job, rank, slot.index)) == name:
                slot.state, slot.version = SlotState.FREE, 0
                if release:
                    self._release_segment(job, rank, slot)
                    slot.size = 0
                self._persist()

    # -- commit and reading ---------------------------------------------------------------
    def commit(self, job_id: str, version: int) -> tuple[bool, list[int], int]:
        with self._lock:
            led = self._job(job_id)
            if version and version == led.committed_version:
                return True, [], version
            missing = led.missing_ranks(version)
            return False, missing, led.committed_version

    def list_versions(self, job_id: str) -> tuple[int, list[tuple[int, bool, list[int], int]]]:
        with self._lock:
            led = self._job(job_id)
            out = []
            for v in led.versions():
                ranks = led.delivered_ranks(v)
                size = sum(led.slot_of(r, v, SlotState.PENDING, SlotState.COMMITTED).size
                           for r in ranks)
                out.append((v, v == led.committed_version, ranks, size))
            return led.committed_version, out

    def committed_shard(self, job_id: str, rank: int, version: int = 0,
                        verify: bool = True) -> tuple[str, pb.ShardManifest, shm.Segment]:
        """The committed shard of ``rank`` (``version`` 0 = latest), checksum-verified."""
        with self._lock:
            led = self._job(job_id)
            led._rank_slots(rank)
            if led.committed_version == 0:
                raise self._refuse(VersionNotFoundError(f"job {job_id!r} has no committed version"))
            if version not in (0, led.committed_version):
                raise self._refuse(VersionNotFoundError(
                    f"job {job_id!r}: version {version} is not held (latest committed: "
                    f"{led.committed_version})"))
            slot = led.committed_slot(rank)
            if slot is None:  # never expected: a committed version without the rank's slot
                raise self._refuse(VersionNotFoundError(
                    f"job {job_id!r}: rank {rank} has no committed shard here (committed version "
                    f"{led.committed_version})"))
            name = self._by_slot[(job_id, rank, slot.index)]
            held = self._held[name]
        if verify:
            try:
                self._verify(held.segment.buf if held.segment.buf is not None else b"",
                             held.manifest, f"segment {name}")
            except Exception as exc:
                log.error("%s", exc)
                raise self._refuse(exc)
        return name, held.manifest, held.segment

    def stats(self) -> dict:
        with self._lock:
            jobs = []
            for job, led in self._jobs.items():
                held = [n for (j, _, _), n in self._by_slot.items() if j == job]
                jobs.append({
                    "job_id": job, "world_size": led.world_size,
                    "latest_committed_version": led.committed_version,
                    "bytes_held": led.bytes_allocated(), "segments": len(held),
                })
            return {
                "node_id": self.node_id, "memory_budget_bytes": self.memory_budget_bytes,
                "bytes_reserved": self.bytes_reserved(),
                "bytes_committed": self.bytes_committed(), "jobs": jobs,
                "requests_refused": self.requests_refused,
            }

    def close(self) -> None:
        """Unmap (not unlink) everything: the segments stay for the next daemon."""
        with self._lock:
            for h in self._held.values():
                if h.segment is not None:
                    h.segment.close()
            self._held.clear()
            for seg in self._aux.values():
                seg.close()
        self._hashers.shutdown(wait=False)


def _copy(m: pb.ShardManifest) -> pb.ShardManifest:
    out = pb.ShardManifest()
    out.CopyFrom(m)
    return out
