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
Reader: read_metadata (every rank: rank 0's manifest names the rank holding the metadata),
set_up_storage_reader, prepare_local_plan, prepare_global_plan, read_data (each item from
its owner's shard: mapped from this node's shared memory, only the needed range copied;
else the owner's whole shard is fetched over gRPC). DCP's planner reshards: a checkpoint
saved at N ranks loads at any number of ranks.

One writer or reader per process, used by one thread at a time (DCP's THREAD executor of
``async_save`` included). Limitations: see docs/DCP.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
import warnings
from torch.futures import Future
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, SavePlan,
                                                  SavePlanner, WriteItemType)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from snapshotd.wire import config as cfgmod
from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (InvalidRequestError, SnapshotdError, SnapshotInFlightError,
                                   SnapshotSkippedError)
from snapshotd_client.config import resolve_job_id
from snapshotd_client.dcp_codec import FORMAT, SnapshotdStorageInfo, decode_metadata, encode_metadata
from snapshotd_client.dcp_codec import torch_dtype
from snapshotd_client.transport import DaemonClient, SegmentCache

__all__ = ["SnapshotdReader", "SnapshotdWriter", "parse_checkpoint_id"]

ALIGN = 64
DCP_VERSION = "1.0.0"  # torch's CURRENT_DCP_VERSION at 2.13
_ID_RE = re.compile(r"^(?:snapshotd:(?:(?P<job>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})/)?)?(?P<version>\d+)$")


def parse_checkpoint_id(checkpoint_id) -> tuple[str | None, int]:
    """(job id or None, version) of ``checkpoint_id``: a version number (int or digits) or
    "snapshotd:VERSION" / "snapshotd:JOB/VERSION". ValueError otherwise."""
    if isinstance(checkpoint_id, bool):
        raise ValueError(f"not a snapshotd checkpoint id: {checkpoint_id!r}")
    if isinstance(checkpoint_id, int):
        version, job = checkpoint_id, None
    else:
        m = _ID_RE.match(str(checkpoint_id))
        if m is None:
            raise ValueError(f"not a snapshotd checkpoint id: {checkpoint_id!r} (use a version "
                             "number or 'snapshotd:JOB/VERSION')")
        version, job = int(m["version"]), m["job"]
    if version < 0:
        raise ValueError(f"checkpoint version must be >= 0, got {version}")
    return job, version


def _valid_id(checkpoint_id) -> bool:
    try:
        parse_checkpoint_id(checkpoint_id)
        return True
    except ValueError:
        return False


def _connect(job_id, socket_path, address, token, timeout_s, client) -> tuple[str, DaemonClient, bool]:
    if job_id is None:
        job_id, _ = resolve_job_id()
    mf.validate_job_id(job_id)
    if client is not None:
        return job_id, client, False
    target = address or "unix:" + (socket_path or cfgmod.default_socket_path())
    return job_id, DaemonClient(target, token=token, timeout_s=timeout_s), True


@dataclass(frozen=True)
class _SnapshotdPlan:
    """What the coordinator tells every rank in its SavePlan's storage_data."""

    version: int
    metadata_rank: int
    world_size: int


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    """The part of ``t`` at ``offsets`` of ``lengths`` (what a ReadItem asks of a stored chunk)."""
    for dim, (off, n) in enumerate(zip(offsets, lengths)):
        if off != 0 or n != t.size(dim):
            t = t.narrow(dim, off, n)
    return t


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
        self.job_id, self.client, self._owns_client = _connect(job_id, socket_path, address, token,
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
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        version = self.version
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
        items, total = [], 0
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                n, meta = raw.nbytes, (None, None)
            else:
                raw = data.detach()
                n, meta = _tensor_nbytes(raw), (str(raw.dtype).removeprefix("torch."), tuple(raw.shape))
            total = -(-total // ALIGN) * ALIGN
            items.append((item, raw, total, n, meta))
            total += n
        try:
            resp = self.client.acquire_staging(self.job_id, self.rank, info.version, max(total, ALIGN))
        except SnapshotInFlightError as exc:
            if isinstance(exc, SnapshotSkippedError):
                raise
            # every slot holds an uncommitted version (a failed save's): give up the oldest
            resp = self.client.acquire_staging(self.job_id, self.rank, info.version, max(total, ALIGN),
                                               force=True)
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
        m = pb.ShardManifest(job_id=self.job_id, rank=self.rank, version=info.version,
                             payload_bytes=total, block_size_bytes=self._block_size,
                             checksum_algo=mf.CHECKSUM_ALGO)
        head = {"format": FORMAT, "metadata_rank": info.metadata_rank, "world_size": info.world_size}
        m.meta_json = json.dumps(head)
        self.last_version = info.version
        if self.rank == info.metadata_rank:
            self._held = (resp.segment_name, m)  # delivered with the metadata, in finish()
        else:
            self.client.adopt(resp.segment_name, m)
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
        return _valid_id(checkpoint_id)

    def close(self) -> None:
        self.segments.close()
        if self._owns_client:
            self.client.close()


class SnapshotdReader(StorageReader):
    """DCP ``StorageReader`` from snapshotd (see the module docstring). ``version``: 0 (the
    default) = the job's latest committed version; it is pinned by ``read_metadata`` so one
    load reads one version."""

    def __init__(self, job_id: str | None = None, version: int = 0, *,
                 socket_path: str | None = None, address: str | None = None,
                 token: str | None = None, timeout_s: float = 30.0,
                 client: DaemonClient | None = None):
        self.job_id, self.client, self._owns_client = _connect(job_id, socket_path, address, token,
                                                               timeout_s, client)
        self.requested_version = int(version)
        self.version = int(version)
        self.segments = SegmentCache()
        self.storage_data: dict = {}
        self.load_id = uuid.uuid4().hex
        self.fetched_ranks: list[int] = []  # ranks read over gRPC, not mapped (last load)
        self.fetched_bytes = 0  # bytes those ranged fetches moved (covering blocks; last load)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            job, version = parse_checkpoint_id(checkpoint_id)
            if job is not None and job != self.job_id:
                raise ValueError(f"checkpoint id {checkpoint_id!r} names job {job!r}, this reader "
                                 f"reads job {self.job_id!r}")
            self.requested_version = version
        self.version = self.requested_version
        self.storage_data = {}
        self.load_id = uuid.uuid4().hex

    def _head(self, m: pb.ShardManifest) -> dict:
        try:
            head = json.loads(m.meta_json) if m.meta_json else {}
        except ValueError:
            head = {}
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise InvalidRequestError(
                f"job {self.job_id!r} version {m.version} rank {m.rank} was not written by "
                f"SnapshotdWriter (no {FORMAT!r} manifest): it cannot be read by dcp.load")
        return head

    def read_metadata(self, *args) -> Metadata:
        # No **kwargs: DCP then never asks for rank-local metadata (there is one per version).
        m0 = self.client.open_shard(self.job_id, 0, self.version).manifest
        head = self._head(m0)
        self.version = int(m0.version)  # pinned: every later read names this version
        m = m0
        if head.get("metadata_rank", 0) != 0:
            m = self.client.open_shard(self.job_id, int(head["metadata_rank"]), self.version).manifest
            head = self._head(m)
        if "metadata" not in head:
            raise InvalidRequestError(f"job {self.job_id!r} version {self.version}: rank {m.rank}'s "
                                      "manifest holds no DCP metadata")
        md = decode_metadata(json.dumps(head["metadata"]))
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        if metadata.storage_data is None:
            raise InvalidRequestError("DCP metadata without storage_data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _open(self, rank: int):
        """(buffer of ``rank``'s payload, its manifest): this node's mapping of the segment,
        or None when the segment is not on this host (its items are then fetched one
        range at a time: ``_fetch``)."""
        resp = self.client.open_shard(self.job_id, rank, self.version)
        try:
            seg = self.segments.get(resp.segment_name, writable=False)
            buf = seg.buf if seg.buf is not None else b""
        except (OSError, ValueError):  # a daemon on another host: its shm is not ours
            self.fetched_ranks.append(rank)
            return None, resp.manifest
        return buf, resp.manifest

    def _fetch(self, reqs, m: pb.ShardManifest) -> list:
        """[(req, info relative to its buffer, buffer)] for the items of a rank not mapped
        here: the checksum blocks covering them, merged into runs, each fetched once
        (verified on both ends). Items outside the payload keep their info (_read_one
        names the bad range)."""
        bs = m.block_size_bytes or mf.DEFAULT_BLOCK_SIZE_BYTES
        runs: list[list[int]] = []  # [lo, hi) byte ranges, block-aligned, merged
        for _, info in sorted(reqs, key=lambda x: x[1].offset):
            if not info.length or info.offset + info.length > m.payload_bytes:
                continue
            lo = info.offset // bs * bs
            hi = min(-(-(info.offset + info.length) // bs) * bs, m.payload_bytes)
            if runs and lo <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], hi)
            else:
                runs.append([lo, hi])
        data = []
        for lo, hi in runs:
            _, buf, moved = self.client.fetch_range(self.job_id, reqs[0][1].rank, self.version,
                                                    lo, hi - lo)
            self.fetched_bytes += moved
            data.append((lo, hi, buf))
        out = []
        for req, info in reqs:
            run = next(((lo, buf) for lo, hi, buf in data
                        if info.length and lo <= info.offset and info.offset + info.length <= hi), None)
            if run is None:
                out.append((req, info if info.length else replace(info, offset=0), b""))
            else:
                out.append((req, replace(info, offset=info.offset - run[0]), run[1]))
        return out

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_rank: dict[int, list] = {}
        for req in plan.items:
            info = self.storage_data.get(req.storage_index)
            if not isinstance(info, SnapshotdStorageInfo):
                raise InvalidRequestError(f"no snapshotd storage info for {req.storage_index}")
            by_rank.setdefault(info.rank, []).append((req, info))
        self.fetched_ranks, self.fetched_bytes = [], 0
        try:
            for rank, reqs in sorted(by_rank.items()):
                buf, m = self._open(rank)
                items = [(req, info, buf) for req, info in reqs] if buf is not None else self._fetch(reqs, m)
                for req, info, b in items:
                    self._read_one(planner, req, info, b, m)
                del buf, items
        finally:
            self.segments.close()  # nothing handed out points into a mapping (copied above)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _read_one(self, planner: LoadPlanner, req, info: SnapshotdStorageInfo, buf, m) -> None:
        if info.offset + info.length > m.payload_bytes:
            raise InvalidRequestError(
                f"{req.storage_index.fqn}: bytes [{info.offset}, {info.offset + info.length}) lie past "
                f"the {m.payload_bytes}-byte shard of rank {info.rank} (version {m.version})")
        if req.type == LoadItemType.BYTE_IO:
            data = bytes(memoryview(buf)[info.offset:info.offset + info.length])
            planner.load_bytes(req, io.BytesIO(data))
            return
        dtype = torch_dtype(info.dtype)
        with warnings.catch_warnings():  # read-only mapping: only read, then copied
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(np.frombuffer(buf, np.uint8, count=info.length, offset=info.offset))
        src = (raw.view(dtype) if info.length else torch.empty(0, dtype=dtype)).view(info.shape)
        src = _narrow(src, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != src.size():
            raise InvalidRequestError(f"{req.storage_index.fqn}: stored chunk gives {tuple(src.size())}, "
                                      f"the load plan wants {tuple(target.size())}")
        target.copy_(src)
        del raw, src
        planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return _valid_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> str:
        return f"snapshotd:{self.job_id}/{self.version}"

    def close(self) -> None:
        self.segments.close()
        if self._owns_client:
            self.client.close()

