"""The training-loop hook: ``Snapshotter.save(step)`` and ``Snapshotter.restore()``.

Life of one ``save(step)`` (version = step):
 1) wait for the previous snapshot's hand-off to finish (back-pressure, rarely > 0);
 2) collect the state: model, optimizer, LR scheduler, extra state, RNG states, step
    (tensors by reference, no copies) and lay it out (cached while shapes stay put);
 3) ask the daemon for a staging segment (never the one holding the last committed
    version) and copy every tensor into it -- the only part that blocks training.
    On CUDA the copies are issued on a side stream into pinned shared memory and
    training waits for them only before the next optimizer step;
 4) in a background thread: hand the segment and its manifest to the daemon, which
    checksums and adopts it; the version commits when every rank has delivered it.

If the daemon cannot be reached, ``save`` warns and training goes on (or raises, with
``on_daemon_unavailable="raise"``); no call waits longer than its deadline.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from snapshotd.wire import config as cfgmod
from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.core.checkfree import CheckFreeSettings  # noqa: F401 (SnapshotterConfig.checkfree)
from snapshotd.wire.errors import (
    ConflictError,
    DaemonUnavailableError,
    SnapshotdError,
    SnapshotInFlightError,
    UnknownJobError,
)
from snapshotd_client import layout as lo
from snapshotd_client import pipeline as pl
from snapshotd_client import state as st
from snapshotd_client import tensors as tz
from snapshotd_client.transport import DaemonClient, SegmentCache

log = logging.getLogger("snapshotd_client")


@dataclass
class SnapshotterConfig:
    job_id: str = field(default_factory=lambda: os.environ.get(cfgmod.ENV_JOB_ID, "default"))
    rank: int | None = None  # default: torch.distributed rank, else $RANK, else 0
    world_size: int | None = None  # ranks of the job
    local_world_size: int | None = None  # ranks on this node (default $LOCAL_WORLD_SIZE, else all)
    # REFT-style: model and optimizer are identical on the data-parallel ranks, so each
    # stores only its 1/DP slice; restore gathers the slices from every DP rank.
    shard_replicated: bool = False
    dp_ranks: tuple[int, ...] | None = None  # the DP group's global ranks (default: all)
    socket_path: str | None = None  # default: $SNAPSHOTD_SOCKET or the daemon's default
    address: str | None = None  # "host:port" instead of a socket (needs a token)
    token: str | None = field(default_factory=lambda: os.environ.get(cfgmod.ENV_TOKEN))
    on_daemon_unavailable: str = "warn"  # or "raise"
    block_size_bytes: int = mf.DEFAULT_BLOCK_SIZE_BYTES
    checksum_on_client: bool = False  # end-to-end checksums computed by the trainer
    timeout_s: float = 30.0
    # Older snapshots still waiting for other ranks/nodes: wait this long for them to
    # commit (back-pressure), then give up the oldest (it was torn) and go on.
    inflight_wait_s: float = 10.0
    # Pipeline parallelism (for CheckFree): (stage index, number of stages) of this rank;
    # on the first / last stage the names of its embedding / de-embedding parameters
    # (edge_layers: never averaged, restored from the copies on the partner), and on a
    # CheckFree+ swap partner the names of its copies of them (edge_copies, see
    # snapshotd.core.checkfree). Each save records them in the rank's local state.
    pipeline_stage: tuple[int, int] | None = None
    edge_copies: tuple[str, ...] = ()
    edge_layers: tuple[str, ...] = ()
    # CheckFree rung of restore() (needs pipeline_stage): when this rank's own shard cannot
    # be opened or rebuilt (FAILED_PRECONDITION), rebuild the stage approximately from its
    # neighbours (snapshotd_client.checkfree_restore). None: disabled, the error propagates.
    # A neighbour stored with shard_replicated=True is gathered from its DP ranks' slices.
    checkfree: "CheckFreeSettings | None" = None
    stage_ranks: tuple[int, ...] | None = None  # rank of each stage (default: rank == stage)
    checkfree_sources: dict[int, str] | None = None  # rank -> daemon target to fetch it from


@dataclass
class SaveStats:
    version: int
    bytes: int
    blocking_s: float  # time save() held the training loop
    backpressure_s: float  # part of blocking_s spent waiting for the previous hand-off
    committed: bool = False
    handoff_s: float = 0.0


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's per-thread last error after a failed call whose error
    was handled here: PyTorch reads it (cudaGetLastError) after its next kernel launch
    and would report a stale, unrelated error there. torch.cuda.cudart() does not bind
    cudaGetLastError, so find the runtime torch already loaded, by its soname."""
    major = (torch.version.cuda or "").split(".")[0]
    if not major:
        return
    try:
        lib = ctypes.CDLL(f"libcudart.so.{major}", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:  # linked statically or under another name: nothing to reset
        return
    lib.cudaGetLastError()


def _cuda_call(fn: str, *args) -> str | None:
    """Call a torch.cuda.cudart() function; None on success, else the error text (and
    the runtime's last error cleared)."""
    cudart = torch.cuda.cudart()
    err = getattr(cudart, fn)(*args)
    if int(err) == 0:
        return None
    _clear_cuda_error()
    return f"{cudart.cudaGetErrorString(err)} (cudaError {int(err)})"


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Snapshotter:
    """Snapshot a training process's state into the node's snapshotd daemon.

    ``extra_state``: a dict name -> object with state_dict()/load_state_dict(), or a
    plain JSON-able value / tensor structure (then read it back from
    ``snapshotter.extra_state`` after ``restore()``).
    """

    def __init__(self, model: torch.nn.Module, optimizer=None, lr_scheduler=None,
                 extra_state: dict | None = None, config: SnapshotterConfig | None = None, **kw):
        self.cfg = config or SnapshotterConfig()
        for k, v in kw.items():
            if not hasattr(self.cfg, k):
                raise TypeError(f"unknown Snapshotter option {k!r}")
            setattr(self.cfg, k, v)
        if self.cfg.on_daemon_unavailable not in ("warn", "raise"):
            raise ValueError("on_daemon_unavailable must be 'warn' or 'raise'")
        mf.validate_job_id(self.cfg.job_id)
        r, w = _default_rank_world()
        self.rank = r if self.cfg.rank is None else self.cfg.rank
        self.world_size = w if self.cfg.world_size is None else self.cfg.world_size
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.extra_state = dict(extra_state or {})
        if self.cfg.address:
            target = self.cfg.address
        else:
            target = "unix:" + (self.cfg.socket_path or cfgmod.default_socket_path())
        self.client = DaemonClient(target, token=self.cfg.token, timeout_s=self.cfg.timeout_s)
        self.segments = SegmentCache(on_close=self._unpin)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshotd-handoff")
        self._pending: Future | None = None
        self._registered = False
        self._layout_key = None
        self._layout = None  # (slots, total, manifest template)
        self._copy_done = None  # CUDA event the next optimizer step waits for
        self._side_stream = None
        # segment name -> (the mapping, its address): mappings registered with the CUDA
        # driver. Keyed to the mapping object, not just the name: a name re-mapped after
        # a restore or a daemon restart is a new mapping and is registered again.
        self._pinned: dict[str, tuple[object, int]] = {}
        self._pin_failed = False  # cudaHostRegister refused once: copy unpinned from then on
        self.last_stats: SaveStats | None = None  # of the last completed hand-off
        self.last_blocking_s = 0.0  # how long the last save() held the training loop
        self.skipped = 0  # snapshots skipped because older ones had not committed yet
        self.restored_approximate = False
        self.restored_method: str | None = None  # "exact", "CheckFree" or "CheckFree+" after restore()
        self._grad_norm = None  # last record_grad_norm() value (float or 0-dim tensor)
        self._pipeline_layout = None  # "pipeline" entry less the grad norm, computed once
        self._pipeline_meta: dict | None = None  # "pipeline" entry of the last save/restore
        if self.cfg.pipeline_stage is not None:
            i, n = (int(x) for x in self.cfg.pipeline_stage)
            if not 0 <= i < n:
                raise ValueError(f"pipeline_stage {self.cfg.pipeline_stage!r}: need 0 <= index < stages")
            self.cfg.pipeline_stage = (i, n)
        self.cfg.edge_copies = tuple(self.cfg.edge_copies)
        self.cfg.edge_layers = tuple(self.cfg.edge_layers)
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            optimizer.register_step_pre_hook(lambda *a, **k: self._wait_device_copy())

    # -- daemon availability -------------------------------------------------------
    def _unavailable(self, what: str, exc: Exception) -> None:
        if self.cfg.on_daemon_unavailable == "raise":
            raise exc
        warnings.warn(f"snapshotd: {what} skipped, daemon unavailable at {self.client.target}: "
                      f"{exc}", RuntimeWarning, stacklevel=3)

    def _ensure_registered(self, restarting: bool = False) -> int:
        lws = self.cfg.local_world_size
        if lws is None:
            lws = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) if self.world_size > 1 else 0
        resp = self.client.register_job(self.cfg.job_id, self.world_size, lws, restarting)
        if resp.block_size_bytes and resp.block_size_bytes != self.cfg.block_size_bytes:
            self.cfg.block_size_bytes = resp.block_size_bytes  # the cluster's block size
            self._layout_key = None
        self._registered = True
        return resp.latest_committed_version

    # -- state collection ------------------------------------------------------------
    def _collect(self, step: int) -> tuple[dict, dict]:
        """(replicated state, this rank's own state), tensors by reference."""
        rep = {"model": self.model.state_dict()}
        if self.optimizer is not None:
            rep["optimizer"] = self.optimizer.state_dict()
        local = {"step": step, "rng": st.capture_rng_state()}
        if self.lr_scheduler is not None:
            local["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.extra_state:
            local["extra"] = {k: (v.state_dict() if hasattr(v, "state_dict") else v)
                              for k, v in self.extra_state.items()}
        if self.cfg.pipeline_stage is not None:
            local["pipeline"] = self._pipeline_entry()
        return rep, local

    # -- pipeline stage metadata (CheckFree) ---------------------------------------------
    def record_grad_norm(self, norm) -> None:
        """Remember the last step's gradient norm (after clipping): a float or a one-element
        tensor. Cheap: a tensor is converted (and non-finite values become None) only when
        a snapshot is taken."""
        if isinstance(norm, torch.Tensor):
            if norm.numel() != 1:
                raise ValueError("record_grad_norm: expected a one-element tensor")
            self._grad_norm = norm.detach()
        elif norm is None:
            self._grad_norm = None
        else:
            self._grad_norm = float(norm)

    @property
    def grad_norm(self) -> float | None:
        """The last recorded gradient norm as a float; None if unset or non-finite."""
        return pl.finite_or_none(self._grad_norm)

    def _pipeline_entry(self) -> dict:
        if self._pipeline_layout is None:
            i, n = self.cfg.pipeline_stage
            self._pipeline_layout = pl.stage_meta(self.model, i, n, None, self.cfg.edge_copies,
                                                  self.cfg.edge_layers)
        return {**self._pipeline_layout, "grad_norm": self.grad_norm}

    def stage_info(self):
        """StageInfo (snapshotd.core.checkfree) of the last save, or of the restored snapshot;
        None when that snapshot has no pipeline metadata."""
        return None if self._pipeline_meta is None else pl.stage_info_from_meta(self._pipeline_meta)

    def _dp(self) -> tuple[tuple[int, ...], int]:
        if not self.cfg.shard_replicated:
            return (self.rank,), 0
        ranks = tuple(self.cfg.dp_ranks) if self.cfg.dp_ranks else tuple(range(self.world_size))
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} is not in dp_ranks {ranks}")
        return ranks, ranks.index(self.rank)

    def _plan(self, rep_named, loc_named):
        key = (tuple((n, t.dtype, tuple(t.shape)) for n, t in rep_named),
               tuple((n, t.dtype, tuple(t.shape)) for n, t in loc_named))
        if key != self._layout_key:
            dp_ranks, dp_index = self._dp()
            lay = lo.plan_shard(rep_named, loc_named, len(dp_ranks), dp_index)
            tmpl = pb.ShardManifest(
                job_id=self.cfg.job_id, rank=self.rank, payload_bytes=lay.payload_bytes,
                block_size_bytes=self.cfg.block_size_bytes, checksum_algo=mf.CHECKSUM_ALGO,
                replicated_bytes=lay.replicated_bytes, slice_offset=lay.slice_lo,
                slice_bytes=lay.slice_hi - lay.slice_lo, dp_ranks=dp_ranks)
            for dst, slots in ((tmpl.replicated_tensors, lay.replicated), (tmpl.tensors, lay.local)):
                for x in slots:
                    dst.add(name=x.name, dtype=x.dtype, shape=x.shape, offset=x.offset,
                            nbytes=x.nbytes, global_shape=x.global_shape,
                            global_offset=x.global_offset)
            self._layout_key, self._layout = key, (lay, tmpl)
        return self._layout

    # -- save ---------------------------------------------------------------------
    def save(self, step: int) -> Future | None:
        """Snapshot the state as version ``step`` (>= 1). Returns a Future of SaveStats."""
        if step < 1:
            raise ValueError("step must be >= 1 (version 0 means 'nothing')")
        t0 = time.perf_counter()
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:
                pass  # reported by the future's owner / logged in the hand-off
        t_bp = time.perf_counter() - t0
        try:
            if not self._registered:
                self._ensure_registered()
            rep_state, loc_state = self._collect(step)
            rep_meta, rep_named = st.flatten_state(rep_state)
            loc_meta, loc_named = st.flatten_state(loc_state)
            lay, tmpl = self._plan(rep_named, loc_named)
            total = lay.payload_bytes
            try:
                resp = self._acquire(step, total)
            except UnknownJobError:  # the daemon lost its index: register again
                self._ensure_registered()
                resp = self._acquire(step, total)
            seg = self.segments.get(resp.segment_name, writable=True)
            self._copy(seg, lay, [t for _, t in rep_named], [t for _, t in loc_named])
        except DaemonUnavailableError as exc:
            self._registered = False
            self._unavailable(f"snapshot of step {step}", exc)
            return None
        except SnapshotInFlightError as exc:  # only if even a forced acquire failed
            self.skipped += 1
            log.warning("snapshotd: step %d skipped: %s", step, exc)
            return None
        blocking = time.perf_counter() - t0
        self.last_blocking_s = blocking
        self._pipeline_meta = loc_state.get("pipeline")
        m = pb.ShardManifest()
        m.CopyFrom(tmpl)
        m.version = step
        m.meta_json = st.dumps_meta({"replicated": rep_meta, "local": loc_meta})
        stats = SaveStats(version=step, bytes=total, blocking_s=blocking, backpressure_s=t_bp)
        self._pending = self._pool.submit(self._handoff, resp.segment_name, seg, m, stats,
                                          self._copy_done)
        return self._pending

    def _acquire(self, step: int, total: int):
        deadline = time.monotonic() + self.cfg.inflight_wait_s
        delay = 0.001
        while True:
            try:
                return self.client.acquire_staging(self.cfg.job_id, self.rank, step, total)
            except SnapshotInFlightError as exc:
                if time.monotonic() >= deadline:
                    log.warning("snapshotd: %s; giving up the oldest uncommitted version", exc)
                    return self.client.acquire_staging(self.cfg.job_id, self.rank, step, total,
                                                       force=True)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _copy(self, seg, lay, rep_tensors, loc_tensors) -> None:
        """The blocking part: copy this rank's bytes into the staging segment."""
        buf = seg.buf if seg.buf is not None else bytearray(0)
        cuda = any(t.device.type == "cuda" for t in rep_tensors + loc_tensors)
        if not cuda:
            lo.copy_slice(buf, lay.replicated, rep_tensors, lay.slice_lo, lay.slice_hi,
                          lay.replicated_bytes)
            lo.copy_local(buf, lay.local, loc_tensors)
            self._copy_done = None
            return
        self._pin(seg)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lo.copy_slice(buf, lay.replicated, rep_tensors, lay.slice_lo, lay.slice_hi,
                          lay.replicated_bytes, non_blocking=True)
            lo.copy_local(buf, lay.local, loc_tensors, non_blocking=True)
            for t in rep_tensors + loc_tensors:
                if t.device.type == "cuda":
                    t.record_stream(side)
            ev = torch.cuda.Event()
            ev.record(side)
        self._copy_done = ev

    @property
    def pinned_segments(self) -> tuple[str, ...]:
        """Names of the staging segments currently registered with the CUDA driver."""
        return tuple(self._pinned)

    def _pin(self, seg) -> None:
        """Page-lock a staging mapping for the CUDA driver (cudaHostRegister), once per
        mapping. A device-to-host copy into pageable memory goes through a driver bounce
        buffer and holds the calling thread until it is done; into registered memory it is
        DMA that runs on the side stream while training goes on. If the driver refuses
        (a locked-memory limit, say), warn once and copy unpinned: slower, still correct."""
        if seg.buf is None or self._pin_failed:
            return
        held = self._pinned.get(seg.name)
        if held is not None and held[0] is seg:
            return
        if held is not None:  # a mapping SegmentCache never closed through _unpin
            self._unpin(held[0])
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(seg.buf))
        err = _cuda_call("cudaHostRegister", ptr, seg.size, 0)
        if err is not None:
            self._pin_failed = True
            warnings.warn(f"snapshotd: cudaHostRegister of staging segment {seg.name} "
                          f"({seg.size} bytes) failed: {err}; device-to-host copies go "
                          f"unpinned (synchronous, slower)", RuntimeWarning, stacklevel=4)
            return
        self._pinned[seg.name] = (seg, ptr)

    def _unpin(self, seg) -> None:
        """SegmentCache's on_close: unregister a mapping before it is unmapped. Copies
        into it must be finished first (the driver would DMA into unmapped pages)."""
        held = self._pinned.get(seg.name)
        if held is None or held[0] is not seg:
            return
        ev = self._copy_done
        if ev is not None:
            ev.synchronize()
        del self._pinned[seg.name]
        err = _cuda_call("cudaHostUnregister", held[1])
        if err is not None:
            log.warning("snapshotd: cudaHostUnregister of %s failed: %s", seg.name, err)

    def _wait_device_copy(self) -> None:
        ev = self._copy_done
        if ev is not None:
            ev.synchronize()  # parameters may change after this: the copy must be done
            self._copy_done = None

    def _handoff(self, name: str, seg, m: pb.ShardManifest, stats: SaveStats,
                 ev=None) -> SaveStats:
        t0 = time.perf_counter()
        if ev is not None:  # this save's own event: the optimizer hook may clear _copy_done
            ev.synchronize()
        if self.cfg.checksum_on_client and seg.buf is not None:
            m.block_checksums.extend(mf.block_checksums(seg.buf, m.payload_bytes, m.block_size_bytes))
        try:
            resp = self.client.adopt(name, m)
        except SnapshotdError as exc:
            if isinstance(exc, DaemonUnavailableError):
                self._registered = False
            log.warning("snapshotd: hand-off of step %d failed: %s", m.version, exc)
            raise
        stats.committed = resp.committed
        stats.handoff_s = time.perf_counter() - t0
        self.last_stats = stats
        return stats

    def wait(self, timeout: float | None = None) -> SaveStats | None:
        """Block until the last save has been handed to the daemon."""
        if self._pending is None:
            return None
        return self._pending.result(timeout)

    # -- restore ---------------------------------------------------------------------
    def restore(self) -> int:
        """Load the latest committed snapshot; return its step (0 when there is none).

        When the parity cannot give this rank its state back (FAILED_PRECONDITION) and the
        rank is a pipeline stage with ``checkfree`` set, the stage is rebuilt approximately
        from its neighbours (``restored_approximate``, ``restored_method``)."""
        latest = 0
        t0 = time.monotonic()
        try:
            # A restore starts the job over from its committed version: versions the
            # previous run delivered but never committed are dropped everywhere.
            latest = self._ensure_registered(restarting=True)
            if latest == 0:
                log.info("snapshotd: nothing to restore for job %s", self.cfg.job_id)
                return 0
            log.info("snapshotd: restoring job %s rank %d from step %d (a node that lost its "
                     "shards rebuilds them first)", self.cfg.job_id, self.rank, latest)
            resp = self.client.open_shard(self.cfg.job_id, self.rank, latest)
            t_open = time.monotonic()
        except DaemonUnavailableError as exc:
            self._unavailable("restore", exc)
            return 0
        except ConflictError as exc:  # our shard is lost and cannot be rebuilt
            if latest == 0:  # the registration itself was refused
                raise
            return self._restore_fallback(latest, exc)
        lost = None
        try:
            step = self._load(resp.segment_name, resp.manifest, latest)
        except ConflictError as exc:  # a DP peer's slice of our replicated state is lost
            lost = exc.with_traceback(None)  # drop the frames holding views of the segments
        finally:
            try:
                self.segments.close()
            except BufferError:
                if lost is None:
                    raise
        if lost is not None:
            return self._restore_fallback(latest, lost)
        self.restored_method = "exact"
        dt = time.monotonic() - t0
        size = resp.manifest.replicated_bytes + resp.manifest.payload_bytes - resp.manifest.slice_bytes
        log.info("snapshotd: restored job %s rank %d at step %d: %.1f MiB in %.2f s (%.0f MiB/s; "
                 "daemon open %.2f s, load %.2f s)", self.cfg.job_id, self.rank, step, size / 2**20,
                 dt, size / 2**20 / max(dt, 1e-9), t_open - t0, time.monotonic() - t_open)
        return step

    def _restore_fallback(self, latest: int, exc: Exception) -> int:
        """The next rung when the parity cannot give this rank its state back: CheckFree
        (pipeline stages with ``checkfree`` set), else the daemon's error."""
        if self.cfg.checkfree is None or self.cfg.pipeline_stage is None:
            raise exc
        from snapshotd_client.checkfree_restore import restore_checkfree

        return restore_checkfree(self, latest, exc)

    def _replicated_payload(self, seg, m: pb.ShardManifest, version: int):
        """The whole replicated payload: our own bytes, or every DP rank's slice gathered."""
        if m.slice_offset == 0 and m.slice_bytes == m.replicated_bytes:
            return seg.buf
        out = torch.empty(m.replicated_bytes, dtype=torch.uint8)
        for r in m.dp_ranks:
            if r == self.rank:
                other, om = seg, m
            else:
                resp = self.client.open_shard(self.cfg.job_id, r, version)
                other, om = self.segments.get(resp.segment_name, writable=False), resp.manifest
            if om.replicated_bytes != m.replicated_bytes:
                raise SnapshotdError(f"rank {r}'s slice belongs to another layout")
            if om.slice_bytes:
                src = tz.view_from(other.buf, tz.TensorSlot("slice", "uint8", (om.slice_bytes,),
                                                            0, om.slice_bytes, (), ()))
                out[om.slice_offset:om.slice_offset + om.slice_bytes].copy_(src)
        return out.numpy()

    def _load(self, name: str, m: pb.ShardManifest, version: int) -> int:
        seg = self.segments.get(name, writable=False)
        buf = seg.buf if seg.buf is not None else bytearray(0)
        meta = st.loads_meta(m.meta_json)
        rep_buf = self._replicated_payload(seg, m, version) if m.replicated_bytes else bytearray(0)
        rep_views = [tz.view_from(rep_buf, lo.slot_of(t)) for t in m.replicated_tensors]
        # Model tensors are copied straight into the parameters; everything else is
        # cloned out of the segment (the optimizer would otherwise alias it).
        rep_tensors = [v if t.name.startswith("model/") else v.clone()
                       for v, t in zip(rep_views, m.replicated_tensors)]
        loc_tensors = [tz.view_from(buf, lo.slot_of(t)).clone() for t in m.tensors]
        rep = st.unflatten_state(meta["replicated"], rep_tensors)
        local = st.unflatten_state(meta["local"], loc_tensors)
        self.model.load_state_dict(rep["model"])
        if self.optimizer is not None and "optimizer" in rep:
            self.optimizer.load_state_dict(rep["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in local:
            self.lr_scheduler.load_state_dict(local["lr_scheduler"])
        for k, v in local.get("extra", {}).items():
            tgt = self.extra_state.get(k)
            if hasattr(tgt, "load_state_dict"):
                tgt.load_state_dict(v)
            else:
                self.extra_state[k] = v
        st.restore_rng_state(local["rng"])
        self._pipeline_meta = local.get("pipeline")
        del rep_views, rep_tensors, rep, local
        return int(m.version)

    def close(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result(self.cfg.timeout_s)
            except Exception:
                pass
        self._pool.shutdown(wait=True)
        self.segments.close()
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
