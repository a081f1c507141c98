"""The daemon's shard store: shared-memory segments, memory budget, durable index.

A facade over four parts, each given its collaborators in its constructor:

- :class:`~snapshotd.node.store_state.StoreState`: job ledgers, the segments held for
  them and aux segments, the memory budget, the durable index (``state_dir``) and the
  re-adoption of committed segments after a restart; owns the one lock;
- :class:`~snapshotd.node.store_verify.PayloadVerifier`: block checksums of payloads,
  hashed on several cores at once;
- :class:`~snapshotd.node.store_trainer.TrainerStore`: what the trainers' RPCs do
  (register, stage, adopt, push, commit, restore, stats);
- :class:`~snapshotd.node.store_cluster.ClusterView`: what the cluster layer reads and
  does (local shards, node blocks, commits, rebuilt shards, aux segments).

``ShardStore`` builds them and forwards each public name to its part, so the service,
the server and the cluster layer keep calling one object; new code may take the part it
needs (``store.trainer``, ``store.cluster_view``) instead. Thread-safety: every public
method may be called from any gRPC worker thread (see the parts). ``close()`` last.
"""

from __future__ import annotations

from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.node.store_cluster import ClusterView
from snapshotd.node.store_state import StoreState
from snapshotd.node.store_trainer import TrainerStore
from snapshotd.node.store_verify import ENV_UNSAFE_SKIP_VERIFY, PayloadVerifier

__all__ = ["ENV_UNSAFE_SKIP_VERIFY", "ShardStore"]


class ShardStore:
    """One node's store: builds its parts and forwards to them (module docstring)."""

    def __init__(self, node_id: str, state_dir: str, memory_budget_bytes: int,
                 max_slots_per_rank: int = 3, verify_on_adopt: bool = True,
                 cluster_mode: bool = False, instance: str = ""):
        self.state = StoreState(node_id, state_dir, memory_budget_bytes, max_slots_per_rank,
                                cluster_mode=cluster_mode, instance=instance)
        self.verifier = PayloadVerifier()
        self.trainer = TrainerStore(self.state, self.verifier, verify_on_adopt)
        self.cluster_view = ClusterView(self.state, self.verifier, self.trainer)
        self.state.recover()

    # -- identity, budget and counters (StoreState, PayloadVerifier) ----------------------
    node_id = property(lambda self: self.state.node_id)
    state_dir = property(lambda self: self.state.state_dir)
    prefix = property(lambda self: self.state.prefix)
    memory_budget_bytes = property(lambda self: self.state.memory_budget_bytes)
    cluster_mode = property(lambda self: self.state.cluster_mode)
    unsafe_skip_verify = property(lambda self: self.verifier.unsafe_skip_verify)

    @property
    def requests_refused(self) -> int:
        return self.state.requests_refused

    @requests_refused.setter
    def requests_refused(self, n: int) -> None:  # the service counts what the store never saw
        self.state.requests_refused = n

    @property
    def commit_hook(self):
        """``hook(job, version)``: every local rank delivered ``version`` (cluster mode)."""
        return self.trainer.commit_hook

    @commit_hook.setter
    def commit_hook(self, hook) -> None:
        self.trainer.commit_hook = hook

    def bytes_reserved(self) -> int:
        return self.state.bytes_reserved()

    def bytes_committed(self) -> int:
        return self.state.bytes_committed()

    def verify_payload(self, buf, m: pb.ShardManifest, what: str) -> None:
        self.verifier.verify_payload(buf, m, what)

    # -- the trainers' side (TrainerStore) ------------------------------------------------
    def register_job(self, job_id: str, world_size: int, local_world_size: int = 0,
                     restarting: bool = False) -> int:
        return self.trainer.register_job(job_id, world_size, local_world_size, restarting)

    def fence(self, job_id: str, keep_version: int = 0) -> list[tuple[int, int]]:
        return self.trainer.fence(job_id, keep_version)

    def drop_job(self, job_id: str) -> int:
        return self.trainer.drop_job(job_id)

    def acquire_staging(self, job_id: str, rank: int, version: int, nbytes: int,
                        force: bool = False) -> tuple[str, int]:
        return self.trainer.acquire_staging(job_id, rank, version, nbytes, force)

    def adopt(self, segment_name: str, m: pb.ShardManifest) -> tuple[bool, int]:
        return self.trainer.adopt(segment_name, m)

    def acquire_for_writer(self, job_id: str, rank: int, version: int, nbytes: int,
                           force: bool = False, writer_id: str = "",
                           reserve: int = 0) -> tuple[str, int, int]:
        return self.trainer.acquire_for_writer(job_id, rank, version, nbytes, force, writer_id, reserve)

    def adopt_hinted(self, segment_name: str, m: pb.ShardManifest,
                     hint=None, raw: bytes | None = None, owned: bool = False) -> tuple[bool, int, int]:
        return self.trainer.adopt_hinted(segment_name, m, hint, raw, owned)

    def push(self, m: pb.ShardManifest, chunks) -> tuple[bool, int]:
        return self.trainer.push(m, chunks)

    def commit(self, job_id: str, version: int) -> tuple[bool, list[int], int]:
        return self.trainer.commit(job_id, version)

    def list_versions(self, job_id: str):
        return self.trainer.list_versions(job_id)

    def committed_shard(self, job_id: str, rank: int, version: int = 0, verify: bool = True):
        return self.trainer.committed_shard(job_id, rank, version, verify)

    def stats(self) -> dict:
        return self.trainer.stats()

    # -- the cluster's side (ClusterView) -------------------------------------------------
    def committed_version(self, job_id: str) -> int:
        return self.cluster_view.committed_version(job_id)

    def jobs_summary(self) -> dict:
        return self.cluster_view.jobs_summary()

    def holds_rank(self, job_id: str, rank: int) -> bool:
        return self.cluster_view.holds_rank(job_id, rank)

    def local_shards(self, job_id: str, version: int) -> list:
        return self.cluster_view.local_shards(job_id, version)

    def local_manifests(self, job_id: str, version: int) -> tuple[list[int], list, list[bytes]]:
        return self.cluster_view.local_manifests(job_id, version)

    def block_reader(self, job_id: str, version: int, block_size: int, verify: bool = False,
                     with_checksum: bool = False):
        return self.cluster_view.block_reader(job_id, version, block_size, verify, with_checksum)

    def commit_version(self, job_id: str, version: int) -> None:
        self.cluster_view.commit_version(job_id, version)

    def install_rebuilt(self, job_id: str, world_size: int, local_world_size: int,
                        version: int, rank: int, manifest, prefault: bool = True):
        return self.cluster_view.install_rebuilt(job_id, world_size, local_world_size, version,
                                                 rank, manifest, prefault)

    def verify_shard(self, job_id: str, rank: int, version: int) -> None:
        self.cluster_view.verify_shard(job_id, rank, version)

    def create_aux(self, suffix: str, size: int, prefault: bool = True):
        return self.cluster_view.create_aux(suffix, size, prefault)

    def aux_names(self) -> list[str]:
        return self.cluster_view.aux_names()

    def aux(self, name: str):
        return self.cluster_view.aux(name)

    def release_aux(self, name: str) -> None:
        self.cluster_view.release_aux(name)

    def close(self) -> None:
        """Unmap (not unlink) everything: the segments stay for the next daemon."""
        self.state.close()
        self.verifier.close()
