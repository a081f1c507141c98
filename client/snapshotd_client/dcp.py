"""torch.distributed.checkpoint (DCP) storage on snapshotd: ``SnapshotdWriter`` / ``SnapshotdReader``.

    import torch.distributed.checkpoint as dcp
    from snapshotd_client.dcp import SnapshotdWriter, SnapshotdReader
    dcp.save(state_dict, storage_writer=SnapshotdWriter(job_id="run-7"))   # next version
    dcp.load(state_dict, storage_reader=SnapshotdReader(job_id="run-7"))   # latest version

A checkpoint is one version of a snapshotd job (``checkpoint_id``: the version number, or
"snapshotd:JOB/VERSION"). Each rank writes the bytes of its items into ONE staging segment
of its node's daemon, back to back (64-byte aligned); tensors raw, BytesIO items as their
bytes. The version commits when every rank of the job has delivered its shard (ranks with
nothing to write deliver an empty one). The DCP ``Metadata`` goes, as JSON (dcp_codec; no
pickle), into the coordinator's manifest, so the coordinator delivers last, in ``finish``:
its delivery is the commit, and ``finish`` returns once the daemon says it committed.

Writer call order (torch 2.13): set_up_storage_writer (registers the job), prepare_local_plan,
prepare_global_plan (the coordinator picks the version and tells every rank through the
plans' storage_data), write_data (stage and, except on the coordinator, deliver), finish.
The reader lives in dcp_reader (re-exported here): DCP's planner reshards, a checkpoint
saved at N ranks loads at any number of ranks.

The writer is its own DCP ``AsyncStager`` (dcp_stage): ``dcp.async_save`` copies the tensors
straight into the daemon's segment and returns; write_data finds them there (THREAD and
PROCESS executors; the writer pickles to names and numbers for the checkpoint process).

One writer or reader per process, used by one thread at a time (DCP's THREAD executor of
``async_save`` included). Limitations: see docs/DCP.md.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from dataclasses import dataclass, replace

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (InvalidRequestError, SnapshotdError, SnapshotInFlightError,
                                   SnapshotSkippedError)
from snapshotd_client.dcp_codec import FORMAT, SnapshotdStorageInfo, encode_metadata
from snapshotd_client.dcp_reader import SnapshotdReader, connect, parse_checkpoint_id, valid_id
from snapshotd_client.dcp_stage import Staged, StagedLocator, copy_into, map_segment, plan_bytes
from snapshotd_client.transport import DaemonClient, SegmentCache

__all__ = ["SnapshotdReader", "SnapshotdWriter", "parse_checkpoint_id"]

ALIGN = 64
DCP_VERSION = "1.0.0"  # torch's CURRENT_DCP_VERSION at 2.13


@dataclass(frozen=True)
class _SnapshotdPlan:
    """What the coordinator tells every rank in its SavePlan's storage_data."""

    version: int
    metadata_rank: int
    world_size: int


