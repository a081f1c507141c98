"""``SnapshotdReader``: DCP ``StorageReader`` from snapshotd (re-exported by ``snapshotd_client.dcp``).

Call order (torch 2.13): read_metadata (every rank: rank 0's manifest names the rank holding
the metadata; the version is pinned there), set_up_storage_reader, prepare_local_plan,
prepare_global_plan, read_data (each item from its owner's shard: mapped from this node's
shared memory, only the needed range copied; else the covering checksum blocks fetched by
ranged FetchShard and verified on both ends). DCP's planner reshards: a checkpoint saved at
N ranks loads at any number of ranks. One reader per process, one thread at a time; nothing
handed to DCP points into a mapping (every item is copied into its target).
Also here: checkpoint ids (``parse_checkpoint_id``) and the daemon connection the writer shares.
"""

from __future__ import annotations

import io
import json
import re
import uuid
import warnings
from dataclasses import replace

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from snapshotd.wire import config as cfgmod
from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import InvalidRequestError, UnknownJobError
from snapshotd_client.config import resolve_job_id
from snapshotd_client.dcp_codec import FORMAT, SnapshotdStorageInfo, decode_metadata, torch_dtype
from snapshotd_client.transport import DaemonClient, SegmentCache

__all__ = ["SnapshotdReader", "connect", "parse_checkpoint_id", "valid_id"]

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


def valid_id(checkpoint_id) -> bool:
    try:
        parse_checkpoint_id(checkpoint_id)
        return True
    except ValueError:
        return False


def connect(job_id, socket_path, address, token, timeout_s, client) -> tuple[str, DaemonClient, bool]:
    if job_id is None:
        job_id, _ = resolve_job_id()
    mf.validate_job_id(job_id)
    if client is not None:
        return job_id, client, False
    target = address or "unix:" + (socket_path or cfgmod.default_socket_path())
    return job_id, DaemonClient(target, token=token, timeout_s=timeout_s), True



def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    """The part of ``t`` at ``offsets`` of ``lengths`` (what a ReadItem asks of a stored chunk)."""
    for dim, (off, n) in enumerate(zip(offsets, lengths)):
        if off != 0 or n != t.size(dim):
            t = t.narrow(dim, off, n)
    return t




def _no_such_job(exc: UnknownJobError) -> bool:
    """The daemon knows no such job (not a subclass: a missing version, rank, ...)."""
    return type(exc) is UnknownJobError


class SnapshotdReader(StorageReader):
    """DCP ``StorageReader`` from snapshotd (see the module docstring). ``version``: 0 (the
    default) = the job's latest committed version; it is pinned by ``read_metadata`` so one
    load reads one version."""

    def __init__(self, job_id: str | None = None, version: int = 0, *,
                 socket_path: str | None = None, address: str | None = None,
                 token: str | None = None, timeout_s: float = 30.0,
                 client: DaemonClient | None = None):
        self.job_id, self.client, self._owns_client = connect(job_id, socket_path, address, token,
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

    def latest_version(self) -> int:
        """The job's latest committed version on this daemon; 0 when it holds none (a
        first run: ``dcp.load`` would fail, and DCP's ``CheckpointException`` is a
        ``BaseException`` that ``except Exception`` does not catch)."""
        try:
            return int(self.client.list_versions(self.job_id).latest_committed_version)
        except UnknownJobError as exc:
            if not _no_such_job(exc):
                raise
            return 0

    def read_metadata(self, *args) -> Metadata:
        # No **kwargs: DCP then never asks for rank-local metadata (there is one per version).
        try:
            m0 = self.client.open_shard(self.job_id, 0, self.version, no_copy=True).manifest
        except UnknownJobError as exc:  # the daemon's words ("register it first") are a writer's
            if not _no_such_job(exc):
                raise
            raise UnknownJobError(
                f"no checkpoint of job {self.job_id!r} on this daemon: nothing was saved under "
                "that job id here (a first run, another job id, or the daemon's state was lost); "
                "SnapshotdReader.latest_version() is 0 then") from exc
        head = self._head(m0)
        self.version = int(m0.version)  # pinned: every later read names this version
        m = m0
        if head.get("metadata_rank", 0) != 0:
            m = self.client.open_shard(self.job_id, int(head["metadata_rank"]), self.version,
                                       no_copy=True).manifest
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
        resp = self.client.open_shard(self.job_id, rank, self.version, no_copy=True)
        if not resp.segment_name:  # held on another node (or lost): ranged reads, not a copy
            self.fetched_ranks.append(rank)
            return None, resp.manifest
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
        return valid_id(checkpoint_id)

    @property
    def checkpoint_id(self) -> str:
        return f"snapshotd:{self.job_id}/{self.version}"

    def close(self) -> None:
        self.segments.close()
        if self._owns_client:
            self.client.close()
