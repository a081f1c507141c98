"""Commit state of one job on one daemon: staging slots, deliveries, commits (pure).

Each rank of a job owns a small ring of shared-memory *slots* (at most
``max_slots_per_rank``, default 3). A slot is in one of four states:

    FREE       holds nothing that matters; may be written
    STAGING    handed to the trainer for version v; being written
    PENDING    v delivered by this rank, not yet delivered by all ranks
    COMMITTED  v delivered by every rank: the version restores come from

Order of calls for one version v of one rank:
    1) ``acquire(rank, v, nbytes)`` -> :class:`StagingPlan` (which slot, resize or not)
    2) the caller (the store) sizes the segment and the trainer writes it
    3) ``deliver(rank, v)`` -> :class:`Delivery` (did v commit, which slots were freed)

A COMMITTED slot is never handed out for staging, so a crash in the middle of a copy
can never damage the last committed version. When v commits, the previous committed
slots and every PENDING slot of an older version become FREE (those versions can never
commit any more). If a rank needs a slot and all of them are busy (versions still
waiting for other ranks or nodes), the new snapshot is refused (SnapshotInFlightError)
rather than dropping an older one: dropping would let a fast rank starve every commit.
The client waits a while and then asks with ``force``, which gives up the oldest
uncommitted version (it was torn: some rank or node never delivered it).

Ranks converge (a restarted daemon, ranks that reconnect at different steps): a rank
delivers its versions in increasing order, so once a rank of this node has asked for
version w, every version u < w it has not delivered can never commit. Such a version
is abandoned at once (its slots of every rank become FREE: ``abandon_dead``, called by
``acquire``), and a rank asking to stage a version that is already dead is told to skip
it (SnapshotSkippedError). When a rank's slots are all busy with versions that wait for
a *local* rank (one that is behind, or away), waiting cannot help a job whose ranks run
in lockstep (data parallelism): the snapshot is skipped at once (SnapshotSkippedError,
nothing changes) instead of refused for a wait. The client waits (SnapshotInFlightError)
only while every local rank has delivered the versions or is staging them (a hand-off
under way, or the other node(s) still to commit). Skipping never gives anything up, so a slow
rank cannot be starved by a fast one. The highest version each rank asked for is kept
in memory only (``last_asked``); a job restart (``abandon_uncommitted``) forgets it,
and a rank that asks for a lower version than before (a new run) starts its record over.

No I/O, no clocks, no threads: the store holds a lock around calls and carries out
the plans (creating, resizing and unlinking segments, persisting the index).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from snapshotd.wire.errors import (
    ConflictError,
    InvalidRequestError,
    SnapshotInFlightError,
    SnapshotSkippedError,
    UnknownRankError,
)


class SlotState(str, enum.Enum):
    FREE = "free"
    STAGING = "staging"
    PENDING = "pending"
    COMMITTED = "committed"


@dataclass
class Slot:
    index: int
    size: int = 0  # bytes of the backing segment (0 = not created yet)
    state: SlotState = SlotState.FREE
    version: int = 0
    generation: int = 0  # bumped whenever the segment is recreated with a new size


@dataclass(frozen=True)
class StagingPlan:
    rank: int
    slot: int
    new_size: int | None  # None: reuse the segment as it is; else (re)create this size
    old_size: int
    generation: int


@dataclass(frozen=True)
class Delivery:
    committed: bool
    version: int
    freed: tuple[tuple[int, int], ...] = ()  # (rank, slot) that became FREE
    local_complete: bool = False  # every local rank has delivered ``version``


@dataclass
class JobLedger:
    """``world_size`` counts the job's ranks, ``local_world_size`` those on this node
    (0 = all of them). With ``auto_commit`` (one node) a version commits as soon as
    every local rank delivered it; in a cluster the caller commits it (``commit``)
    once every node holds its data and parity."""

    job_id: str
    world_size: int
    max_slots_per_rank: int = 3
    committed_version: int = 0
    slots: dict[int, list[Slot]] = field(default_factory=dict)
    local_world_size: int = 0
    auto_commit: bool = True
    # rank -> the highest version it asked to stage (in memory only; see the module docstring)
    last_asked: dict[int, int] = field(default_factory=dict)
    # versions a rebuild is installing (committed elsewhere): never abandoned as dead
    installing: set[int] = field(default_factory=set)
    # uncommitted version -> the world size it is being written at (in memory only):
    # two runs of different sizes writing one version is a conflict, not a mixture
    version_world: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise InvalidRequestError(f"job {self.job_id!r}: world_size must be >= 1")
        if self.local_world_size == 0:
            self.local_world_size = self.world_size
        if not 1 <= self.local_world_size <= self.world_size:
            raise InvalidRequestError(
                f"job {self.job_id!r}: local_world_size must be in [1, world_size]")
        if self.max_slots_per_rank < 2:
            raise InvalidRequestError("max_slots_per_rank must be >= 2")
        for r in range(self.world_size):
            self.slots.setdefault(r, [])

    # -- queries -------------------------------------------------------------
    def check_rank(self, rank: int) -> None:
        """UnknownRankError unless ``rank`` is one of the job's ranks."""
        self._rank_slots(rank)

    def _rank_slots(self, rank: int) -> list[Slot]:
        """Slots of ``rank``: a rank of the layout being saved, or of an older layout
        whose committed shard is still held (readable, never written: ``_save_slots``)."""
        if not 0 <= rank < self.world_size and rank not in self.slots:
            raise UnknownRankError(
                f"job {self.job_id!r} has ranks 0..{self.world_size - 1}, not {rank}"
            )
        return self.slots[rank]

    def _save_slots(self, rank: int) -> list[Slot]:
        if not 0 <= rank < self.world_size:
            raise UnknownRankError(
                f"job {self.job_id!r} is saved at world_size {self.world_size}: ranks "
                f"0..{self.world_size - 1}, not {rank}")
        return self.slots[rank]

    def relayout(self, world_size: int, local_world_size: int = 0) -> None:
        """Save at a new world size from now on. The committed version keeps its layout:
        the slots of ranks the new size no longer has stay readable until a version of
        the new layout commits (then ``retired_ranks`` names them). Uncommitted versions
        of the old layout stay as they are (a fence or a commit word decides them)."""
        if world_size < 1 or not 0 <= local_world_size <= world_size:
            raise InvalidRequestError(
                f"job {self.job_id!r}: world_size {world_size}, local_world_size {local_world_size}")
        self.world_size = world_size
        self.local_world_size = local_world_size or world_size
        for r in range(world_size):
            self.slots.setdefault(r, [])
        self.last_asked = {r: v for r, v in self.last_asked.items() if r < world_size}

    def retired_ranks(self) -> list[int]:
        """Ranks outside the layout being saved that hold nothing committed or pending:
        the caller releases their segments and ``forget_rank``s them."""
        return sorted(r for r, ss in self.slots.items() if r >= self.world_size and not any(
            s.state in (SlotState.COMMITTED, SlotState.PENDING) for s in ss))

    def forget_rank(self, rank: int) -> None:
        if rank < self.world_size:
            raise InvalidRequestError(f"job {self.job_id!r}: rank {rank} is still in the layout")
        self.slots.pop(rank, None)

    def slot_of(self, rank: int, version: int, *states: SlotState) -> Slot | None:
        for s in self._rank_slots(rank):
            if s.version == version and s.state in states:
                return s
        return None

    def committed_slot(self, rank: int) -> Slot | None:
        for s in self._rank_slots(rank):
            if s.state is SlotState.COMMITTED:
                return s
        return None

    def delivered_ranks(self, version: int) -> list[int]:
        return [
            r
            for r in sorted(self.slots)
            if self.slot_of(r, version, SlotState.PENDING, SlotState.COMMITTED)
        ]

    def missing_ranks(self, version: int) -> list[int]:
        """Ranks that have not delivered ``version`` (all ranks for one node; in a
        cluster, empty once the node's ``local_world_size`` ranks delivered)."""
        have = {r for r in self.delivered_ranks(version) if r < self.world_size}
        if len(have) >= self.local_world_size:
            return []
        return [r for r in range(self.world_size) if r not in have]

    def local_ranks(self) -> list[int]:
        return sorted(r for r, ss in self.slots.items() if ss)

    def versions(self) -> list[int]:
        vs = {s.version for ss in self.slots.values() for s in ss
              if s.state in (SlotState.PENDING, SlotState.COMMITTED)}
        return sorted(vs)

    def bytes_allocated(self) -> int:
        return sum(s.size for ss in self.slots.values() for s in ss)

    def dead_versions(self) -> list[int]:
        """Uncommitted versions that can never commit: a rank asked for a newer version
        without having delivered them (ranks deliver in increasing order)."""
        dead = []
        for v in self.versions():
            if v <= self.committed_version or v in self.installing:
                continue
            have = set(self.delivered_ranks(v))
            if any(r not in have and asked > v for r, asked in self.last_asked.items()):
                dead.append(v)
        return dead

    def skipped_by(self, version: int) -> list[int]:
        """Ranks that asked for a newer version than ``version`` without delivering it."""
        have = set(self.delivered_ranks(version))
        return sorted(r for r, asked in self.last_asked.items() if asked > version and r not in have)

    def _locally_under_way(self, version: int) -> bool:
        """Every local rank delivered ``version`` or is staging it right now."""
        ranks = {r for r in range(self.world_size)
                 if self.slot_of(r, version, SlotState.PENDING, SlotState.COMMITTED,
                                 SlotState.STAGING)}
        return len(ranks) >= self.local_world_size

    # -- transitions ---------------------------------------------------------
    def abandon_dead(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Free the slots of every version that can never commit (``dead_versions``);
        returns (those versions, the freed (rank, slot) pairs)."""
        dead = self.dead_versions()
        freed = []
        for r, ss in self.slots.items():
            for s in ss:
                if s.state is SlotState.PENDING and s.version in dead:
                    s.state, s.version = SlotState.FREE, 0
                    freed.append((r, s.index))
        return dead, freed

    def note_asked(self, rank: int, version: int) -> None:
        """Record that ``rank`` asked to stage ``version`` (see ``acquire``)."""
        self._save_slots(rank)
        prev = self.last_asked.get(rank, 0)
        if version < prev:  # a new run of the rank (it restarted without a fence)
            self.last_asked = {r: v for r, v in self.last_asked.items() if v <= version}
        self.last_asked[rank] = version

    def acquire(self, rank: int, version: int, nbytes: int, force: bool = False) -> StagingPlan:
        """``force``: when every slot is busy, give up this rank's oldest uncommitted
        version (it can then never commit) instead of refusing.

        Call ``note_asked(rank, version)`` and ``abandon_dead()`` first (the store does),
        so that versions this request makes dead do not hold slots."""
        slots = self._save_slots(rank)
        if version < 1:
            raise InvalidRequestError(f"version must be >= 1, got {version}")
        if nbytes < 0:
            raise InvalidRequestError(f"payload size must be >= 0, got {nbytes}")
        if version <= self.committed_version:
            raise ConflictError(
                f"job {self.job_id!r}: version {version} is not newer than the "
                f"committed version {self.committed_version}"
            )
        if self.slot_of(rank, version, SlotState.PENDING):
            raise ConflictError(
                f"job {self.job_id!r} rank {rank} already delivered version {version}"
            )
        other = self.version_world.get(version)
        if other is not None and other != self.world_size and any(
                s.version == version and s.state is not SlotState.FREE
                for ss in self.slots.values() for s in ss):
            raise ConflictError(
                f"job {self.job_id!r}: version {version} is being written at world_size {other} "
                f"and now at world_size {self.world_size}: two runs of different sizes use this "
                f"job id at once (give each its own job id; if the other run is gone, "
                f"`snapshotd jobs drop {self.job_id} --force` on each node starts the job over)")
        gone = self.skipped_by(version)
        if gone:
            raise SnapshotSkippedError(
                f"job {self.job_id!r} rank {rank}: version {version} can never commit (rank(s) "
                f"{gone} already moved past it without delivering it); skipping it")
        # A rank has one trainer: an earlier STAGING slot was abandoned (crash mid-copy).
        reusable = [s for s in slots if s.state in (SlotState.FREE, SlotState.STAGING)]
        if not reusable and len(slots) < self.max_slots_per_rank:
            slots.append(Slot(index=len(slots)))
            reusable = [slots[-1]]
        if not reusable:
            pending = sorted(s.version for s in slots if s.state is SlotState.PENDING)
            if force and pending:
                oldest = self.slot_of(rank, pending[0], SlotState.PENDING)
                oldest.state, oldest.version = SlotState.FREE, 0
                reusable = [oldest]
        if not reusable:
            behind = [v for v in pending if not self._locally_under_way(v)]
            if behind and not force:
                # A local rank has not even started them (it is behind, or away): waiting
                # would stall ranks that run in lockstep; skip this one, give up nothing.
                waiting = sorted({r for v in behind for r in self.missing_ranks(v)})
                raise SnapshotSkippedError(
                    f"job {self.job_id!r} rank {rank}: versions {pending} wait for rank(s) "
                    f"{waiting} of this node and all {self.max_slots_per_rank} slots are busy; "
                    f"skipping version {version}")
            raise SnapshotInFlightError(
                f"job {self.job_id!r} rank {rank}: versions {pending} are not committed yet and "
                f"all {self.max_slots_per_rank} slots are busy; skipping version {version}")
        # Prefer a slot that already fits (warm pages), then the largest one.
        fitting = [s for s in reusable if s.size >= nbytes and s.size > 0]
        slot = min(fitting, key=lambda s: s.size) if fitting else max(reusable, key=lambda s: s.size)
        new_size = None if (slot.size >= nbytes and slot.size > 0) else max(nbytes, 1)
        return StagingPlan(
            rank=rank, slot=slot.index, new_size=new_size, old_size=slot.size,
            generation=slot.generation + (1 if new_size is not None else 0),
        )

    def apply_staging(self, plan: StagingPlan, version: int) -> Slot:
        """Record that the store carried out ``plan`` for ``version``."""
        slot = self._rank_slots(plan.rank)[plan.slot]
        if plan.new_size is not None:
            slot.size = plan.new_size
            slot.generation = plan.generation
        slot.state = SlotState.STAGING
        slot.version = version
        self.version_world[version] = self.world_size
        return slot

    def deliver(self, rank: int, version: int) -> Delivery:
        slot = self.slot_of(rank, version, SlotState.STAGING)
        if slot is None:
            raise ConflictError(
                f"job {self.job_id!r} rank {rank}: no staging slot for version {version} "
                "(acquire one first, or it was superseded)"
            )
        if version <= self.committed_version:
            slot.state = SlotState.FREE
            raise ConflictError(
                f"job {self.job_id!r}: version {version} is not newer than the "
                f"committed version {self.committed_version}"
            )
        slot.state = SlotState.PENDING
        if self.missing_ranks(version):
            return Delivery(committed=False, version=version)
        if not self.auto_commit:
            return Delivery(committed=False, version=version, local_complete=True)
        d = self.commit(version)
        return Delivery(True, version, d.freed, local_complete=True)

    def install_committed(self, rank: int, version: int, size: int) -> Slot:
        """Rebuild: a slot that holds ``version`` for ``rank`` rebuilt from peers.
        The caller creates the segment (``generation`` is bumped) and then commits.
        ``rank`` may be one of an older layout (the version keeps the layout it had)."""
        if rank < 0:
            raise UnknownRankError(f"job {self.job_id!r}: no rank {rank}")
        slots = self.slots.setdefault(rank, [])
        slot = next((s for s in slots if s.state is SlotState.FREE), None)
        if slot is None:
            if len(slots) >= self.max_slots_per_rank:
                raise ConflictError(f"job {self.job_id!r} rank {rank}: no slot to rebuild into")
            slot = Slot(index=len(slots))
            slots.append(slot)
        slot.size, slot.generation = size, slot.generation + 1
        slot.state, slot.version = SlotState.PENDING, version
        self.installing.add(version)
        return slot

    def commit(self, version: int) -> Delivery:
        """Commit ``version``: its pending slots become the committed ones, and every
        older slot is freed. Idempotent: committing the committed version again (a
        rebuild and a promotion racing to commit it) keeps its slots and commits any
        of its slots still pending."""
        if version < self.committed_version:
            return Delivery(committed=False, version=version)
        freed = []
        for r, ss in self.slots.items():
            for s in ss:
                if s.version == version and s.state is SlotState.PENDING:
                    s.state = SlotState.COMMITTED
                elif (s.state is SlotState.COMMITTED and s.version != version) or (
                    s.state is SlotState.PENDING and s.version < version
                ):
                    s.state = SlotState.FREE
                    s.version = 0
                    freed.append((r, s.index))
        if version > self.committed_version:
            self.committed_version = version
        self.installing = {v for v in self.installing if v > version}
        self.version_world = {v: w for v, w in self.version_world.items() if v > version}
        return Delivery(committed=True, version=version, freed=tuple(freed))

    def abandon_uncommitted(self, keep_version: int = 0) -> list[tuple[int, int]]:
        """After a daemon restart or a job restart (fence): everything not committed
        is FREE again, except the pending slots of ``keep_version`` (> 0): a version
        committed elsewhere that a rebuild is installing here."""
        freed = []
        self.last_asked.clear()  # the job's ranks start over
        self.version_world = {v: w for v, w in self.version_world.items() if v == keep_version}
        for r, ss in self.slots.items():
            for s in ss:
                if keep_version and s.version == keep_version and s.state is SlotState.PENDING:
                    continue
                if s.state is not SlotState.COMMITTED and s.state is not SlotState.FREE:
                    s.state = SlotState.FREE
                    s.version = 0
                    freed.append((r, s.index))
        return freed
