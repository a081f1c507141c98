"""The trainer side of the store: jobs, staging and delivery of shards, restores.

Carries out the plans of :class:`snapshotd.core.ledger.JobLedger` on the segments of a
:class:`~snapshotd.node.store_state.StoreState`. Call order per rank and version:
``register_job`` once, then ``acquire_staging`` (a segment the trainer writes) and
``adopt`` it, or ``push`` the payload over the network; then ``commit`` asks whether the
version committed, ``committed_shard`` reads it back.

Thread-safety: every public method may be called from any gRPC worker thread. State
changes happen under ``state.lock``; hashing of large payloads happens outside it.
Budget: a segment's bytes are reserved (and, with posix_fallocate, really allocated)
before a trainer may write a byte, and a request that would exceed the budget or the
free space of /dev/shm is refused with MemoryBudgetExceededError. Nothing changes then.
``commit_hook(job, version)``, when set, is called (outside the lock) once every local
rank delivered a version that does not commit by itself (cluster mode).
"""

from __future__ import annotations

import copy
import logging
import os

from snapshotd.wire import manifest as mf
from snapshotd.wire import shm
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (
    ConflictError,
    InvalidRequestError,
    MemoryBudgetExceededError,
    VersionNotFoundError,
)
from snapshotd.core.ledger import SlotState
from snapshotd.node.store_push import stage_push
from snapshotd.node.store_state import Held, StoreState
from snapshotd.node.store_verify import PayloadVerifier

log = logging.getLogger("snapshotd.store")


