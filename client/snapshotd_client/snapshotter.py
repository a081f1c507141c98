"""The training-loop hook: ``Snapshotter.save(step)`` and ``Snapshotter.restore()``.

Life of one ``save(step)`` (version = step):
 1) wait for the previous snapshot's hand-off to finish (back-pressure, rarely > 0);
 2) collect the state: model, optimizer, LR scheduler, extra state, RNG states, step
    (tensors by reference, no copies), flatten it (``flatcache.FlatCache``: the last
    walk's template, checked in full at every save) and lay it out (cached while
    names, dtypes and shapes stay put);
 3) take a staging segment (never the one holding the last committed version) and
    copy every tensor into it -- the only part that blocks training (with
    ``incremental=True``, frozen parameters the segment already holds are skipped:
    ``incremental.py``, docs/INCREMENTAL.md). When the saves come at a steady interval
    the segment was acquired and mapped by the previous hand-off (no call to the
    daemon here); otherwise it is asked for now. On CUDA the
    copies are issued on a side stream into pinned shared memory and training waits
    for them only before the next optimizer step;
 4) in a background thread (``worker.HandoffWorker``): write the manifest (JSON metadata) and hand the segment to
    the daemon, which checksums and adopts it -- in the same call acquiring the
    staging segment of the next save expected; the version commits when every rank
    has delivered it.

If the daemon cannot be reached, ``save`` warns and training goes on (or raises, with
``on_daemon_unavailable="raise"``); no call waits longer than its deadline.

The Snapshotter orchestrates; its parts get what they need in their constructors:
``config.SnapshotterConfig`` (the options), ``device_copy.StagingCopier`` (step 3),
``incremental.IncrementalTracker`` (what step 3 may skip), ``loader.ShardLoader`` (the
exact rung of ``restore``), ``pipeline.StageRecorder`` (per-stage metadata for
CheckFree), ``checkfree_restore`` (the CheckFree rung).
"""

from __future__ import annotations

import logging
import operator
import os
import secrets
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from snapshotd.wire import config as cfgmod
from snapshotd.wire import manifest as mf
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.errors import (
    DaemonUnavailableError,
    SnapshotdError,
    SnapshotInFlightError,
    SnapshotSkippedError,
    UnknownJobError,
)
from snapshotd.wire.ratelimit import WarningLimiter
from snapshotd_client import layout as lo
from snapshotd_client import pipeline as pl
from snapshotd_client import state as st
from snapshotd_client.config import SnapshotterConfig, default_rank_world, resolve_job_id
from snapshotd_client.device_copy import StagingCopier
from snapshotd_client.flatcache import FlatCache, compose_meta_json
from snapshotd_client.incremental import IncrementalTracker
from snapshotd_client.loader import ShardLoader
from snapshotd_client.modstate import ModelState
from snapshotd_client.providers import (ProvidingLoader, StateProviders, ensure_visible_logging,
                                        unwrap_model)
from snapshotd_client.transport import DaemonClient, SegmentCache
from snapshotd_client.verdict import run_restore
from snapshotd_client.worker import HandoffWorker

__all__ = ["SaveStats", "Snapshotter", "SnapshotterConfig"]

log = logging.getLogger("snapshotd_client")
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")
# One line per condition per 10 s, not one per step: a daemon away for a while, or ranks
# converging after it came back, repeat on every save.
_warn_limiter = WarningLimiter(10.0)


@dataclass
class SaveStats:
    version: int
    bytes: int
    blocking_s: float  # time save() held the training loop
    backpressure_s: float  # part of blocking_s spent waiting for the previous hand-off
    committed: bool = False
    handoff_s: float = 0.0
    # what the save wrote into the staging segment (< bytes with incremental=True when
    # frozen tensors were skipped) and what it skipped
    bytes_copied: int = 0
    bytes_skipped: int = 0
    tensors_skipped: int = 0
    bytes_hashed: int = 0  # payload bytes the daemon checksummed when it adopted the shard



