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

import logging
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from snapshotd import config as cfgmod
from snapshotd import manifest as mf
from snapshotd._proto import snapshotd_pb2 as pb
from snapshotd.errors import (
    DaemonUnavailableError,
    SnapshotdError,
    SnapshotInFlightError,
    UnknownJobError,
)
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


@dataclass
class SaveStats:
    version: int
    bytes: int
    blocking_s: float  # time save() held the training loop
    backpressure_s: float  # part of blocking_s spent waiting for the previous hand-off
    committed: bool = False
    handoff_s: float = 0.0


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
        self.segments = SegmentCache()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshotd-handoff")
        self._pending: Future | None = None
        self._registered = False
        self._layout_key = None
        self._layout = None  # (slots, total, manifest template)
        self._copy_done = None  # CUDA event the next optimizer step waits for
        self._side_stream = None
        self._pinned: set[str] = set()
        self.last_stats: SaveStats | None = None  # of the last completed hand-off
        self.last_blocking_s = 0.0  # how long the last save() held the training loop
        self.skipped = 0  # snapshots skipped because older ones had not committed yet
        self.restored_approximate = False
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            optimizer.register_step_pre_hook(lambda *a, **k: self._wait_device_copy())

    # -- daemon availability -------------------------------------------------------
    def _unavailable(self, what: str, exc: Exception) -> None:
        if self.cfg.on_daemon_unavailable == "raise":
            raise exc
        warnings.warn(f"snapshotd: {what} skipped, daemon unavailable at {self.client.target}: "
                      f"{exc}", RuntimeWarning, stacklevel=3)

    def _ensure_registered(self) -> int:
        lws = self.cfg.local_world_size
        if lws is None:
            lws = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) if self.world_size > 1 else 0
        resp = self.client.register_job(self.cfg.job_id, self.world_size, lws)
        if resp.block_size_bytes and resp.block_size_bytes != self.cfg.block_size_bytes:
            self.cfg.block_size_bytes = resp.block_size_bytes  # the cluster's block size
            self._layout_key = None
        self._registered = True
        return resp.latest_committed_version

    # -- state collection ------------------------------------------------------------
    def _collect(self, step: int) -> dict:
        state = {"step": step, "model": self.model.state_dict(), "rng": st.capture_rng_state()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.extra_state:
            state["extra"] = {k: (v.state_dict() if hasattr(v, "state_dict") else v)
                              for k, v in self.extra_state.items()}
        return state

    def _plan(self, named):
        key = tuple((n, t.dtype, tuple(t.shape)) for n, t in named)
        if key != self._layout_key:
            slots, total = tz.plan_layout(named)
            tmpl = pb.ShardManifest(job_id=self.cfg.job_id, rank=self.rank, payload_bytes=total,
                                    block_size_bytes=self.cfg.block_size_bytes,
                                    checksum_algo=mf.CHECKSUM_ALGO)
            for s in slots:
                tmpl.tensors.add(name=s.name, dtype=s.dtype, shape=s.shape, offset=s.offset,
                                 nbytes=s.nbytes, global_shape=s.global_shape,
                                 global_offset=s.global_offset)
            self._layout_key, self._layout = key, (slots, total, tmpl)
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
            state = self._collect(step)
            meta, named = st.flatten_state(state)
            slots, total, tmpl = self._plan(named)
            try:
                resp = self._acquire(step, total)
            except UnknownJobError:  # the daemon lost its index: register again
                self._ensure_registered()
                resp = self._acquire(step, total)
            seg = self.segments.get(resp.segment_name, writable=True)
            tensors = [t for _, t in named]
            self._copy(seg, slots, tensors)
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
        m = pb.ShardManifest()
        m.CopyFrom(tmpl)
        m.version = step
        m.meta_json = st.dumps_meta(meta)
        stats = SaveStats(version=step, bytes=total, blocking_s=blocking, backpressure_s=t_bp)
        self._pending = self._pool.submit(self._handoff, resp.segment_name, seg, m, stats)
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

    def _copy(self, seg, slots, tensors) -> None:
        cuda_idx = [i for i, t in enumerate(tensors) if t.device.type == "cuda"]
        if not cuda_idx:
            tz.pack_into(seg.buf, slots, tensors)
            self._copy_done = None
            return
        if seg.name not in self._pinned and seg.buf is not None:
            import ctypes

            ptr = ctypes.addressof(ctypes.c_char.from_buffer(seg.buf))
            torch.cuda.cudart().cudaHostRegister(ptr, seg.size, 0)
            self._pinned.add(seg.name)
        cpu = [i for i in range(len(tensors)) if i not in set(cuda_idx)]
        tz.pack_into(seg.buf, [slots[i] for i in cpu], [tensors[i] for i in cpu])
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in cuda_idx:
                dst = tz.view_from(seg.buf, slots[i])
                src = tensors[i].to_local() if hasattr(tensors[i], "to_local") else tensors[i]
                dst.copy_(src.detach(), non_blocking=True)
                src.record_stream(side)
            ev = torch.cuda.Event()
            ev.record(side)
        self._copy_done = ev

    def _wait_device_copy(self) -> None:
        ev = self._copy_done
        if ev is not None:
            ev.synchronize()  # parameters may change after this: the copy must be done
            self._copy_done = None

    def _handoff(self, name: str, seg, m: pb.ShardManifest, stats: SaveStats) -> SaveStats:
        t0 = time.perf_counter()
        ev = self._copy_done
        if ev is not None:
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
        """Load the latest committed snapshot; return its step (0 when there is none)."""
        try:
            latest = self._ensure_registered()
            if latest == 0:
                log.info("snapshotd: nothing to restore for job %s", self.cfg.job_id)
                return 0
            resp = self.client.open_shard(self.cfg.job_id, self.rank, latest)
        except DaemonUnavailableError as exc:
            self._unavailable("restore", exc)
            return 0
        seg = self.segments.get(resp.segment_name, writable=False)
        try:
            step = self._load(seg, resp.manifest)
        finally:
            self.segments.close()
        log.info("snapshotd: restored job %s rank %d at step %d", self.cfg.job_id, self.rank, step)
        return step

    def _load(self, seg, m: pb.ShardManifest) -> int:
        buf = seg.buf if seg.buf is not None else bytearray(0)
        views = [tz.view_from(buf, tz.TensorSlot(
            name=t.name, dtype=t.dtype, shape=tuple(t.shape), offset=t.offset, nbytes=t.nbytes,
            global_shape=tuple(t.global_shape), global_offset=tuple(t.global_offset)))
            for t in m.tensors]
        model_idx = {i for i, t in enumerate(m.tensors) if t.name.startswith("model/")}
        # Only the model's tensors are copied straight into parameters; everything
        # else is cloned out of the segment (the optimizer would otherwise alias it).
        tensors = [v if i in model_idx else v.clone() for i, v in enumerate(views)]
        state = st.unflatten_state(st.loads_meta(m.meta_json), tensors)
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for k, v in state.get("extra", {}).items():
            tgt = self.extra_state.get(k)
            if hasattr(tgt, "load_state_dict"):
                tgt.load_state_dict(v)
            else:
                self.extra_state[k] = v
        st.restore_rng_state(state["rng"])
        del views, tensors, state
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
