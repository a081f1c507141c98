"""A shard pushed over the network (PushShard) into a staging slot of the store.

The payload is received into memory of its own and verified before the store is
touched: a push that is refused (unknown job or rank, a version the job cannot take,
over the budget, more or fewer bytes than declared, a bad checksum) takes no staging
slot, frees or evicts nothing and marks no version dead. Only a good payload is then
staged (as ``TrainerStore.acquire_staging`` would) and copied in, the store's lock held
one piece at a time. The cost: the payload's size in transient anonymous memory, and
one copy (issue 18). :meth:`snapshotd.node.store_trainer.TrainerStore.push` delivers
the staged shard as an adopted one.
"""

from __future__ import annotations

from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (
    ConflictError,
    InvalidRequestError,
    MemoryBudgetExceededError,
    UnknownRankError,
)
from snapshotd.core.ledger import SlotState
from snapshotd.node.store_state import StoreState
from snapshotd.node.store_verify import PayloadVerifier

_COPY_BYTES = 64 << 20  # a verified push is copied into its slot this much per hold of the lock


def stage_push(st: StoreState, verifier: PayloadVerifier, acquire_staging, m: pb.ShardManifest,
               chunks) -> str:
    """Receive and verify ``chunks`` (the payload in order), then copy it into a staging
    slot taken with ``acquire_staging(job, rank, version, nbytes)``; returns the slot's
    segment name. Refusals are counted (``st.refuse``) and change nothing."""
    mf.validate_manifest(m, require_checksums=True)
    _check(st, m)
    buf = bytearray(m.payload_bytes)  # freed with its last reference (no export to close)
    try:
        _receive(m, chunks, memoryview(buf))
        verifier.verify_payload(buf, m, "pushed shard")
    except Exception as exc:
        raise st.refuse(exc)
    name, _ = acquire_staging(m.job_id, m.rank, m.version, m.payload_bytes)
    seg, src = st.held(name).segment, memoryview(buf)
    for off in range(0, m.payload_bytes, _COPY_BYTES):  # the lock held one piece at a time
        with st.lock:  # the slot may have been taken over by a newer version
            if not _owns_staging(st, m, name):
                raise st.refuse(ConflictError(
                    f"job {m.job_id!r} rank {m.rank} version {m.version}: the staging "
                    "slot was taken over while the shard was pushed"))
            seg.buf[off:off + _COPY_BYTES] = src[off:off + _COPY_BYTES]
    src.release()
    del buf
    return name


def _check(st: StoreState, m: pb.ShardManifest) -> None:
    """Refuse, before a byte is read, a push the job could not take (changes nothing)."""
    with st.lock:
        led = st.job(m.job_id)
        try:
            if not 0 <= m.rank < led.world_size:
                raise UnknownRankError(f"job {m.job_id!r} is saved at world_size {led.world_size}: "
                                       f"ranks 0..{led.world_size - 1}, not {m.rank}")
            if m.version <= led.committed_version:
                raise ConflictError(f"job {m.job_id!r}: version {m.version} is not newer than "
                                    f"the committed version {led.committed_version}")
            if m.payload_bytes > st.memory_budget_bytes:
                raise MemoryBudgetExceededError(
                    f"a push of {m.payload_bytes} bytes is larger than the whole memory budget "
                    f"of {st.memory_budget_bytes} bytes")
        except Exception as exc:
            raise st.refuse(exc)


def _receive(m: pb.ShardManifest, chunks, out: memoryview) -> None:
    off = 0
    for data in chunks:
        if len(data) > m.payload_bytes - off:
            raise InvalidRequestError(
                f"push carries more than the {m.payload_bytes} bytes its manifest declares")
        out[off:off + len(data)] = data
        off += len(data)
    if off != m.payload_bytes:
        raise InvalidRequestError(f"push carried {off} bytes, its manifest declares {m.payload_bytes}")


def _owns_staging(st: StoreState, m: pb.ShardManifest, name: str) -> bool:
    led = st.jobs.get(m.job_id)
    slot = led.slot_of(m.rank, m.version, SlotState.STAGING) if led else None
    return slot is not None and st.name_at(m.job_id, m.rank, slot.index) == name
