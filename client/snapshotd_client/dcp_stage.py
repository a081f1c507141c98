"""Staging for ``dcp.async_save``: ``SnapshotdWriter`` as its own DCP ``AsyncStager``.

``stage_into_segment`` copies every tensor of a state dict straight into this rank's staging
segment of the daemon (acquired here, for the version the save will write) and returns the
"staged" state dict: the same structure, each tensor (plain, DTensor local tensor,
ShardedTensor local shard) replaced by a view of that segment, other leaves deep-copied.
``dcp.async_save`` blocks only for this copy; ``write_data`` then finds each item already in
place (``staged_offset``) and only hands the segment over.

The segment is mapped through torch's own shared-memory storage of a file descriptor
(``UntypedStorage._new_shared_fd_cpu``), so torch owns the mapping (nothing we unmap is
ever pointed into) and, with ``AsyncCheckpointerType.PROCESS``, DCP's pickling of the
staged state dict passes the descriptor to the checkpoint process instead of the bytes:
no extra copy. Called by the trainer thread, one save at a time: wait for the previous
``async_save`` to finish before staging the next one (the daemon's slot of an unfinished
save may otherwise be reused).
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass

import torch

from snapshotd.wire import shm

ALIGN = 64
BYTES_SLACK = 4096  # room for DCP's own serialization of non-tensor leaves


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Staged:
    """Where a staged save's bytes are (pickled with the writer into DCP's checkpoint
    process: names and numbers only)."""

    version: int
    rank: int
    segment_name: str
    size: int  # the segment's size
    tensor_end: int  # the staged tensors end here; bytes items may follow


def _kind(obj):
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(obj, ShardedTensor):
        return "sharded"
    if isinstance(obj, DTensor):
        return "dtensor"
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, dict):
        return "dict"
    if isinstance(obj, (list, tuple)):
        return "seq"
    return "object"


def _locals(obj) -> list[torch.Tensor]:
    k = _kind(obj)
    if k == "sharded":
        return [s.tensor for s in obj.local_shards()]
    if k == "dtensor":
        return [obj.to_local()]
    return [obj] if k == "tensor" else []


def plan_bytes(state_dict) -> int:
    """The segment size the staged copy of ``state_dict`` needs (tensors back to back,
    64-byte aligned, plus room for the non-tensor leaves DCP serializes itself)."""
    total, extra = 0, BYTES_SLACK

    def walk(obj):
        nonlocal total, extra
        k = _kind(obj)
        if k == "dict":
            for v in obj.values():
                walk(v)
        elif k == "seq":
            for v in obj:
                walk(v)
        elif k == "object":
            buf = io.BytesIO()
            torch.save(obj, buf)
            extra += _align(buf.tell()) + ALIGN
        else:
            for t in _locals(obj):
                total = _align(total) + t.numel() * t.element_size()

    walk(state_dict)
    return _align(total) + extra


def map_segment(name: str) -> tuple[torch.UntypedStorage, int]:
    """(torch shared storage over the whole segment ``name``, its size)."""
    fd = os.open(shm.path_of(name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        return torch.UntypedStorage._new_shared_fd_cpu(fd, size), size
    finally:
        os.close(fd)  # torch keeps its own duplicate


def copy_into(state_dict, storage: torch.UntypedStorage):
    """(the staged state dict, where the tensors end): every tensor copied into ``storage``."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    cursor = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal cursor
        cursor = _align(cursor)
        n = t.numel() * t.element_size()
        if cursor + n > storage.nbytes():
            raise ValueError("the state dict changed while it was staged (it outgrew its segment)")
        view = torch.empty(0, dtype=t.dtype).set_(storage, cursor // t.element_size(), tuple(t.shape))
        view.copy_(t.detach())
        cursor += n
        return view

    def walk(obj):
        k = _kind(obj)
        if k == "dict":
            return {key: walk(v) for key, v in obj.items()}
        if k == "seq":
            return type(obj)(walk(v) for v in obj)
        if k == "tensor":
            return place(obj)
        if k == "dtensor":
            return _dtensor(place(obj.to_local()), obj)
        if k == "sharded":
            shards = [Shard(tensor=place(s.tensor), metadata=s.metadata) for s in obj.local_shards()]
            return ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, obj.metadata(), process_group=obj._process_group)
        return copy.deepcopy(obj)

    with torch.no_grad():
        staged = walk(state_dict)
    return staged, _align(cursor)


def _dtensor(local: torch.Tensor, like):
    """A DTensor of ``like``'s spec around ``local``. Built as DTensor's own Python
    constructor does, with the wrapper's storage offset 0: ``DTensor.from_local`` copies the
    local tensor's offset into the wrapper, and torch 2.13 then pickles such a DTensor
    through the wrapper's (invalid) storage, which crashes the process."""
    from torch.distributed.tensor import DTensor

    r = torch.Tensor._make_wrapper_subclass(
        DTensor, like.shape, strides=like.stride(), storage_offset=0, dtype=local.dtype,
        device=local.device, layout=local.layout, requires_grad=False)
    r._spec = like._spec
    r._local_tensor = local
    return r


def _same_file(st: torch.UntypedStorage, path: str) -> bool:
    try:
        fd, _ = st._share_fd_cpu_()  # a storage mapped from a descriptor: its fd, no copy
        a, b = os.fstat(fd), os.stat(path)
    except (RuntimeError, OSError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class StagedLocator:
    """Finds where a resolved tensor lies in the staged segment (in the trainer's process:
    by the storage's address; in DCP's checkpoint process: by the descriptor's file)."""

    def __init__(self, staged: Staged, storage: torch.UntypedStorage | None):
        self.staged = staged
        self.storage = storage
        self._ptr = storage.data_ptr() if storage is not None else None
        self._known: dict[int, bool] = {}

    def _is_ours(self, st: torch.UntypedStorage) -> bool:
        ptr = st.data_ptr()
        if self._ptr is not None:
            return ptr == self._ptr
        if ptr not in self._known:
            self._known[ptr] = (st.nbytes() == self.staged.size and st.is_shared()
                                and _same_file(st, shm.path_of(self.staged.segment_name)))
        return self._known[ptr]

    def offset(self, t: torch.Tensor) -> int | None:
        """Byte offset of ``t`` in the staged segment, or None if it is not staged there
        (a contiguous view of it wholly inside the staged tensors)."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        st = t.untyped_storage()
        if not self._is_ours(st):
            return None
        off = t.storage_offset() * t.element_size()
        if off % ALIGN and t.numel():
            return None
        if off + t.numel() * t.element_size() > self.staged.tensor_end:
            return None
        return off
