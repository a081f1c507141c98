"""Where each byte of a rank's snapshot goes (pure layout, plus the copy helpers).

A rank's state has two parts:

* the *replicated* part (model and optimizer): identical on every data-parallel rank.
  It is laid out once as the replicated payload of ``replicated_bytes``. With
  ``shard_replicated`` (REFT), DP rank i stores only slice i of it, so the cluster
  holds one copy of the state instead of DP copies; otherwise a rank stores all of it.
* the *local* part (RNG states, LR scheduler, step, extra state): this rank's own.

A rank's payload is ``[its slice of the replicated payload][pad to 64][local tensors]``.
Restore gathers the slices of every rank in ``dp_ranks`` to rebuild the replicated
payload, then views tensors out of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from snapshotd_client import tensors as tz

ALIGN = 64


def slice_bounds(total: int, dp_size: int, dp_rank: int, align: int = ALIGN) -> tuple[int, int]:
    """Byte range [lo, hi) of ``total`` that DP rank ``dp_rank`` of ``dp_size`` stores."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")

    def edge(i: int) -> int:
        return total if i == dp_size else (total * i // dp_size) // align * align

    return edge(dp_rank), edge(dp_rank + 1)


@dataclass(frozen=True)
class ShardLayout:
    replicated: tuple[tz.TensorSlot, ...]  # offsets within the replicated payload
    replicated_bytes: int
    slice_lo: int
    slice_hi: int
    local: tuple[tz.TensorSlot, ...]  # offsets within this rank's payload
    payload_bytes: int


def plan_shard(replicated_named, local_named, dp_size: int = 1, dp_rank: int = 0,
               frozen_first: tuple[bool, ...] = ()) -> ShardLayout:
    """``frozen_first`` (incremental snapshots): per replicated tensor, True places it
    before every False one in the payload (slots stay in the given order; offsets then
    do not grow with it), so the blocks that change at every save are few and together."""
    if any(frozen_first):
        order = sorted(range(len(replicated_named)), key=lambda i: not frozen_first[i])
        placed, rep_total = tz.plan_layout([replicated_named[i] for i in order], align=ALIGN)
        rep_slots = [None] * len(order)
        for j, i in enumerate(order):
            rep_slots[i] = placed[j]
    else:
        rep_slots, rep_total = tz.plan_layout(replicated_named, align=ALIGN)
    lo, hi = slice_bounds(rep_total, dp_size, dp_rank)
    base = -(-(hi - lo) // ALIGN) * ALIGN
    loc_slots, loc_total = tz.plan_layout(local_named, align=ALIGN)
    loc_slots = [dataclasses.replace(s, offset=s.offset + base) for s in loc_slots]
    return ShardLayout(tuple(rep_slots), rep_total, lo, hi, tuple(loc_slots), base + loc_total)


def copy_slice(buf, slots, tensors, lo: int, hi: int, total: int, non_blocking: bool = False) -> None:
    """Copy bytes [lo, hi) of the ``total``-byte replicated payload (made of ``tensors``
    laid out as ``slots``) into ``buf`` at offset 0."""
    if lo == 0 and hi == total and not non_blocking and all(t.device.type == "cpu" for t in tensors):
        tz.pack_into(buf, slots, tensors)  # whole payload: strided sources copy directly
        return
    for slot, t in zip(slots, tensors):
        a, b = max(slot.offset, lo), min(slot.offset + slot.nbytes, hi)
        if a >= b:
            continue
        src = tz.as_bytes(t.detach())[a - slot.offset:b - slot.offset]
        dst = torch.frombuffer(buf, dtype=torch.uint8, count=b - a, offset=a - lo)
        dst.copy_(src, non_blocking=non_blocking)


def copy_local(buf, slots, tensors, non_blocking: bool = False) -> None:
    if not non_blocking and all(t.device.type == "cpu" for t in tensors):
        tz.pack_into(buf, slots, tensors)
        return
    for slot, t in zip(slots, tensors):
        if slot.nbytes:
            tz.view_from(buf, slot).copy_(t.detach(), non_blocking=non_blocking)


def slot_of(entry) -> tz.TensorSlot:
    """A TensorSlot from a manifest TensorEntry."""
    return tz.TensorSlot(name=entry.name, dtype=entry.dtype, shape=tuple(entry.shape),
                         offset=entry.offset, nbytes=entry.nbytes,
                         global_shape=tuple(entry.global_shape),
                         global_offset=tuple(entry.global_offset))