def _check_when_busy(mode: str) -> str:
    if mode not in ("wait", "skip"):
        raise ValueError(f"when_busy must be 'wait' or 'skip', got {mode!r}")
    return mode


class Snapshotter:
    """Snapshot a training process's state into the node's snapshotd daemon.

    ``model``: the module or its DDP / DataParallel / torch.compile wrapper (the same
    state is saved either way). ``state``: named providers read at every save, objects
    with state_dict()/load_state_dict() (loaded in place by ``restore()``) or callables
    returning the current value (their values come back in ``snapshotter.restored``);
    see ``providers.py``. ``extra_state`` (older form): a dict name -> object with
    state_dict()/load_state_dict(), or a plain value read when the dict is read, at each
    save (read it back from ``snapshotter.extra_state`` after ``restore()``).
    ``job_id`` (option): by default from the launcher (``config.resolve_job_id``).
    """

    def __init__(self, model: torch.nn.Module, optimizer=None, lr_scheduler=None,
                 extra_state: dict | None = None, config: SnapshotterConfig | None = None, *,
                 state: dict | None = None, **kw):
        self.cfg = config or SnapshotterConfig()
        for k, v in kw.items():
            if not hasattr(self.cfg, k):
                raise TypeError(f"unknown Snapshotter option {k!r}")
            setattr(self.cfg, k, v)
        if self.cfg.on_daemon_unavailable not in ("warn", "raise"):
            raise ValueError("on_daemon_unavailable must be 'warn' or 'raise'")
        _check_when_busy(self.cfg.when_busy)
        if self.cfg.job_id is None:
            self.cfg.job_id, source = resolve_job_id()
            log.debug("snapshotd: job id %s from $%s", self.cfg.job_id, source)
        mf.validate_job_id(self.cfg.job_id)
        ensure_visible_logging()
        r, w = default_rank_world()
        self.rank = r if self.cfg.rank is None else self.cfg.rank
        self.world_size = w if self.cfg.world_size is None else self.cfg.world_size
        self.model, self.optimizer, self.lr_scheduler = unwrap_model(model), optimizer, lr_scheduler
        self.extra_state = dict(extra_state or {})
        self.providers = StateProviders(state, self.extra_state)
        if self.cfg.address:
            target = self.cfg.address
        else:
            target = "unix:" + (self.cfg.socket_path or cfgmod.default_socket_path())
        self.client = DaemonClient(target, token=self.cfg.token, timeout_s=self.cfg.timeout_s)
        self.copier = StagingCopier()
        self.copier.model = self.model  # its CUDA buffers are copied from clones (device_copy)
        self.segments = SegmentCache(on_close=self.copier.unpin)
        self.loader = ProvidingLoader(ShardLoader(self.client, self.segments, self.cfg.job_id,
                                                  self.rank), self.providers)
        self._pool = HandoffWorker("snapshotd-handoff")
        # Incremental snapshots (cfg.incremental, docs/INCREMENTAL.md): frozen parameters a
        # reused staging segment already holds are not copied again. The writer id makes the
        # daemon's content token of a segment ours alone.
        # Not with shard_replicated: every DP rank must lay the replicated payload out
        # alike (it stores a slice of it), and slices are copied whole anyway.
        self.incremental = (IncrementalTracker(self.model, optimizer)
                            if self.cfg.incremental and not self.cfg.shard_replicated else None)
        self.writer_id = secrets.token_hex(8) if self.incremental is not None else ""
        self._pending: Future | None = None
        self._registered = False
        self._layout_key = None
        self._layout = None  # (slots, total, manifest template)
        # the replicated state's walk, cached while its structure stays put (flatcache.py)
        self._rep_flat = FlatCache()
        self._loc_flat = FlatCache()
        self._rng = st.PackedRngCapture()
        self._model_state = ModelState(self.model)
        # The staging segment of the next save, acquired by the hand-off thread once the
        # saves come at a steady interval (see _stage_next): (version, name, mapping, token).
        self._staged: tuple | None = None
        self._asked: list[int] = []  # the last versions save() was asked for
        # False: every save asks the daemon for its staging segment itself (the old way;
        # one round trip to the daemon on the training thread per save).
        self.stage_ahead = True
        self.last_stats: SaveStats | None = None  # of the last completed hand-off
        self.last_blocking_s = 0.0  # how long the last save() held the training loop
        self.skipped = 0  # snapshots skipped because older ones had not committed yet
        self.skipped_busy = 0  # of those, skipped at once by when_busy="skip"
        self.restored_approximate = False
        self.restored_method: str | None = None  # "exact", "resharded", "CheckFree" or "CheckFree+" after restore()
        self.restored_from_world_size: int | None = None  # the restored version's, when resharded
        # grad norm, stage layout and the "pipeline" entry of the last save/restore
        self.stage_recorder = pl.StageRecorder(self.model, self.cfg)
        if self.cfg.pipeline_stage is not None:
            i, n = (int(x) for x in self.cfg.pipeline_stage)
            if not 0 <= i < n:
                raise ValueError(f"pipeline_stage {self.cfg.pipeline_stage!r}: need 0 <= index < stages")
            self.cfg.pipeline_stage = (i, n)
        self.cfg.edge_copies = tuple(self.cfg.edge_copies)
        self.cfg.edge_layers = tuple(self.cfg.edge_layers)
        if optimizer is not None and hasattr(optimizer, "register_step_pre_hook"):
            optimizer.register_step_pre_hook(lambda *a, **k: self.copier.wait())

    # -- daemon availability -------------------------------------------------------
    def _unavailable(self, what: str, exc: Exception) -> None:
        if self.cfg.on_daemon_unavailable == "raise":
            raise exc
        ok, held = _warn_limiter.allow(("unavailable", self.client.target))
        if ok:
            warnings.warn(f"snapshotd: {what} skipped, daemon unavailable at {self.client.target}: "
                          f"{exc}{_warn_limiter.held_note(held)}", RuntimeWarning, stacklevel=3)

    def _ensure_registered(self, restarting: bool = False) -> int:
        lws = self.cfg.local_world_size
        if lws is None:
            lws = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) if self.world_size > 1 else 0
        self._staged = None  # a restart fences what was staged before it
        resp = self.client.register_job(self.cfg.job_id, self.world_size, lws, restarting)
        if resp.block_size_bytes and resp.block_size_bytes != self.cfg.block_size_bytes:
            self.cfg.block_size_bytes = resp.block_size_bytes  # the cluster's block size
            self._layout_key = None
        self._registered = True
        return resp.latest_committed_version

    # -- state collection ------------------------------------------------------------
    def _collect(self, step: int) -> tuple[dict, dict]:
        """(replicated state, this rank's own state), tensors by reference."""
        rep = {"model": self._model_state()}  # state_dict(), its walk cached (modstate)
        if self.optimizer is not None:
            rep["optimizer"] = self.optimizer.state_dict()
        local = {"step": step, "rng": self._rng()}
        if self.lr_scheduler is not None:
            local["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.extra_state or self.providers.objects or self.providers.getters:
            local["extra"] = {k: (v.state_dict() if hasattr(v, "state_dict") else v)
                              for k, v in self.extra_state.items()}
            local["extra"].update(self.providers.collect())
        if self.cfg.pipeline_stage is not None:
            local["pipeline"] = self.stage_recorder.entry()
        return rep, local

    @property
    def restored(self) -> dict:
        """The values of the callable ``state`` providers in the snapshot the last
        ``restore()`` loaded (name -> value); empty when nothing was restored."""
        return self.providers.restored

    # -- pipeline stage metadata (CheckFree) ---------------------------------------------
    def record_grad_norm(self, norm) -> None:
        """Remember the last step's gradient norm (after clipping): a float or a one-element
        tensor. Cheap: a tensor is converted (and non-finite values become None) only when
        a snapshot is taken."""
        self.stage_recorder.record_grad_norm(norm)

    @property
    def grad_norm(self) -> float | None:
        """The last recorded gradient norm as a float; None if unset or non-finite."""
        return self.stage_recorder.grad_norm

    def stage_info(self):
        """StageInfo (snapshotd.core.checkfree) of the last save, or of the restored snapshot;
        None when that snapshot has no pipeline metadata."""
        meta = self.stage_recorder.last_meta
        return None if meta is None else pl.stage_info_from_meta(meta)

    def _dp(self) -> tuple[tuple[int, ...], int]:
        if not self.cfg.shard_replicated:
            return (self.rank,), 0
        ranks = tuple(self.cfg.dp_ranks) if self.cfg.dp_ranks else tuple(range(self.world_size))
        if self.rank not in ranks:
            raise ValueError(f"rank {self.rank} is not in dp_ranks {ranks}")
        return ranks, ranks.index(self.rank)

    def _plan(self, rep_names, rep_tensors, loc_names, loc_tensors, frozen: tuple[bool, ...] = ()):
        ts = rep_tensors + loc_tensors
        key = (rep_names, loc_names, list(map(_DTYPE, ts)), list(map(_SHAPE, ts)), frozen)
        if key != self._layout_key:
            dp_ranks, dp_index = self._dp()
            lay = lo.plan_shard(list(zip(rep_names, rep_tensors)), list(zip(loc_names, loc_tensors)),
                                len(dp_ranks), dp_index, frozen_first=frozen)
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
            # the template serialized once: a save's manifest is these bytes + its own fields
            self._layout_key, self._layout = key, (lay, (tmpl, tmpl.SerializeToString()))
        return self._layout

    # -- save ---------------------------------------------------------------------
    def save(self, step: int, when_busy: str | None = None) -> Future | None:
        """Snapshot the state as version ``step`` (>= 1). Returns a Future of SaveStats, or
        None when the snapshot was skipped.

        ``when_busy``: this call's mode when every staging slot holds a version still in
        flight (default: the configured ``when_busy``). Under ``when_busy="skip"`` each rank
        skips on its own, and a version some rank skipped never commits, so the last save
        of a run that must commit is ``save(step, when_busy="wait")`` on every rank."""
        if step < 1:
            raise ValueError("step must be >= 1 (version 0 means 'nothing')")
        mode = self.cfg.when_busy if when_busy is None else _check_when_busy(when_busy)
        t0 = time.perf_counter()
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:
                pass  # reported by the future's owner / logged in the hand-off
        t_bp = time.perf_counter() - t0
        staged, self._staged = self._staged, None
        try:
            if not self._registered:
                self._ensure_registered()
                staged = None
            rep_state, loc_state = self._collect(step)
            rep_meta, rep_names, rep_tensors = self._rep_flat.split(rep_state)
            loc_meta, loc_names, loc_tensors = self._loc_flat.split(loc_state)
            inc = self.incremental
            frozen = inc.frozen_mask(rep_tensors) if inc is not None else ()
            lay, tmpl = self._plan(rep_names, rep_tensors, loc_names, loc_tensors, frozen)
            total = lay.payload_bytes
            if (staged is not None and staged[0] == step and staged[2].buf is not None
                    and staged[2].size >= total):
                name, seg, token = staged[1], staged[2], staged[3]  # no RPC here
            else:
                try:
                    resp = self._acquire(step, total, mode)
                except UnknownJobError:  # the daemon lost its index: register again
                    self._ensure_registered()
                    resp = self._acquire(step, total, mode)
                name, token = resp.segment_name, resp.content_token
                seg = self.segments.get(name, writable=True)
            skip = inc.plan(name, lay, token, rep_tensors, frozen) if inc is not None else frozenset()
            try:
                copy_done = self.copier.copy(seg, lay, rep_tensors, loc_tensors, skip)
            except BaseException:
                if inc is not None:
                    inc.forget(name)  # what the segment holds now is unknown
                raise
            hint = None
            if inc is not None:
                inc.copied(name, lay, rep_tensors, frozen, self.copier.last_skipped,
                           self.cfg.block_size_bytes)
                hint = inc.hint(name, total, self.cfg.block_size_bytes)
        except DaemonUnavailableError as exc:
            self._registered = False
            self._unavailable(f"snapshot of step {step}", exc)
            return None
        except SnapshotInFlightError as exc:  # when_busy="skip", or even a forced acquire failed
            self.skipped += 1
            if mode == "skip":
                self.skipped_busy += 1
                log.debug("snapshotd: step %d skipped, older versions in flight: %s", step, exc)
                return None
            ok, held = _warn_limiter.allow(("skipped", self.cfg.job_id, self.rank))
            if ok:
                log.warning("snapshotd: step %d skipped: %s%s", step, exc, _warn_limiter.held_note(held))
            return None
        self.stage_recorder.last_meta = loc_state.get("pipeline")
        # The metadata is made of fresh containers and immutable leaves (flatten_state,
        # MetaText): the hand-off thread writes it as JSON, off the training thread.
        # world_size: for a reshard restore.
        meta = (rep_meta, loc_meta, self.world_size)
        skipped = self.copier.last_skipped
        stats = SaveStats(version=step, bytes=total, blocking_s=0.0, backpressure_s=t_bp,
                          bytes_copied=self.copier.last_bytes_copied,
                          bytes_skipped=sum(lay.replicated[i].nbytes for i in skipped),
                          tensors_skipped=len(skipped))
        self._pending = self._pool.submit(self._handoff, name, seg, tmpl, meta, stats, copy_done,
                                          self._next_version(step), token, hint)
        stats.blocking_s = self.last_blocking_s = time.perf_counter() - t0
        return self._pending

    def _next_version(self, step: int) -> int | None:
        """The version the next save will most likely ask for: ``step`` plus the interval
        of the last saves when the last two intervals were the same, else None."""
        a = self._asked = (self._asked + [step])[-3:]
        if len(a) == 3 and a[2] - a[1] == a[1] - a[0] > 0:
            return step + a[2] - a[1]
        return None

    def _stage_next(self, version: int, resp) -> None:
        """Hand-off thread, after a delivery whose AdoptShard also acquired the staging
        segment of ``version`` (the next save's, most likely): map it now, so that save,
        if it asks for that version, makes no call to the daemon before its copy. Nothing
        staged (refused: older versions still in flight, say; or a daemon that does not
        know the request's next_version) costs nothing: that save asks itself, and waits
        or skips as usual."""
        if not resp.next_segment_name:
            if resp.next_refused:
                log.debug("snapshotd: version %d not staged ahead: %s", version, resp.next_refused)
            return
        try:
            seg = self.segments.get(resp.next_segment_name, writable=True)
        except (OSError, ValueError) as exc:
            log.debug("snapshotd: staging segment of version %d: %s", version, exc)
            return
        self._staged = (version, resp.next_segment_name, seg, resp.next_content_token)

    def _acquire(self, step: int, total: int, mode: str):
        deadline = time.monotonic() + self.cfg.inflight_wait_s
        delay = 0.001
        kw = {"writer_id": self.writer_id} if self.writer_id else {}
        while True:
            try:
                return self.client.acquire_staging(self.cfg.job_id, self.rank, step, total, **kw)
            except SnapshotSkippedError:
                raise  # waiting would not help (the daemon says why): skip this step now
            except SnapshotInFlightError as exc:
                if mode == "skip":
                    raise  # save() counts it skipped; the versions in flight go on
                if time.monotonic() >= deadline:
                    log.warning("snapshotd: %s; giving up the oldest uncommitted version", exc)
                    return self.client.acquire_staging(self.cfg.job_id, self.rank, step, total,
                                                       force=True, **kw)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @property
    def pinned_segments(self) -> tuple[str, ...]:
        """Names of the staging segments currently registered with the CUDA driver."""
        return self.copier.pinned_segments

    def _handoff(self, name: str, seg, tmpl: tuple, meta: tuple, stats: SaveStats,
                 ev=None, next_version: int | None = None, token: int = 0,
                 hint: tuple | None = None) -> SaveStats:
        t0 = time.perf_counter()
        tmpl, tmpl_bytes = tmpl
        # The manifest as bytes: the template's serialization followed by this save's own
        # fields, which proto3 parses as the template with those fields set (none of them
        # is set in the template; block_checksums is repeated and empty there).
        m = pb.ShardManifest(version=stats.version, meta_json=compose_meta_json(*meta))
        if ev is not None:  # this save's own event: the optimizer hook may have waited already
            ev.synchronize()
        if self.cfg.checksum_on_client and seg.buf is not None:
            m.block_checksums.extend(mf.block_checksums(seg.buf, tmpl.payload_bytes, tmpl.block_size_bytes))
        nxt = next_version if (next_version is not None and self.stage_ahead) else 0
        try:
            hint_pb = None
            if hint is not None:
                hint_pb = pb.IncrementalHint(base_version=hint[0], content_token=hint[1],
                                             dirty_blocks=hint[2])
            resp = self.client.adopt(name, tmpl_bytes + m.SerializeToString(), nxt,
                                     tmpl.payload_bytes if nxt else 0, writer_id=self.writer_id,
                                     hint=hint_pb)
        except SnapshotdError as exc:
            if isinstance(exc, (DaemonUnavailableError, UnknownJobError)):
                self._registered = False  # the next save registers again (a restarted daemon)
            ok, held = _warn_limiter.allow(("handoff", self.cfg.job_id, self.rank))
            if ok:
                log.warning("snapshotd: hand-off of step %d failed: %s%s", m.version, exc,
                            _warn_limiter.held_note(held))
            raise
        stats.committed = resp.committed
        stats.bytes_hashed = resp.bytes_hashed
        if self.incremental is not None:
            self.incremental.adopted(name, token, m.version)
        stats.handoff_s = time.perf_counter() - t0
        self.last_stats = stats
        if nxt:
            self._stage_next(nxt, resp)
        return stats

    def wait(self, timeout: float | None = None) -> SaveStats | None:
        """Block until the last save has been handed to the daemon."""
        if self._pending is None:
            return None
        return self._pending.result(timeout)

    # -- restore ---------------------------------------------------------------------
    def restore(self) -> int:
        """Load the latest committed snapshot; return its step (0 when there is none).

        Every rank of the job ends up at the same version, or every rank fails (or skips
        the restore, daemon unreachable with ``on_daemon_unavailable="warn"``) together:
        the ranks agree on the version and on how opening it went before anything is
        loaded (:mod:`snapshotd_client.verdict`; through torch.distributed when its
        process group spans the job -- then every rank must call ``restore()``).

        When the parity cannot give this rank its state back (FAILED_PRECONDITION) and the
        rank is a pipeline stage with ``checkfree`` set, the stage is rebuilt approximately
        from its neighbours (``restored_approximate``, ``restored_method``). With a durable
        URL (``durable_url``), when no rung above can, every rank loads the newest verified
        durable checkpoint (``restored_method = "durable"``; snapshotd_client.durable)."""
        from snapshotd_client.durable import restore_ladder

        return restore_ladder(self, run_restore)

    def _restore_fallback(self, latest: int, exc: Exception) -> int:
        """The next rung when the parity cannot give this rank its state back: CheckFree
        (pipeline stages with ``checkfree`` set), else the daemon's error."""
        if self.cfg.checkfree is None or self.cfg.pipeline_stage is None:
            raise exc
        from snapshotd_client.checkfree_restore import restore_checkfree

        return restore_checkfree(self, latest, exc)

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
