"""The store's face towards the cluster layer (``snapshotd.node.cluster``).

A node's *data* for version v is the concatenation, in rank order, of its local ranks'
payloads, each cut into ``block_size`` blocks (a rank's last block is zero-padded), so
block j of a node always means the same bytes on every node that reasons about it
(:mod:`snapshotd.core.blockmap` is that walk). Parity and other cluster-owned bytes live
in *aux* segments that count against the same memory budget and are re-adopted after a
restart like the shards.

What the cluster reads and does: ``committed_version``, ``jobs_summary``, ``holds_rank``,
``local_shards``, ``block_reader``; ``commit_version`` (a version every node holds),
``fence``; ``install_rebuilt`` then ``verify_shard`` (a shard rebuilt from peers);
``verify_payload`` (a copy fetched from a peer); ``create_aux`` / ``aux`` / ``aux_names``
/ ``release_aux``. Thread-safety: every method may be called from any thread; state
changes happen under the store's one lock, block reads and hashing outside it.
"""

from __future__ import annotations

import numpy as np
import xxhash

from snapshotd.wire import shm
from snapshotd.wire.errors import ChecksumMismatchError, MemoryBudgetExceededError, VersionNotFoundError
from snapshotd.core.blockmap import map_manifests
from snapshotd.core.ledger import SlotState
from snapshotd.node.store_state import Held, StoreState
from snapshotd.node.store_trainer import TrainerStore
from snapshotd.node.store_verify import PayloadVerifier

__all__ = ["ClusterView", "Held"]


