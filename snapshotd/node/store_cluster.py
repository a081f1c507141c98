"""The store's face towards the cluster layer (``snapshotd.node.cluster.node``).

A node's *data* for version v is the concatenation, in rank order, of its local ranks'
payloads, each cut into ``block_size`` blocks (a rank's last block is zero-padded),
so block j of a node always means the same bytes on every node that reasons about
it. Parity and other cluster-owned bytes live in *aux* segments that count against
the same memory budget and are re-adopted after a restart like the shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from snapshotd.wire import manifest as mf
from snapshotd.wire import shm
from snapshotd.wire.errors import ChecksumMismatchError, MemoryBudgetExceededError, VersionNotFoundError
from snapshotd.core.ledger import SlotState


@dataclass
class Held:
    """The daemon's view of one slot's segment."""

    segment: shm.Segment | None = None
    manifest: object | None = None  # ShardManifest once delivered


class ClusterStoreMixin:
    # -- reading what this node holds ----------------------------------------------
    def committed_version(self, job_id: str) -> int:
        with self._lock:
            led = self._jobs.get(job_id)
            return led.committed_version if led else 0

    def jobs_summary(self) -> dict:
        with self._lock:
            return {j: {"committed": led.committed_version, "world_size": led.world_size,
                        "local_world_size": led.local_world_size}
                    for j, led in self._jobs.items()}

    def holds_rank(self, job_id: str, rank: int) -> bool:
        with self._lock:
            led = self._jobs.get(job_id)
            return led is not None and rank in led.local_ranks()

    def local_shards(self, job_id: str, version: int) -> list:
        """[(rank, manifest, segment)] of the local ranks holding ``version``, by rank."""
        with self._lock:
            led = self._job(job_id)
            out = []
            for r in led.local_ranks():
                slot = led.slot_of(r, version, SlotState.PENDING, SlotState.COMMITTED)
                if slot is None:
                    continue
                held = self._held[self._by_slot[(job_id, r, slot.index)]]
                out.append((r, held.manifest, held.segment))
            return out

    def block_reader(self, job_id: str, version: int, block_size: int, verify: bool = False,
                     with_checksum: bool = False):
        """A function j -> the node's data block j (``block_size`` bytes). With
        ``verify``, the block is checked against its manifest checksum first; with
        ``with_checksum`` it returns (block, stored xxh3 of exactly those bytes, or None
        for a zero-padded last block)."""
        shards = self.local_shards(job_id, version)
        if not shards:
            raise VersionNotFoundError(f"job {job_id!r}: version {version} is not held here")
        spans = []  # (first block, rank's block count, manifest, segment)
        first = 0
        for _, m, seg in shards:
            nb = mf.num_blocks(m.payload_bytes, block_size)
            spans.append((first, nb, m, seg))
            first += nb

        def read(j: int):
            for f, nb, m, seg in spans:
                if f <= j < f + nb:
                    off = (j - f) * block_size
                    n = min(block_size, m.payload_bytes - off)
                    mv = memoryview(seg.buf)[off:off + n]
                    unsafe = self.unsafe_skip_verify  # test-only: send what is there, unchecked
                    if with_checksum and m.block_size_bytes == block_size and n == block_size and not unsafe:
                        return mv, m.block_checksums[j - f]
                    if (verify or with_checksum) and not unsafe:
                        if m.block_size_bytes != block_size:
                            raise ChecksumMismatchError(
                                f"rank {m.rank}: manifest blocks of {m.block_size_bytes} bytes, "
                                f"cluster blocks of {block_size}")
                        if xxhash.xxh3_64_intdigest(mv) != m.block_checksums[j - f]:
                            raise ChecksumMismatchError(
                                f"job {job_id!r} v{version} rank {m.rank}: data block {j - f} "
                                "is corrupt (checksum mismatch)")
                    if n == block_size:
                        return (mv, None) if with_checksum else mv
                    out = np.zeros(block_size, np.uint8)  # a rank's last block, padded
                    out[:n] = np.frombuffer(mv, np.uint8)
                    return (memoryview(out), None) if with_checksum else memoryview(out)
            raise IndexError(f"job {job_id!r} v{version}: no data block {j} here ({first} blocks)")

        return read

    # -- committing in a cluster ------------------------------------------------------
    def commit_version(self, job_id: str, version: int) -> None:
        with self._lock:
            led = self._job(job_id)
            d = led.commit(version)
            self._forget_freed(job_id, d.freed)
            self._persist()

    def install_rebuilt(self, job_id: str, world_size: int, local_world_size: int,
                        version: int, rank: int, manifest, prefault: bool = True):
        """Create the segment a rebuilt shard is written into (PENDING until committed).
        ``prefault=False``: the caller maps its pages itself (shm.populate), e.g. in a
        thread while the first blocks are being fetched."""
        with self._lock:
            if job_id not in self._jobs:
                self.register_job(job_id, world_size, local_world_size)
            led = self._job(job_id)
            size = max(manifest.payload_bytes, 1)
            self._make_room(size)
            slot = led.install_committed(rank, version, size)
            self._release_segment(job_id, rank, slot)
            name = self._segment_name(job_id, rank, slot)
            try:
                seg = shm.create(name, size, allocate=True, prefault=prefault)
            except OSError as exc:
                raise MemoryBudgetExceededError(f"cannot allocate {size} bytes in {shm.SHM_DIR}: {exc}")
            self._held[name] = Held(seg, manifest)
            self._by_slot[(job_id, rank, slot.index)] = name
            with open(self._manifest_path(name), "wb") as f:
                f.write(manifest.SerializeToString())
            self._persist()
            return name, seg

    def verify_shard(self, job_id: str, rank: int, version: int) -> None:
        for r, m, seg in self.local_shards(job_id, version):
            if r == rank:
                self._verify(seg.buf if seg.buf is not None else b"", m,
                             f"rebuilt shard of rank {rank}")

    # -- aux segments -----------------------------------------------------------------
    def create_aux(self, suffix: str, size: int, prefault: bool = True):
        name = f"{self.prefix}{suffix}"
        with self._lock:
            if name in self._aux:
                self.release_aux(name)
            if self.bytes_reserved() + size > self.memory_budget_bytes:
                self._make_room(size)
            if size > shm.free_bytes():
                raise MemoryBudgetExceededError(f"{shm.SHM_DIR}: {size} bytes needed")
            try:
                seg = shm.create(name, size, allocate=True, prefault=prefault)
            except OSError as exc:
                raise MemoryBudgetExceededError(f"cannot allocate {size} bytes in {shm.SHM_DIR}: {exc}")
            self._aux[name], self._aux_sizes[name] = seg, size
            self._persist()
            return name, seg

    def aux_names(self) -> list[str]:
        with self._lock:
            return sorted(self._aux)

    def aux(self, name: str):
        with self._lock:
            return self._aux.get(name)

    def release_aux(self, name: str) -> None:
        with self._lock:
            seg = self._aux.pop(name, None)
            self._aux_sizes.pop(name, None)
            if seg is not None:
                seg.close()
            shm.unlink(name)
            self._persist()