class TrainerStore:
    """What the trainers' RPCs do to the store (see the module docstring)."""

    def __init__(self, state: StoreState, verifier: PayloadVerifier, verify_on_adopt: bool = True):
        self.state = state
        self.verifier = verifier
        self.verify_on_adopt = verify_on_adopt
        self.commit_hook = None
        # An adopted manifest's tensor entries are walked only when its layout differs
        # from the last one of its (job, rank) that passed (wire.manifest.LayoutCache).
        self.layouts = mf.LayoutCache()

    # -- jobs -----------------------------------------------------------------------
    def register_job(self, job_id: str, world_size: int, local_world_size: int = 0,
                     restarting: bool = False) -> int:
        """``local_world_size``: ranks of the job on this node (0 = all; one node).
        ``restarting``: drop the job's uncommitted versions (see ``fence``)."""
        st = self.state
        mf.validate_job_id(job_id)
        if not 1 <= world_size <= 1 << 20:
            raise st.refuse(InvalidRequestError(f"world_size must be in [1, 2^20], got {world_size}"))
        if not 0 <= local_world_size <= world_size:
            raise st.refuse(InvalidRequestError(
                f"local_world_size must be in [0, world_size={world_size}], got {local_world_size}"))
        with st.lock:
            led = st.jobs.get(job_id)
            if led is not None:
                if restarting:
                    self.fence(job_id)
                if led.world_size != world_size or (
                        local_world_size and led.local_world_size != local_world_size):
                    # A relaunch at another size: the committed version keeps its layout
                    # (its old ranks stay readable), new saves use the new one. Two live
                    # runs of different sizes on one job id collide when both write one
                    # version (the ledger's ConflictError at acquire).
                    log.info("job %s: world_size %d (local %d) -> %d (local %d); version %d "
                             "keeps its layout", job_id, led.world_size, led.local_world_size,
                             world_size, local_world_size or world_size, led.committed_version)
                    led.relayout(world_size, local_world_size)
                    self._retire_ranks(job_id, led)
                    st.touch(job_id)
                    st.persist()
                    return led.committed_version
                st.touch(job_id)
                return led.committed_version
            st.jobs[job_id] = st.new_ledger(job_id, world_size, local_world_size)
            st.touch(job_id)
            st.persist()
            return 0

    def _retire_ranks(self, job_id: str, led) -> None:
        """Release the segments of ranks an older layout had and the current one has not,
        once nothing of theirs is committed or pending (under the lock)."""
        for r in led.retired_ranks():
            for s in led.slots.get(r, []):
                self.state.release_segment(job_id, r, s)
            led.forget_rank(r)

    def fence(self, job_id: str, keep_version: int = 0) -> list[tuple[int, int]]:
        """Free every uncommitted slot of the job (its trainers start over), but those
        of ``keep_version`` (a version committed elsewhere, being rebuilt here)."""
        st = self.state
        with st.lock:
            led = st.jobs.get(job_id)
            if led is None:
                return []
            freed = led.abandon_uncommitted(keep_version)
            st.forget_freed(job_id, freed)
            if freed:
                st.persist()
            return freed

    def drop_job(self, job_id: str) -> int:
        st = self.state
        with st.lock:
            led = st.job(job_id)
            freed = led.bytes_allocated()
            for r, ss in led.slots.items():
                for s in ss:
                    st.release_segment(job_id, r, s)
            st.forget_job(job_id)
            st.persist()
            self.layouts.forget(lambda key: key[0] == job_id)
            return freed

    # -- writing a shard --------------------------------------------------------------
    def _refuse_early(self, job_id: str, led, rank: int, version: int, nbytes: int,
                      force: bool, reserve: int = 0) -> None:
        """Raise the memory-budget refusal an acquire would end in, before it changes
        anything (under the lock). Asking for a version tells the ledger that the rank moved
        past the versions it never delivered, which frees them; an acquire refused for want
        of memory must not have done that (found by the service fuzzer). So the acquire is
        planned on a copy of the ledger first, and the budget checked against it.

        Planning changes no slot's size (only ``apply_staging`` does), so the trial
        reserves what the store reserves now and needs at most ``max(nbytes, 1)`` more:
        when that fits, no plan can be refused for memory, and the copy (the largest
        part of an acquire's CPU) is skipped.

        ``reserve``: bytes that must stay free or releasable (FREE slots) once the slot is
        granted, e.g. the parity buffers the job's versions in flight still need (a
        stage-ahead must not take their room, issue 18); checked even when the plan
        reuses a slot, since a reused FREE slot is room make_room could have released."""
        st = self.state
        if st.bytes_reserved() + max(nbytes, 1) + reserve <= st.memory_budget_bytes:
            return
        trial = copy.deepcopy(led)
        if version > trial.committed_version:
            trial.note_asked(rank, version)
        trial.abandon_dead()
        try:
            plan = trial.acquire(rank, version, nbytes, force)
        except Exception:  # the ledger's own refusals: raised by the real acquire below
            return
        if plan.new_size is None and not reserve:
            return
        needed = max(plan.new_size - plan.old_size, 0) if plan.new_size is not None else 0
        reserved = st.bytes_reserved() - led.bytes_allocated() + trial.bytes_allocated()
        if reserved + needed + reserve <= st.memory_budget_bytes:
            return
        ledgers = [trial if j == job_id else other for j, other in st.jobs.items()]
        releasable = sum(sl.size for lg in ledgers for r, ss in lg.slots.items() for sl in ss
                         if sl.state is SlotState.FREE and not (lg is trial and r == rank and sl.index == plan.slot))
        if reserved - releasable + needed + reserve > st.memory_budget_bytes:
            held_back = f", {reserve} kept for the parity of versions in flight" if reserve else ""
            raise MemoryBudgetExceededError(
                f"{needed} more bytes would exceed the memory budget of "
                f"{st.memory_budget_bytes} bytes ({reserved} reserved{held_back})")

    def acquire_for_writer(self, job_id: str, rank: int, version: int, nbytes: int,
                           force: bool = False, writer_id: str = "",
                           reserve: int = 0) -> tuple[str, int, int]:
        """``acquire_staging`` for a named writer: (name, size, content token). The token
        is the one this writer got at its last acquire of the segment unless anything else
        may have written it since (see ``Held``; docs/INCREMENTAL.md). ``reserve``: see
        ``_refuse_early``."""
        if len(writer_id) > 64:
            raise self.state.refuse(InvalidRequestError(
                f"writer_id has {len(writer_id)} characters; at most 64"))
        with self.state.lock:
            name, size = self.acquire_staging(job_id, rank, version, nbytes, force, writer_id, reserve)
            return name, size, self.state.held(name).content_token

    def acquire_staging(self, job_id: str, rank: int, version: int, nbytes: int,
                        force: bool = False, writer_id: str = "", reserve: int = 0) -> tuple[str, int]:
        st = self.state
        reserve = max(int(reserve), 0)
        with st.lock:
            led = st.job(job_id)
            st.touch(job_id)
            try:
                self._refuse_early(job_id, led, rank, version, nbytes, force, reserve)
                if version > led.committed_version:
                    led.note_asked(rank, version)
                self._abandon_dead(job_id, led)
                self._retire_ranks(job_id, led)
                plan = led.acquire(rank, version, nbytes, force)
            except Exception as exc:
                raise st.refuse(exc)
            slot = led.slots[rank][plan.slot]
            if plan.new_size is not None:
                delta = plan.new_size - plan.old_size
                st.make_room(max(delta, 0), keep=(job_id, rank, slot.index))
                if delta > shm.free_bytes():
                    raise st.refuse(MemoryBudgetExceededError(
                        f"{shm.SHM_DIR} has {shm.free_bytes()} bytes free, {delta} needed"))
                st.release_segment(job_id, rank, slot)
                slot.size = 0
                name = f"{st.prefix}{job_id}.r{rank}.s{slot.index}.g{plan.generation}"
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
                    raise st.refuse(MemoryBudgetExceededError(
                        f"cannot allocate {plan.new_size} bytes in {shm.SHM_DIR}: {exc}"))
                st.hold(job_id, rank, slot.index, name, Held(seg, None))
            slot = led.apply_staging(plan, version)
            name = st.name_at(job_id, rank, slot.index)
            held = st.held(name)
            held.manifest = None
            if not writer_id or writer_id != held.writer_id:
                held.renew_token(writer_id)  # its contents are nobody's to reuse now
            # No index write: staging takes a FREE or STAGING slot, never a committed one,
            # and a restart abandons every uncommitted slot and unlinks segments the index
            # does not hold committed; what the index must get right is what committed.
            return name, slot.size

    def adopt(self, segment_name: str, m: pb.ShardManifest) -> tuple[bool, int]:
        """Take ownership of a staged segment as ``m.rank``'s shard of ``m.version``."""
        return self.adopt_hinted(segment_name, m)[:2]

    def adopt_hinted(self, segment_name: str, m: pb.ShardManifest,
                     hint: pb.IncrementalHint | None = None, raw: bytes | None = None,
                     owned: bool = False) -> tuple[bool, int, int]:
        """``adopt`` with an optional IncrementalHint: (committed, latest committed,
        payload bytes hashed). The hint is used only when this segment's last adoption
        under the hint's content token was its base version with the same payload and
        block size; then only the dirty blocks are hashed (and, with checksums from the
        client, the others must equal that adoption's). A malformed bitmap is refused.
        ``raw``: ``m`` as it was sent, if known (``m`` must be what it parses to): the
        layout check compares bytes with it (``LayoutCache``). ``owned``: ``m`` is the
        caller's to give away (a request parsed for this call): the store keeps it and
        fills in its checksums instead of working on a copy."""
        st = self.state
        try:
            self.layouts.validate((m.job_id, m.rank), m, raw=raw)
        except Exception as exc:
            raise st.refuse(exc)
        with st.lock:
            led = st.job(m.job_id)
            slot = led.slot_of(m.rank, m.version, SlotState.STAGING)
            name = st.name_at(m.job_id, m.rank, slot.index) if slot else None
            if name != segment_name:
                raise st.refuse(ConflictError(
                    f"segment {segment_name!r} is not the staging segment of job "
                    f"{m.job_id!r} rank {m.rank} version {m.version}"))
            held = st.held(name)
            seg, token = held.segment, held.content_token
            if m.payload_bytes > slot.size:
                raise st.refuse(InvalidRequestError(
                    f"payload of {m.payload_bytes} bytes does not fit the {slot.size}-byte segment"))
            base = self._hint_base(held, m, hint) if hint is not None else None
        if not owned:
            m = _copy(m)
        buf = seg.buf if seg.buf is not None else b""
        what = f"adopted segment {segment_name}"
        try:
            if base is not None:
                hashed = self._checksum_dirty(buf, m, base, hint.dirty_blocks, what)
            elif m.block_checksums and self.verify_on_adopt:
                self.verifier.verify_payload(buf, m, what)
                hashed = m.payload_bytes
            elif not m.block_checksums:
                m.block_checksums.extend(self.verifier.checksums(buf, m))
                hashed = m.payload_bytes
            else:
                hashed = 0
        except Exception as exc:
            raise st.refuse(exc)
        committed, latest = self._deliver(m, name, token)
        return committed, latest, hashed

    def _hint_base(self, held, m: pb.ShardManifest, hint) -> list[int] | None:
        """The checksums an IncrementalHint may reuse (under the lock), else None."""
        nb = mf.num_blocks(m.payload_bytes, m.block_size_bytes)
        if len(hint.dirty_blocks) != (nb + 7) // 8:
            raise self.state.refuse(InvalidRequestError(
                f"incremental hint: {len(hint.dirty_blocks)} bitmap bytes for {nb} blocks "
                f"(need {(nb + 7) // 8})"))
        c = held.clean
        if (c is None or hint.content_token != held.content_token or c[0] != hint.base_version
                or c[1] != m.block_size_bytes or c[2] != m.payload_bytes):
            return None
        return c[3]

    def _checksum_dirty(self, buf, m: pb.ShardManifest, base: list[int], bitmap: bytes,
                        what: str) -> int:
        """Checksums of ``m``'s payload: the dirty blocks hashed, the others ``base``'s.
        Returns the bytes hashed."""
        bs, n = m.block_size_bytes, m.payload_bytes
        if m.block_checksums and not self.verify_on_adopt:
            return 0  # the client's checksums, taken as they are (as without a hint)
        dirty = [i for i in range(len(base)) if bitmap[i >> 3] >> (i & 7) & 1]
        sums = list(base)
        for i, c in zip(dirty, self.verifier.checksums_of(buf, m, dirty)):
            sums[i] = c
        if not m.block_checksums:
            m.block_checksums.extend(sums)
        elif list(m.block_checksums) != sums:  # the client's: the same as ours, or refused
            bad = [i for i, (a, b) in enumerate(zip(sums, m.block_checksums)) if a != b]
            mf.raise_mismatch(m, bad, len(sums), what)
        return sum(min(bs, n - i * bs) for i in dirty)

    def _deliver(self, m: pb.ShardManifest, name: str, token: int = 0) -> tuple[bool, int]:
        """``token``: an adoption's content token; its checksums become the segment's
        ``clean`` base if the token is still the segment's (a push passes none)."""
        st = self.state
        with st.lock:
            led = st.job(m.job_id)
            slot = led.slot_of(m.rank, m.version, SlotState.STAGING)
            if slot is None or st.name_at(m.job_id, m.rank, slot.index) != name:
                raise st.refuse(ConflictError(
                    f"job {m.job_id!r} rank {m.rank} version {m.version}: the staging slot "
                    "was taken over while the shard was verified"))
            data = st.write_manifest(name, m)
            held = st.held(name)
            held.manifest, held.written = m, (m, data)
            try:
                d = led.deliver(m.rank, m.version)
            except Exception as exc:
                held.manifest = None
                st.unlink_manifest(name)
                st.persist()
                raise st.refuse(exc)
            if token and token == held.content_token:
                held.clean = (m.version, m.block_size_bytes, m.payload_bytes, list(m.block_checksums))
            st.forget_freed(m.job_id, d.freed)
            st.touch(m.job_id)
            self._abandon_dead(m.job_id, led)
            if d.committed or d.freed:  # the committed state changed (see acquire)
                st.persist()
            hook = self.commit_hook if (d.local_complete and not d.committed) else None
            result = d.committed, led.committed_version
        if hook is not None:
            hook(m.job_id, m.version)
            with st.lock:  # a node without peers commits in the hook: the reply says so
                led = st.jobs.get(m.job_id)
                if led is not None:
                    result = result[0], led.committed_version
        return result

    def _abandon_dead(self, job_id: str, led) -> None:
        """Free the versions of the job that can never commit (under the lock)."""
        dead, freed = led.abandon_dead()
        if freed:
            self.state.forget_freed(job_id, freed)
            self.state.persist()
            log.info("job %s: version(s) %s can never commit (a rank moved past them without "
                     "delivering them): abandoned, %d slot(s) freed", job_id, dead, len(freed))

    def push(self, m: pb.ShardManifest, chunks) -> tuple[bool, int]:
        """Receive a shard over the network (``chunks``: the payload in order), verified
        before the store is touched, then delivered as an adopted one
        (:func:`snapshotd.node.store_push.stage_push`)."""
        name = stage_push(self.state, self.verifier, self.acquire_staging, m, chunks)
        return self._deliver(_copy(m), name)

    # -- commit and reading ---------------------------------------------------------------
    def commit(self, job_id: str, version: int) -> tuple[bool, list[int], int]:
        with self.state.lock:
            led = self.state.job(job_id)
            self.state.touch(job_id)
            if version and version == led.committed_version:
                return True, [], version
            missing = led.missing_ranks(version)
            return False, missing, led.committed_version

    def list_versions(self, job_id: str) -> tuple[int, list[tuple[int, bool, list[int], int]]]:
        with self.state.lock:
            led = self.state.job(job_id)
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
        st = self.state
        with st.lock:
            led = st.job(job_id)
            led.check_rank(rank)
            st.touch(job_id)
            if led.committed_version == 0:
                raise st.refuse(VersionNotFoundError(f"job {job_id!r} has no committed version"))
            if version not in (0, led.committed_version):
                raise st.refuse(VersionNotFoundError(
                    f"job {job_id!r}: version {version} is not held (latest committed: "
                    f"{led.committed_version})"))
            slot = led.committed_slot(rank)
            if slot is None:  # never expected: a committed version without the rank's slot
                raise st.refuse(VersionNotFoundError(
                    f"job {job_id!r}: rank {rank} has no committed shard here (committed version "
                    f"{led.committed_version})"))
            name = st.name_at(job_id, rank, slot.index)
            held = st.held(name)
        if verify:
            try:
                self.verifier.verify_payload(held.segment.buf if held.segment.buf is not None else b"",
                                             held.manifest, f"segment {name}")
            except Exception as exc:
                log.error("%s", exc)
                raise st.refuse(exc)
        return name, held.manifest, held.segment

    def stats(self) -> dict:
        st = self.state
        with st.lock:
            jobs = []
            for job, led in st.jobs.items():
                jobs.append({
                    "job_id": job, "world_size": led.world_size,
                    "latest_committed_version": led.committed_version,
                    "bytes_held": led.bytes_allocated(), "segments": st.segment_count(job),
                })
            return {
                "node_id": st.node_id, "memory_budget_bytes": st.memory_budget_bytes,
                "bytes_reserved": st.bytes_reserved(),
                "bytes_committed": st.bytes_committed(), "jobs": jobs,
                "requests_refused": st.requests_refused,
            }


def _copy(m: pb.ShardManifest) -> pb.ShardManifest:
    out = pb.ShardManifest()
    out.CopyFrom(m)
    return out