class ClusterView:
    """The cluster layer's view of one node's store (see the module docstring).

    ``trainer``: the trainer side, for ``register_job`` and ``fence`` (a rebuilt job is
    registered as if its trainers had; a fence frees the same slots for both).
    """

    def __init__(self, state: StoreState, verifier: PayloadVerifier, trainer: TrainerStore):
        self.state = state
        self.verifier = verifier
        self.trainer = trainer

    @property
    def state_dir(self) -> str:
        return self.state.state_dir

    @property
    def memory_budget_bytes(self) -> int:
        return self.state.memory_budget_bytes

    @property
    def unsafe_skip_verify(self) -> bool:
        return self.verifier.unsafe_skip_verify

    # -- reading what this node holds ----------------------------------------------
    def committed_version(self, job_id: str) -> int:
        with self.state.lock:
            led = self.state.jobs.get(job_id)
            return led.committed_version if led else 0

    def jobs_summary(self) -> dict:
        with self.state.lock:
            return {j: {"committed": led.committed_version, "world_size": led.world_size,
                        "local_world_size": led.local_world_size}
                    for j, led in self.state.jobs.items()}

    def holds_rank(self, job_id: str, rank: int) -> bool:
        with self.state.lock:
            led = self.state.jobs.get(job_id)
            return led is not None and rank in led.local_ranks()

    def _local_held(self, job_id: str, version: int) -> list:
        """[(rank, Held)] of the local ranks holding ``version``, by rank (under the lock)."""
        st = self.state
        led = st.job(job_id)
        out = []
        for r in led.local_ranks():
            slot = led.slot_of(r, version, SlotState.PENDING, SlotState.COMMITTED)
            if slot is not None:
                out.append((r, st.held(st.name_at(job_id, r, slot.index))))
        return out

    def local_shards(self, job_id: str, version: int) -> list:
        """[(rank, manifest, segment)] of the local ranks holding ``version``, by rank."""
        with self.state.lock:
            return [(r, held.manifest, held.segment) for r, held in self._local_held(job_id, version)]

    def local_manifests(self, job_id: str, version: int) -> tuple[list[int], list, list[bytes]]:
        """(ranks, manifests, each manifest serialised) of the local ranks holding
        ``version``, by rank: the bytes written to the manifest file at delivery while the
        manifest is still that object, else serialised now."""
        with self.state.lock:
            got = self._local_held(job_id, version)
            raws = [w[1] if (w := held.written) is not None and w[0] is held.manifest
                    else held.manifest.SerializeToString() for _, held in got]
            return [r for r, _ in got], [held.manifest for _, held in got], raws

    def block_reader(self, job_id: str, version: int, block_size: int, verify: bool = False,
                     with_checksum: bool = False):
        """A function j -> the node's data block j (``block_size`` bytes). With
        ``verify``, the block is checked against its manifest checksum first; with
        ``with_checksum`` it returns (block, stored xxh3 of exactly those bytes, or None
        for a zero-padded last block)."""
        shards = self.local_shards(job_id, version)
        if not shards:
            raise VersionNotFoundError(f"job {job_id!r}: version {version} is not held here")
        bmap = map_manifests([r for r, _, _ in shards], [m for _, m, _ in shards], block_size)
        held = {r: (m, seg) for r, m, seg in shards}
        unsafe = self.verifier.unsafe_skip_verify  # test-only: send what is there, unchecked

        def read(j: int):
            where = bmap.locate(j)
            if where is None:
                raise IndexError(f"job {job_id!r} v{version}: no data block {j} here "
                                 f"({bmap.total_blocks} blocks)")
            span, i = where
            m, seg = held[span.rank]
            off = i * block_size
            n = span.block_bytes(i, block_size)
            mv = memoryview(seg.buf)[off:off + n]
            if with_checksum and m.block_size_bytes == block_size and n == block_size and not unsafe:
                return mv, m.block_checksums[i]
            if (verify or with_checksum) and not unsafe:
                if m.block_size_bytes != block_size:
                    raise ChecksumMismatchError(
                        f"rank {m.rank}: manifest blocks of {m.block_size_bytes} bytes, "
                        f"cluster blocks of {block_size}")
                if xxhash.xxh3_64_intdigest(mv) != m.block_checksums[i]:
                    raise ChecksumMismatchError(
                        f"job {job_id!r} v{version} rank {m.rank}: data block {i} "
                        "is corrupt (checksum mismatch)")
            if n == block_size:
                return (mv, None) if with_checksum else mv
            out = np.zeros(block_size, np.uint8)  # a rank's last block, padded
            out[:n] = np.frombuffer(mv, np.uint8)
            return (memoryview(out), None) if with_checksum else memoryview(out)

        return read

    # -- committing in a cluster ------------------------------------------------------
    def commit_version(self, job_id: str, version: int) -> None:
        st = self.state
        with st.lock:
            led = st.job(job_id)
            d = led.commit(version)
            st.forget_freed(job_id, d.freed)
            st.persist()

    def fence(self, job_id: str, keep_version: int = 0) -> list[tuple[int, int]]:
        """See :meth:`TrainerStore.fence`."""
        return self.trainer.fence(job_id, keep_version)

    def install_rebuilt(self, job_id: str, world_size: int, local_world_size: int,
                        version: int, rank: int, manifest, prefault: bool = True):
        """Create the segment a rebuilt shard is written into (PENDING until committed).
        ``prefault=False``: the caller maps its pages itself (shm.populate), e.g. in a
        thread while the first blocks are being fetched."""
        st = self.state
        with st.lock:
            if job_id not in st.jobs:
                self.trainer.register_job(job_id, world_size, local_world_size)
            led = st.job(job_id)
            size = max(manifest.payload_bytes, 1)
            st.make_room(size)
            slot = led.install_committed(rank, version, size)
            st.release_segment(job_id, rank, slot)
            name = st.segment_name(job_id, rank, slot)
            try:
                seg = shm.create(name, size, allocate=True, prefault=prefault)
            except OSError as exc:
                raise MemoryBudgetExceededError(f"cannot allocate {size} bytes in {shm.SHM_DIR}: {exc}")
            st.hold(job_id, rank, slot.index, name, Held(seg, manifest))
            st.write_manifest(name, manifest)
            st.persist()
            return name, seg

    def verify_payload(self, buf, manifest, what: str) -> None:
        """Check ``buf`` against ``manifest``'s block checksums (ChecksumMismatchError)."""
        self.verifier.verify_payload(buf, manifest, what)

    def verify_shard(self, job_id: str, rank: int, version: int) -> None:
        for r, m, seg in self.local_shards(job_id, version):
            if r == rank:
                self.verifier.verify_payload(seg.buf if seg.buf is not None else b"", m,
                                             f"rebuilt shard of rank {rank}")

    # -- aux segments -----------------------------------------------------------------
    def create_aux(self, suffix: str, size: int, prefault: bool = True):
        st = self.state
        name = f"{st.prefix}{suffix}"
        with st.lock:
            if st.aux(name) is not None:
                self.release_aux(name)
            if st.bytes_reserved() + size > st.memory_budget_bytes:
                st.make_room(size)
            if size > shm.free_bytes():
                raise MemoryBudgetExceededError(f"{shm.SHM_DIR}: {size} bytes needed")
            try:
                seg = shm.create(name, size, allocate=True, prefault=prefault)
            except OSError as exc:
                raise MemoryBudgetExceededError(f"cannot allocate {size} bytes in {shm.SHM_DIR}: {exc}")
            st.add_aux(name, seg, size)
            st.persist()
            return name, seg

    def aux_names(self) -> list[str]:
        with self.state.lock:
            return self.state.aux_names()

    def aux(self, name: str):
        with self.state.lock:
            return self.state.aux(name)

    def release_aux(self, name: str) -> None:
        st = self.state
        with st.lock:
            seg = st.pop_aux(name)
            if seg is not None:
                seg.close()
            shm.unlink(name)
            st.persist()