def _tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SnapshotdWriter(StorageWriter):
    """DCP ``StorageWriter`` into the node's snapshotd daemon (see the module docstring).

    ``job_id``: default from the launcher (``config.resolve_job_id``). ``version``: the
    version to write (default: the job's latest committed version + 1, picked by the
    coordinator). ``world_size``: ranks of the job (default: the default process group's
    size, 1 without one); ``local_world_size``: ranks on this node (default
    $LOCAL_WORLD_SIZE, 0 = all on one node). ``commit_timeout_s``: how long ``finish``
    waits for the version to commit on every node."""

    def __init__(self, job_id: str | None = None, version: int | None = None, *,
                 socket_path: str | None = None, address: str | None = None,
                 token: str | None = None, timeout_s: float = 30.0,
                 commit_timeout_s: float = 120.0, world_size: int | None = None,
                 local_world_size: int | None = None, client: DaemonClient | None = None):
        self.job_id, self.client, self._owns_client = connect(job_id, socket_path, address, token,
                                                               timeout_s, client)
        if version is not None and version < 1:
            raise ValueError(f"version must be >= 1, got {version}")
        self.version = version
        self.commit_timeout_s = commit_timeout_s
        self._world_size, self._local_world_size = world_size, local_world_size
        self.segments = SegmentCache()
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self._latest = 0
        self._block_size = mf.DEFAULT_BLOCK_SIZE_BYTES
        self._held: tuple[str, pb.ShardManifest] | None = None  # the coordinator's, until finish
        self.last_version: int | None = None  # the version the last save wrote
        self._staged: Staged | None = None  # what stage() put in the daemon's segment
        self._stage_storage = None  # its mapping (this process only)
        self._last_staged = 0
        self.staged_copies = 0  # items write_data found already staged (last save)
        self.world_size = world_size or 1

    # -- pickled into DCP's checkpoint process (AsyncCheckpointerType.PROCESS) ----------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("client", "segments", "_stage_storage")}
        state["_conn"] = (self.client.target, self.client.timeout_s, tuple(self.client._metadata))
        return state

    def __setstate__(self, state: dict) -> None:
        target, timeout_s, metadata = state.pop("_conn")
        self.__dict__.update(state)
        self.client = DaemonClient(target, timeout_s=timeout_s)
        self.client._metadata = metadata
        self._owns_client = True
        self.segments = SegmentCache()
        self._stage_storage = None

    # -- AsyncStager ----------------------------------------------------------------
    _synchronize_after_execute = False  # stage() is synchronous: nothing to wait for after

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        """Nothing to do: ``stage`` returns once the copy is done."""

    def stage(self, state_dict: dict) -> dict:
        """Copy ``state_dict``'s tensors into this rank's staging segment of the daemon and
        return the staged state dict (views of that segment): called by ``dcp.async_save``
        when this writer is its ``storage_writer``; it blocks only for this copy. The
        version is the writer's ``version`` or this rank's next one; ranks that disagree
        (their daemons saw different versions) are caught up in write_data by a copy."""
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self._register()
        version = self.version
        if version is None:
            seen = [v.version for v in self.client.list_versions(self.job_id).versions]
            version = max([self._latest, self._last_staged, *seen]) + 1
        resp = self._acquire(version, plan_bytes(state_dict))
        storage, size = map_segment(resp.segment_name)
        staged_sd, end = copy_into(state_dict, storage)
        self._staged = Staged(version=version, rank=self.rank, segment_name=resp.segment_name,
                              size=size, tensor_end=end)
        self._stage_storage = storage
        self._last_staged = version
        return staged_sd

    # -- StorageWriter ---------------------------------------------------------------
    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            job, version = parse_checkpoint_id(checkpoint_id)
            if job is not None and job != self.job_id:
                raise ValueError(f"checkpoint id {checkpoint_id!r} names job {job!r}, this writer "
                                 f"writes job {self.job_id!r}")
            if version < 1:
                raise ValueError(f"checkpoint version must be >= 1, got {version}")
            self.version = version
        self.save_id = uuid.uuid4().hex
        self._held = None

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        if not kwargs.get("use_collectives", True):
            raise NotImplementedError("SnapshotdWriter needs DCP's collectives (use_collectives=True): "
                                      "the coordinator picks the version and commits it")
        self.is_coordinator = bool(is_coordinator)
        self.rank = int(kwargs.get("rank") or 0)
        self._register()

    def _register(self) -> None:
        world = self._world_size
        if world is None:
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        lws = self._local_world_size
        if lws is None:
            lws = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) if world > 1 else 0
        self.world_size = world
        resp = self.client.register_job(self.job_id, world, lws)
        self._latest = resp.latest_committed_version
        if resp.block_size_bytes:
            self._block_size = resp.block_size_bytes

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self._staged is not None:  # the version stage() wrote into
            return replace(plan, storage_data=self._staged.version)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        version = self.version
        staged = [p.storage_data for p in plans if isinstance(p.storage_data, int)]
        if version is None and staged:  # async_save staged: the newest of the ranks' picks
            version = max(staged)
        if version is None:  # past every version this daemon has seen (a failed save's too)
            seen = [v.version for v in self.client.list_versions(self.job_id).versions]
            version = max([self._latest, *seen]) + 1
        if version <= self._latest:
            raise InvalidRequestError(f"job {self.job_id!r} already committed version {self._latest}; "
                                      f"version {version} cannot be written (versions only grow)")
        info = _SnapshotdPlan(version=version, metadata_rank=self.rank, world_size=len(plans))
        return [replace(p, storage_data=info) for p in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info: _SnapshotdPlan = plan.storage_data
        if not isinstance(info, _SnapshotdPlan):
            raise InvalidRequestError("SavePlan.storage_data is not a snapshotd plan: every rank must "
                                      "save through a SnapshotdWriter")
        resolved = [(item, planner.resolve_data(item)) for item in plan.items]
        staged, self._staged = self._staged, None
        storage, self._stage_storage = self._stage_storage, None
        self.staged_copies = 0
        if staged is not None and staged.version == info.version and staged.rank == self.rank:
            results = self._write_staged(info, staged, storage, resolved)
            if results is not None:
                return results
        if staged is not None:  # cannot use the staged segment: copy out before it is reused
            resolved = [(item, d.clone() if isinstance(d, torch.Tensor) else d) for item, d in resolved]
            del storage
        items, total = [], 0
        for item, data in resolved:
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                n, meta = raw.nbytes, (None, None)
            else:
                raw = data.detach()
                n, meta = _tensor_nbytes(raw), (str(raw.dtype).removeprefix("torch."), tuple(raw.shape))
            total = -(-total // ALIGN) * ALIGN
            items.append((item, raw, total, n, meta))
            total += n
        resp = self._acquire(info.version, total)
        seg = self.segments.get(resp.segment_name, writable=True)
        results = []
        for item, raw, off, n, (dtype, shape) in items:
            if n:
                dst = torch.frombuffer(seg.buf, dtype=torch.uint8, count=n, offset=off)
                if dtype is None:
                    dst.copy_(torch.frombuffer(raw, dtype=torch.uint8))
                else:
                    dst.view(raw.dtype).view(raw.shape).copy_(raw)
                del dst
            results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=SnapshotdStorageInfo(
                rank=self.rank, offset=off, length=n, dtype=dtype, shape=shape)))
        del items
        return self._hand_over(info, resp.segment_name, total, results)

    def _acquire(self, version: int, nbytes: int):
        try:
            return self.client.acquire_staging(self.job_id, self.rank, version, max(nbytes, ALIGN))
        except SnapshotInFlightError as exc:
            if isinstance(exc, SnapshotSkippedError):
                raise
            # every slot holds an uncommitted version (a failed save's): give up the oldest
            return self.client.acquire_staging(self.job_id, self.rank, version, max(nbytes, ALIGN),
                                               force=True)

    def _write_staged(self, info: _SnapshotdPlan, staged: Staged, storage, resolved):
        """The write of a staged save: tensors are already in the segment (no copy); bytes
        items go after them. None if something does not fit (write_data then copies)."""
        loc = StagedLocator(staged, storage)
        placed, cursor = [], staged.tensor_end
        for item, data in resolved:
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                cursor = -(-cursor // ALIGN) * ALIGN
                placed.append((item, raw, cursor, raw.nbytes, (None, None)))
                cursor += raw.nbytes
                continue
            off = loc.offset(data)
            if off is None:
                return None
            placed.append((item, None, off, _tensor_nbytes(data),
                           (str(data.dtype).removeprefix("torch."), tuple(data.shape))))
        if cursor > staged.size:
            return None
        seg = self.segments.get(staged.segment_name, writable=True) if cursor > staged.tensor_end else None
        results = []
        for item, raw, off, n, (dtype, shape) in placed:
            if raw is not None and n:
                dst = torch.frombuffer(seg.buf, dtype=torch.uint8, count=n, offset=off)
                dst.copy_(torch.frombuffer(raw, dtype=torch.uint8))
                del dst
            elif raw is None:
                self.staged_copies += 1
            results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=SnapshotdStorageInfo(
                rank=self.rank, offset=off, length=n, dtype=dtype, shape=shape)))
        del placed, seg, storage, loc
        return self._hand_over(info, staged.segment_name, cursor, results)

    def _hand_over(self, info: _SnapshotdPlan, segment_name: str, total: int,
                   results: list[WriteResult]) -> Future[list[WriteResult]]:
        """Deliver this rank's filled segment (the coordinator's waits for finish)."""
        m = pb.ShardManifest(job_id=self.job_id, rank=self.rank, version=info.version,
                             payload_bytes=total, block_size_bytes=self._block_size,
                             checksum_algo=mf.CHECKSUM_ALGO)
        head = {"format": FORMAT, "metadata_rank": info.metadata_rank, "world_size": info.world_size}
        m.meta_json = json.dumps(head)
        self.last_version = info.version
        if self.rank == info.metadata_rank:
            self._held = (segment_name, m)  # delivered with the metadata, in finish()
        else:
            self.client.adopt(segment_name, m)
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._held is None:
            raise SnapshotdError("SnapshotdWriter.finish: this rank staged nothing to commit "
                                 "(finish runs on the coordinator after its write_data)")
        name, m = self._held
        self._held = None
        metadata.version = DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for rs in results for wr in rs}
        metadata.storage_meta = StorageMeta(checkpoint_id=f"snapshotd:{self.job_id}/{m.version}",
                                            save_id=self.save_id)
        head = json.loads(m.meta_json)
        head["metadata"] = json.loads(encode_metadata(metadata))
        m.meta_json = json.dumps(head, separators=(",", ":"))
        if len(m.meta_json) > mf.MAX_META_JSON_CHARS:
            raise InvalidRequestError(f"the DCP metadata takes {len(m.meta_json)} characters, over the "
                                      f"manifest's limit of {mf.MAX_META_JSON_CHARS}")
        resp = self.client.adopt(name, m)
        if not resp.committed:
            self._wait_committed(m.version)

    def _wait_committed(self, version: int) -> None:
        deadline = time.monotonic() + self.commit_timeout_s
        delay = 0.002
        while True:
            r = self.client.commit(self.job_id, version)
            if r.committed:
                return
            if r.latest_committed_version > version:
                raise SnapshotdError(f"job {self.job_id!r}: version {version} was overtaken by version "
                                     f"{r.latest_committed_version} before it committed")
            if time.monotonic() >= deadline:
                raise SnapshotdError(
                    f"job {self.job_id!r} version {version} did not commit within "
                    f"{self.commit_timeout_s:g} s; ranks still missing: {list(r.missing_ranks)}")
            time.sleep(delay)  # polling the daemon: the API has no commit notification
            delay = min(delay * 2, 0.1)

    def storage_meta(self) -> StorageMeta | None:
        v = self.version if self.version is not None else ""
        return StorageMeta(checkpoint_id=f"snapshotd:{self.job_id}/{v}".rstrip("/"),
                           save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return valid_id(checkpoint_id)

    def close(self) -> None:
        self.segments.close()
        if self._owns_client:
            self.client.close()
