"""The store's shared state: job ledgers, the segments held for their slots, aux segments,
the memory budget, and the durable index that lets a restarted daemon re-adopt them.

Every shard lives in a named segment ``<prefix><job>.r<rank>.s<slot>.g<generation>``
under /dev/shm (prefix ``snapshotd.[<instance>.]<node>.``); a small JSON index
(``state_dir/index.json``, kept in two slot files by :class:`~snapshotd.node.docfile.DocFile`)
and one manifest file per held segment (``state_dir/manifests/<name>.pb``) describe them. :meth:`StoreState.recover` re-adopts
the committed segments named in the index and unlinks everything else with the prefix.

Composed by :class:`snapshotd.node.store.ShardStore`: the trainer side
(:class:`snapshotd.node.store_trainer.TrainerStore`) and the cluster side
(:class:`snapshotd.node.store_cluster.ClusterView`) both take this object.

Thread-safety: ``lock`` (re-entrant) guards every table here; callers take it around
any sequence of calls that must be atomic (``with state.lock: ...``). The methods do not
take it themselves unless their docstring says so, except the byte counts.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field

from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import InvalidRequestError, MemoryBudgetExceededError, UnknownJobError
from snapshotd.core.ledger import JobLedger, Slot, SlotState
from snapshotd.node.docfile import DocFile

log = logging.getLogger("snapshotd.store")
INDEX_FORMAT = 1


def new_content_token() -> int:
    """A fresh random 64-bit content token (never 0: 0 means "no token" on the wire)."""
    return secrets.randbits(64) or 1


@dataclass
class Held:
    """The daemon's view of one slot's segment.

    Incremental snapshots (docs/INCREMENTAL.md): ``content_token`` names the segment's
    contents for its writer. It is drawn afresh whenever anything but that writer may
    have written the segment: a new Held (a new segment, one re-adopted by a restarted
    daemon, one a rebuild installs), an acquire by another writer id or by none (a push
    is one), so an unchanged token tells the writer its own bytes are still there.
    ``clean``: (version, block size, payload bytes, checksums) of this writer's last
    adoption of the segment under that token, the base an IncrementalHint refers to;
    dropped with the token."""

    segment: shm.Segment | None = None
    manifest: object | None = None  # ShardManifest once delivered
    content_token: int = field(default_factory=new_content_token)
    writer_id: str = ""
    clean: tuple | None = None
    # (manifest, its bytes as written to its manifest file): the cluster's announce
    # reuses them while ``manifest`` is that object (ClusterView.local_manifests).
    written: tuple | None = None

    def renew_token(self, writer_id: str) -> None:
        """Another writer (or an unnamed one) may write the segment from now on."""
        self.content_token, self.writer_id, self.clean = new_content_token(), writer_id, None


class StoreState:
    """Ledgers, held and aux segments, budget and index of one node's store."""

    def __init__(self, node_id: str, state_dir: str, memory_budget_bytes: int,
                 max_slots_per_rank: int = 3, cluster_mode: bool = False, instance: str = ""):
        if not node_id or "." in node_id or not shm._NAME_RE.match(node_id):
            raise InvalidRequestError(f"invalid node id {node_id!r}: use [A-Za-z0-9_-]")
        if instance and ("." in instance or not shm._NAME_RE.match(instance)):
            raise InvalidRequestError(f"invalid instance name {instance!r}: use [A-Za-z0-9_-]")
        self.node_id = node_id
        self.state_dir = state_dir
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.max_slots_per_rank = max_slots_per_rank
        # Cluster mode: versions commit when every node holds data and parity, not when
        # the local ranks delivered (the ledgers' auto_commit is off).
        self.cluster_mode = cluster_mode
        # ``instance`` keeps several clusters on one machine (tests, demos) apart.
        self.prefix = f"snapshotd.{instance}.{node_id}." if instance else f"snapshotd.{node_id}."
        self.lock = threading.RLock()
        self.jobs: dict[str, JobLedger] = {}
        self.requests_refused = 0
        self._held: dict[str, Held] = {}  # segment name -> held
        self._by_slot: dict[tuple[str, int, int], str] = {}  # (job, rank, slot) -> name
        self._aux: dict[str, shm.Segment] = {}  # parity and other cluster segments
        self._aux_sizes: dict[str, int] = {}
        # job -> wall-clock time (time.time()) of the last request that named it and was
        # served (persisted in the index, so a restart does not make old jobs look new)
        self.activity: dict[str, float] = {}
        self.clock = time.time
        os.makedirs(os.path.join(state_dir, "manifests"), mode=0o700, exist_ok=True)
        self._index = DocFile(os.path.join(state_dir, "index.json"))  # read by recover()

    # -- naming ---------------------------------------------------------------------
    def segment_name(self, job: str, rank: int, slot: Slot) -> str:
        return f"{self.prefix}{job}.r{rank}.s{slot.index}.g{slot.generation}"

    def manifest_path(self, name: str) -> str:
        return os.path.join(self.state_dir, "manifests", name + ".pb")

    def write_manifest(self, name: str, m) -> bytes:
        """Write the manifest of a segment being delivered (never of a committed one: a
        torn write is of a version a restart abandons). Over the segment's earlier file
        in place, not truncated to 0 first (on ext4 that, like a new file, costs a
        write-back start and ~0.1 ms of CPU at every save; issue 16). Returns the bytes
        written (the serialised manifest)."""
        data = m.SerializeToString()
        fd = os.open(self.manifest_path(name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, memoryview(data)[done:], done)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        return data

    def unlink_manifest(self, name: str) -> None:
        try:
            os.unlink(self.manifest_path(name))
        except FileNotFoundError:
            pass

    # -- jobs and refusals ------------------------------------------------------------
    def refuse(self, exc: Exception) -> Exception:
        """Count a refused request; returns ``exc`` for ``raise state.refuse(...)``."""
        self.requests_refused += 1
        return exc

    def job(self, job_id: str) -> JobLedger:
        led = self.jobs.get(job_id)
        if led is None:
            raise self.refuse(UnknownJobError(f"unknown job {job_id!r} (register it first)"))
        return led

    def touch(self, job_id: str) -> None:
        """A request naming ``job_id`` is being served: it is in use now."""
        if job_id in self.jobs:
            self.activity[job_id] = self.clock()

    def forget_job(self, job_id: str) -> None:
        """The job is gone (dropped): its ledger and activity go (segments: the caller)."""
        self.jobs.pop(job_id, None)
        self.activity.pop(job_id, None)

    def new_ledger(self, job_id: str, world_size: int, local_world_size: int = 0,
                   committed_version: int = 0) -> JobLedger:
        return JobLedger(job_id, world_size, self.max_slots_per_rank,
                         committed_version=committed_version, local_world_size=local_world_size,
                         auto_commit=not self.cluster_mode)

    # -- the segments of slots ----------------------------------------------------------
    def hold(self, job: str, rank: int, slot_index: int, name: str, held: Held) -> None:
        self._held[name] = held
        self._by_slot[(job, rank, slot_index)] = name

    def name_at(self, job: str, rank: int, slot_index: int) -> str | None:
        return self._by_slot.get((job, rank, slot_index))

    def held(self, name: str) -> Held:
        return self._held[name]

    def held_names(self) -> set[str]:
        return set(self._held)

    def segment_count(self, job: str) -> int:
        return sum(1 for (j, _, _) in self._by_slot if j == job)

    def release_segment(self, job: str, rank: int, slot: Slot) -> None:
        name = self._by_slot.pop((job, rank, slot.index), None)
        if name is None:
            return
        held = self._held.pop(name, None)
        if held is not None and held.segment is not None:
            held.segment.close()
        shm.unlink(name)
        self.unlink_manifest(name)

    def forget_freed(self, job_id: str, freed) -> None:
        """Slots the ledger freed ((rank, slot index)...): their manifests go. The file
        stays until the segment is released (the next delivery into the segment writes
        over it; a restart reads manifests of committed slots only, and removes those
        of segments it does not keep)."""
        for r, idx in freed:
            n = self._by_slot.get((job_id, r, idx))
            if n is not None:
                self._held[n].manifest = None

    # -- aux segments -------------------------------------------------------------------
    def add_aux(self, name: str, seg: shm.Segment, size: int) -> None:
        self._aux[name], self._aux_sizes[name] = seg, size

    def pop_aux(self, name: str) -> shm.Segment | None:
        self._aux_sizes.pop(name, None)
        return self._aux.pop(name, None)

    def aux(self, name: str) -> shm.Segment | None:
        return self._aux.get(name)

    def aux_names(self) -> list[str]:
        return sorted(self._aux)

    # -- accounting ---------------------------------------------------------------
    def bytes_reserved(self) -> int:
        with self.lock:
            return sum(led.bytes_allocated() for led in self.jobs.values()) + \
                sum(self._aux_sizes.values())

    def bytes_committed(self) -> int:
        with self.lock:
            total = 0
            for (job, r, idx), name in self._by_slot.items():
                m = self._held[name].manifest
                if m is not None and self.jobs[job].slots[r][idx].state is SlotState.COMMITTED:
                    total += m.payload_bytes
            return total

    def make_room(self, needed: int, keep: tuple[str, int, int] | None = None) -> None:
        """Ensure ``needed`` more bytes fit the budget, releasing FREE segments if needed.

        ``keep`` (job, rank, slot) is the slot being resized: it is not released (its
        current size is already accounted for in ``needed``). If releasing every other
        FREE segment would not be enough, nothing is released.
        """
        if self.bytes_reserved() + needed <= self.memory_budget_bytes:
            return
        releasable = sum(s.size for job, led in self.jobs.items() for r, ss in led.slots.items()
                         for s in ss if s.state is SlotState.FREE and (job, r, s.index) != keep)
        if self.bytes_reserved() - releasable + needed > self.memory_budget_bytes:
            raise self.refuse(MemoryBudgetExceededError(
                f"{needed} more bytes would exceed the memory budget of "
                f"{self.memory_budget_bytes} bytes ({self.bytes_reserved()} reserved)"
            ))
        for job, led in self.jobs.items():
            for r, ss in led.slots.items():
                for s in ss:
                    if s.state is SlotState.FREE and s.size and (job, r, s.index) != keep:
                        self.release_segment(job, r, s)
                        s.size = 0
                        if self.bytes_reserved() + needed <= self.memory_budget_bytes:
                            return
        raise self.refuse(MemoryBudgetExceededError(
            f"{needed} more bytes would exceed the memory budget of "
            f"{self.memory_budget_bytes} bytes ({self.bytes_reserved()} reserved)"
        ))

    # -- the durable index ----------------------------------------------------------------
    def persist(self) -> None:
        doc = {"format": INDEX_FORMAT, "node_id": self.node_id, "jobs": {},
               "aux": dict(self._aux_sizes)}
        for job, led in self.jobs.items():
            doc["jobs"][job] = {
                "world_size": led.world_size,
                "local_world_size": led.local_world_size,
                "committed_version": led.committed_version,
                "last_activity": self.activity.get(job, 0.0),
                "slots": {
                    str(r): [[s.size, s.state.value, s.version, s.generation] for s in ss]
                    for r, ss in led.slots.items()
                },
            }
        # One write, never torn (a kill mid-write leaves the previous index whole; see
        # node.docfile), not fsynced: the index serves a *daemon* that died and restarts
        # on the same machine, whose page cache holds the file; a crash of the machine
        # takes /dev/shm, so the segments it names, with it. An fsync here cost
        # milliseconds of every save, a write and rename ~0.12 ms of CPU (issue 16).
        self._index.save(doc)

    def recover(self) -> None:
        """Re-adopt committed segments named in the index; clean up everything else."""
        doc = {"jobs": {}}
        try:
            doc = self._index.load() or doc
        except (OSError, ValueError) as exc:
            log.error("index %s unreadable (%s); starting empty", self._index.path, exc)
        now = self.clock()
        for job, j in doc.get("jobs", {}).items():
            self.jobs[job] = self._recover_job(job, j)
            last = j.get("last_activity")
            self.activity[job] = float(last) if isinstance(last, (int, float)) and last > 0 else now
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
        self.persist()
        if self.jobs:
            log.info("recovered %d job(s): %s", len(self.jobs), {
                j: led.committed_version for j, led in self.jobs.items()})

    def _recover_job(self, job: str, j: dict) -> JobLedger:
        led = self.new_ledger(job, int(j["world_size"]), int(j.get("local_world_size", 0)),
                              committed_version=int(j["committed_version"]))
        for r, ss in j["slots"].items():
            led.slots[int(r)] = [
                Slot(index=i, size=size, state=SlotState(st), version=v, generation=g)
                for i, (size, st, v, g) in enumerate(ss)
            ]
        led.abandon_uncommitted()
        lost = []
        for r, ss in led.slots.items():
            for s in ss:
                name = self.segment_name(job, r, s)
                if s.state is SlotState.COMMITTED:
                    try:
                        seg = shm.open_segment(name, writable=True)
                        with open(self.manifest_path(name), "rb") as f:
                            m = pb.ShardManifest.FromString(f.read())
                        if seg.size != s.size or m.version != s.version:
                            raise ValueError("size or version differs from the index")
                    except (OSError, ValueError) as exc:
                        lost.append((r, name, str(exc)))
                        continue
                    self.hold(job, r, s.index, name, Held(seg, m))
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
        return led

    def close(self) -> None:
        """Unmap (not unlink) everything: the segments stay for the next daemon."""
        with self.lock:
            for h in self._held.values():
                if h.segment is not None:
                    h.segment.close()
            self._held.clear()
            for seg in self._aux.values():
                seg.close()
