"""The last rung of ``Snapshotter.restore()``: the newest verified durable checkpoint.

When neither this node's RAM, nor the group's parity (rebuild, degraded read), nor
CheckFree can give the job its state back, or the daemons hold nothing at all (the whole
allocation was replaced), ``restore()`` loads the newest complete checkpoint the daemons
flushed to the durable URL (``SnapshotterConfig.durable_url``, default
``$SNAPSHOTD_DURABLE_URL``; layout: :mod:`snapshotd.wire.durable_store`, docs/DURABLE.md).

:func:`restore_durable`: every rank of the job calls it together (as it calls
``restore()``). Each rank verifies the files its state is in (its own rank file, rank 0's
with ``--durable-replicated rank0``, its DP peers' with ``shard_replicated``) of each
complete version, newest first; the ranks agree on the newest version every rank verified
(through torch.distributed when its group spans the job), rebuild their payload from the
items and load it with the exact rung's loader. Nothing returned points into a mapping.
Training thread only.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import torch
from google.protobuf import json_format

from snapshotd.wire import durable_store as ds
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import SnapshotdError, VersionNotFoundError

log = logging.getLogger("snapshotd_client")
ALIGN = 64


class _BufferSegments:
    """What ShardLoader reads a payload from: here a buffer of our own (no mapping)."""

    class _Seg:
        def __init__(self, buf):
            self.buf = buf

    def __init__(self, buf):
        self._seg = self._Seg(buf)

    def get(self, name, writable=False):
        return self._seg


def _needed_ranks(idx: dict, rank: int) -> list[int]:
    rec = idx["ranks"][str(rank)]
    m = rec["manifest"]
    need = {rank}
    rep = int(m.get("replicated_bytes", 0))
    whole = int(m.get("slice_offset", 0)) == 0 and int(m.get("slice_bytes", 0)) == rep
    if rep and not whole:
        need.update(int(r) for r in m.get("dp_ranks", []))
    elif rep and idx.get("replicated") == "rank0" and rank != 0:
        need.add(0)
    return sorted(need)


def _files_of(idx: dict, rank: int) -> list[str]:
    return [idx["ranks"][str(r)]["file"] for r in _needed_ranks(idx, rank)]


def newest_for_rank(store, job: str, rank: int, world_size: int, not_above: int | None = None
                    ) -> tuple[int, list[str]]:
    """(newest complete version whose files this rank needs all verify, why newer ones
    were passed over); 0 when none."""
    skipped = []
    for v in reversed(ds.complete_versions(store, job)):
        if not_above is not None and v > not_above:
            continue
        try:
            idx = ds.read_index(store, job, v)
            if idx.get("kind", "snapshotter") != "snapshotter":
                raise VersionNotFoundError("written by dcp.save (SnapshotdWriter): load it with "
                                           "dcp.load(checkpoint_id=<its folder>)")
            if idx["world_size"] != world_size or str(rank) not in idx["ranks"]:
                raise VersionNotFoundError(f"saved by {idx['world_size']} ranks, the job has "
                                           f"{world_size} (load it with dcp.load to reshard)")
            ds.verify_version(store, job, v, [ds.METADATA] + _files_of(idx, rank))
            return v, skipped
        except (SnapshotdError, KeyError, TypeError) as exc:
            skipped.append(f"v{v}: {exc}")
            log.warning("snapshotd: durable checkpoint %s/%s v%d passed over: %s", store.url, job, v, exc)
    return 0, skipped


def _item_bytes(data: bytes, it: dict) -> memoryview:
    """The raw bytes of one item of a rank file (a torch.save'd tensor at offset/length)."""
    t = torch.load(io.BytesIO(data[it["offset"]:it["offset"] + it["length"]]), weights_only=True)
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def build_payload(store, job: str, version: int, idx: dict, rank: int):
    """(manifest, payload) of ``rank`` rebuilt from the durable files: the whole replicated
    payload at offset 0 (gathered from the DP peers' slices when it was stored sharded),
    then the rank's own tensors."""
    base = f"{job}/{ds.version_dir(version)}"
    files: dict[int, bytes] = {}
    for r in _needed_ranks(idx, rank):
        name = idx["ranks"][str(r)]["file"]
        files[r] = store.read_bytes(f"{base}/{name}")
        ds.check_file(store, f"{base}/{name}", idx["files"][name], files[r])  # the bytes we use
    rec = idx["ranks"][str(rank)]
    m = json_format.ParseDict(rec["manifest"], pb.ShardManifest())
    items = {tuple(it["entry"]): it for it in rec["items"]}
    rep_total = m.replicated_bytes
    base_off = -(-rep_total // ALIGN) * ALIGN
    lo = min((e.offset for e in m.tensors), default=m.payload_bytes)
    shift = base_off - lo
    out = pb.ShardManifest()
    out.CopyFrom(m)
    out.slice_offset, out.slice_bytes = 0, rep_total
    out.payload_bytes = base_off + (m.payload_bytes - lo)
    for e in out.tensors:
        e.offset += shift
    buf = np.zeros(max(out.payload_bytes, 1), np.uint8)

    def put(off: int, raw: memoryview, what: str, nbytes: int) -> None:
        if len(raw) != nbytes:
            raise SnapshotdError(f"durable v{version} rank {rank}: {what} has {len(raw)} bytes, "
                                 f"the manifest {nbytes}")
        buf[off:off + nbytes] = np.frombuffer(raw, np.uint8) if nbytes else buf[off:off]

    whole = m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes
    if rep_total and not whole:
        for r in m.dp_ranks:
            orec = idx["ranks"][str(r)]
            om = orec["manifest"]
            sl = next(it for it in orec["items"] if it["entry"][0] == "slice")
            put(int(om.get("slice_offset", 0)), _item_bytes(files[r], sl), f"rank {r}'s slice",
                int(om.get("slice_bytes", 0)))
    elif rep_total:
        rank0 = {tuple(it["entry"]): it for it in idx["ranks"]["0"]["items"]} if 0 in files else {}
        r0m = idx["ranks"]["0"]["manifest"].get("replicated_tensors", []) if 0 in files else []
        for i, e in enumerate(m.replicated_tensors):
            it, src = items.get(("r", i)), files[rank]
            if it is None:  # --durable-replicated rank0: rank 0's copy stands for ours
                it, src = rank0.get(("r", i)), files.get(0)
                theirs = r0m[i] if i < len(r0m) else {}
                if it is None or theirs.get("name") != e.name or list(map(int, theirs.get("shape", []))) \
                        != list(e.shape) or theirs.get("dtype") != e.dtype:
                    raise SnapshotdError(f"durable v{version}: rank {rank}'s {e.name!r} is not in the "
                                         "checkpoint (written with --durable-replicated rank0, and "
                                         "rank 0's state differs)")
            put(e.offset, _item_bytes(src, it), e.name, e.nbytes)
    for i, e in enumerate(out.tensors):
        put(e.offset, _item_bytes(files[rank], items[("t", i)]), e.name, e.nbytes)
    return out, buf


def _min_over_ranks(verdict, v: int) -> int:
    if verdict is None or not verdict.collective:
        return v
    t = torch.tensor([v], dtype=torch.int64, device=verdict.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def restore_durable(snap, verdict=None) -> int:
    """Load the newest durable checkpoint every rank verified into ``snap``'s objects; its
    step. SnapshotdError saying what is missing when there is none (module docstring)."""
    from snapshotd_client.loader import ShardLoader
    from snapshotd_client.providers import ProvidingLoader

    url, job = snap.cfg.durable_url, snap.cfg.job_id
    if not url:
        raise VersionNotFoundError("no durable tier configured (SnapshotterConfig.durable_url / "
                                   "$SNAPSHOTD_DURABLE_URL)")
    store = ds.open_store(url)
    v, skipped = newest_for_rank(store, job, snap.rank, snap.world_size)
    agreed = _min_over_ranks(verdict, v)  # the newest version every rank verified
    if agreed != v:
        v, more = newest_for_rank(store, job, snap.rank, snap.world_size, not_above=agreed)
        skipped += more
    if v == 0 or v != agreed:
        why = "; ".join(skipped) or "no complete checkpoint"
        raise VersionNotFoundError(f"no verified durable checkpoint of job {job!r} under {store.url} "
                                   f"for rank {snap.rank} ({why})")
    idx = ds.read_index(store, job, v)
    m, buf = build_payload(store, job, v, idx, snap.rank)
    loader = ProvidingLoader(ShardLoader(None, _BufferSegments(buf), job, snap.rank), snap.providers)
    step, snap.stage_recorder.last_meta = loader.load("durable", m, v, snap.model, snap.optimizer,
                                                      snap.lr_scheduler, snap.extra_state)
    snap.restored_method = "durable"
    log.warning("snapshotd: restored job %s rank %d from the durable checkpoint v%d at %s%s", job,
                snap.rank, v, store.url, f" (passed over: {'; '.join(skipped)})" if skipped else "")
    return int(step)


def _rungs_lacked(snap, exc: BaseException | None, durable_why: str) -> str:
    cf = ("not set up (a pipeline stage with checkfree)" if snap.cfg.checkfree is None
          or snap.cfg.pipeline_stage is None else "could not rebuild the stage (above)")
    ram = f"{type(exc).__name__}: {exc}" if exc is not None else "the daemons hold no committed version"
    return f"RAM and parity: {ram}; CheckFree: {cf}; durable: {durable_why}"


def restore_ladder(snap, run_restore) -> int:
    """``Snapshotter.restore()``: the daemon's rungs (``run_restore``: RAM, rebuild/degraded
    read from parity, CheckFree), then, with a durable URL, the newest verified durable
    checkpoint: when those rungs fail on every rank, or the daemons hold nothing. Every
    rank ends at the same step or every rank raises one error naming what each rung lacked."""
    from snapshotd_client.verdict import FAILED, OPENED, RestoreVerdict

    if not snap.cfg.durable_url:
        return run_restore(snap)
    try:
        step = run_restore(snap)
        if step:
            return step
        first = None
    except Exception as exc:  # every rank raises together (verdict.py)
        first = exc
    verdict = RestoreVerdict(snap.world_size, snap.rank)
    code, err, step = OPENED, None, 0
    try:
        step = restore_durable(snap, verdict)
    except Exception as exc:
        code, err = FAILED, exc
    codes = verdict.outcomes(code)
    if max(codes) == FAILED:
        if first is None and isinstance(err, VersionNotFoundError) and all(
                c == FAILED for c in codes):  # nothing anywhere: a job that starts afresh
            log.info("snapshotd: nothing to restore for job %s (no durable checkpoint either: %s)",
                     snap.cfg.job_id, err)
            return 0
        why = f"{type(err).__name__}: {err}" if err is not None else "another rank could not load it"
        msg = (f"restore of job {snap.cfg.job_id!r} rank {snap.rank}: every rung failed: "
               f"{_rungs_lacked(snap, first, why)}")
        log.error("snapshotd: %s", msg)
        try:
            out = type(first)(msg) if first is not None else SnapshotdError(msg)
        except TypeError:
            out = SnapshotdError(msg)
        raise out from (first or err)
    try:  # the daemons' uncommitted versions of the old run are dropped, as after any restore
        snap._ensure_registered(restarting=True)
    except Exception as exc:
        log.warning("snapshotd: after the durable restore, registering the job again failed: %s", exc)
    finally:
        snap.segments.close()
    log.warning("snapshotd: job %s rank %d restored by the durable rung at step %d (%s)",
                snap.cfg.job_id, snap.rank, step, _rungs_lacked(snap, first, "used"))
    return step
