"""Tensors <-> raw bytes: dtype names, buffer layout, packing and zero-copy views.

No I/O here. A snapshot region is a flat byte buffer (mmap, memoryview, bytearray)
holding each tensor's bytes at a 64-byte-aligned offset; ``TensorSlot`` records where
and what (dtype name from ``snapshotd.wire.dtypes``, shape, and for a DTensor its global
shape and the offset of the local shard). No pickle: only raw bytes plus this metadata.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from snapshotd.wire.dtypes import DTYPE_ITEMSIZE

# name -> torch.dtype for every table entry this torch build has (float8 variants
# and friends are missing in older releases, hence getattr).
_BY_NAME: dict[str, torch.dtype] = {
    n: d for n in DTYPE_ITEMSIZE if isinstance(d := getattr(torch, n, None), torch.dtype)
}
_BY_DTYPE: dict[torch.dtype, str] = {d: n for n, d in _BY_NAME.items()}
# Same-size integer dtypes used to copy bits without any value semantics.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# A tensor read as plain memory: no subclass (DTensor, ...) with a storage of its own kind.
# Parameters count: the Snapshotter reads the model's (modstate) under no_grad.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def dtype_name(dtype: torch.dtype) -> str:
    """Snapshot name of ``dtype`` (the torch attribute name, e.g. ``"bfloat16"``)."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype!r} cannot be stored in a snapshot; supported: {sorted(_BY_NAME)}"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """``torch.dtype`` for snapshot dtype name ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = "known to snapshotd but missing in this torch build" if name in DTYPE_ITEMSIZE else "unknown"
        raise ValueError(f"dtype name {name!r} is {known}; supported: {sorted(_BY_NAME)}") from None


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in a snapshot buffer.

    ``global_shape``/``global_offset`` are empty for plain tensors; for a DTensor the
    slot holds the local shard, ``global_shape`` is the full tensor's shape and
    ``global_offset`` the shard's start index per dim (empty if it could not be computed).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    global_shape: tuple[int, ...] = ()
    global_offset: tuple[int, ...] = ()


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    cls = _dtensor_cls()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


def _global_info(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    cls = _dtensor_cls()
    if cls is None or not isinstance(t, cls):
        return (), ()
    gshape = tuple(int(s) for s in t.shape)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return gshape, ()
    _, goff = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return gshape, tuple(int(o) for o in goff)


def plan_layout(
    named_tensors: Sequence[tuple[str, torch.Tensor]], align: int = 64
) -> tuple[list[TensorSlot], int]:
    """Assign each tensor an ``align``-aligned offset; returns (slots, total_bytes).

    ``total_bytes`` is the end of the last tensor rounded up to ``align``. Zero-size
    tensors get ``nbytes == 0`` and take no space. Names must be unique.
    """
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a positive power of two, got {align}")
    slots, seen, cursor = [], set(), 0
    for name, t in named_tensors:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        local = _local(t)
        gshape, goff = _global_info(t)
        nbytes = local.numel() * local.element_size()
        cursor = (cursor + align - 1) & ~(align - 1)
        slots.append(TensorSlot(name, dtype_name(local.dtype), tuple(int(s) for s in local.shape),
                                cursor, nbytes, gshape, goff))
        cursor += nbytes
    return slots, (cursor + align - 1) & ~(align - 1)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """1-D uint8 view of ``t``'s bytes (a copy only if ``t`` is not contiguous).

    Conjugate/negative bits are resolved first, so the bytes are the values. A DTensor
    gives its local shard. The tensor stays on its device.
    """
    t = _local(t).resolve_conj().resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


def _check_writable(buf: Any) -> None:
    if memoryview(buf).readonly:
        raise ValueError("pack_into needs a writable buffer (got a read-only one)")


def pack_into(buf: Any, slots: Sequence[TensorSlot],
              tensors: Iterable[torch.Tensor | tuple[str, torch.Tensor]]) -> None:
    """Copy each CPU tensor into ``buf`` at its slot (one copy per tensor, no temps).

    ``tensors`` is in slot order, either tensors or ``(name, tensor)`` pairs. Strided
    sources are copied straight into a typed view of the destination.
    """
    _check_writable(buf)
    tensors = list(tensors)
    if len(tensors) != len(slots):
        raise ValueError(f"{len(slots)} slots but {len(tensors)} tensors")
    for slot, item in zip(slots, tensors):
        src = _local(item[1] if isinstance(item, tuple) else item).detach()  # parameters too (modstate)
        if src.device.type != "cpu":
            raise ValueError(f"pack_into: tensor {slot.name!r} is on {src.device}; "
                             "only CPU tensors can be packed here (copy device tensors to host first)")
        if dtype_name(src.dtype) != slot.dtype or tuple(src.shape) != slot.shape:
            raise ValueError(f"tensor {slot.name!r} is {src.dtype}{tuple(src.shape)}, "
                             f"slot expects {slot.dtype}{slot.shape}")
        if slot.nbytes == 0:
            continue
        src = src.resolve_conj().resolve_neg()
        dst = torch.frombuffer(buf, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
        bits = _BITS.get(src.element_size())
        if bits is not None:  # reinterpret as same-size ints: pure bit copy, any strides
            dst.view(bits).view(slot.shape).copy_(src.view(bits))
        else:  # complex128: same-dtype copy is a bit copy too
            dst.view(src.dtype).view(slot.shape).copy_(src)


def view_from(buf: Any, slot: TensorSlot) -> torch.Tensor:
    """Tensor of ``slot``'s dtype/shape viewing ``buf`` (no copy).

    ``buf`` may be read-only (e.g. an mmap opened read-only); the view must then never
    be written (clone it first if it will be modified, e.g. loaded into an optimizer).
    The view holds a reference to ``buf`` but NO buffer export (``torch.frombuffer``):
    an mmap closed meanwhile is unmapped under it, and reading it then reads freed
    memory. Use it only for copies that end before the mapping is closed.
    """
    dtype = torch_dtype(slot.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
        if slot.nbytes == 0:
            return torch.empty(slot.shape, dtype=dtype)
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
        return raw.view(dtype).view(slot.shape)
