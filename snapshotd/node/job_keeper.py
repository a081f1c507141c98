"""The operator's view of the jobs a daemon holds: list, show, drop, and garbage collection.

Each job has a *state*, derived from when a request last named it (``last_activity``,
kept by the store and persisted in its index) and from what it holds:

- ``active``: a request named it within the last ``active_s`` (default 600 s);
- ``finished``: idle longer, and its latest delivered version committed;
- ``abandoned``: idle longer, with delivered versions that never committed (a run that
  crashed mid-snapshot) or nothing committed at all.

A job that is not active and has been idle for ``ttl_s`` (daemon flag ``--job-ttl``,
env ``SNAPSHOTD_JOB_TTL``, default 24 h, 0 = never) is dropped by :meth:`collect`, which
the daemon runs in a background thread (:meth:`start`) and ``snapshotd jobs gc`` runs now.

Dropping a job another client is using: the job's segments are unlinked and its ledger
forgotten. A trainer that still maps a segment keeps valid memory (an unlinked segment
lives until its last mapping goes; nothing is unmapped under it), its next hand-off is
refused (UNKNOWN_JOB) and its next save registers the job afresh, from nothing. That
silently loses the job's snapshots, so a drop of a job with a request in the last
``IN_USE_S`` (30 s, or ``active_s`` if shorter) is refused (FAILED_PRECONDITION) unless
forced (``snapshotd jobs drop JOB --force``; the DropJob RPC drops at once unless its
request asks for the check). The garbage
collector never drops an active job.

Thread-safety: every method may be called from any thread; state is read and changed
under the store's lock (``store.state.lock``). Call order: ``start()`` once serving,
``stop()`` before the store closes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from snapshotd.wire.errors import ConflictError, InvalidRequestError, UnknownJobError

log = logging.getLogger("snapshotd.jobs")

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_ACTIVE_S = 600.0
IN_USE_S = 30.0


@dataclass
class JobInfo:
    job_id: str
    world_size: int
    local_world_size: int
    latest_committed_version: int
    bytes_held: int
    segments: int
    last_activity: float  # time.time() of the last request that named the job
    idle_s: float
    state: str  # "active", "finished" or "abandoned"
    uncommitted_versions: list[int] = field(default_factory=list)


class JobKeeper:
    """List, show, drop and garbage-collect the jobs of one daemon (module docstring).

    ``drop_extra(job_id) -> bytes``: what else dropping a job frees (the cluster's parity
    and round records, the job-token binding); ``clock``: wall-clock seconds."""

    def __init__(self, store, drop_extra=None, ttl_s: float = DEFAULT_TTL_S,
                 active_s: float = DEFAULT_ACTIVE_S, clock=time.time):
        if not ttl_s >= 0 or not active_s >= 0:
            raise ValueError("the job TTL and active window must be >= 0 seconds")
        self.store = store
        self.drop_extra = drop_extra
        self.ttl_s = float(ttl_s)
        self.active_s = float(active_s)
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading --------------------------------------------------------------------------
    def _info(self, job_id: str, led, now: float) -> JobInfo:
        st = self.store.state
        last = st.activity.get(job_id, now)
        idle = max(0.0, now - last)
        pending = [v for v in led.versions() if v > led.committed_version]
        if idle < self.active_s:
            state = "active"
        elif led.committed_version and not pending:
            state = "finished"
        else:
            state = "abandoned"
        return JobInfo(job_id=job_id, world_size=led.world_size,
                       local_world_size=led.local_world_size,
                       latest_committed_version=led.committed_version,
                       bytes_held=led.bytes_allocated(), segments=st.segment_count(job_id),
                       last_activity=last, idle_s=idle, state=state,
                       uncommitted_versions=pending)

    def list(self) -> list[JobInfo]:
        now = self.clock()
        with self.store.state.lock:
            return [self._info(j, led, now) for j, led in sorted(self.store.state.jobs.items())]

    def show(self, job_id: str) -> JobInfo:
        now = self.clock()
        with self.store.state.lock:
            led = self.store.state.jobs.get(job_id)
            if led is None:
                raise self.store.state.refuse(UnknownJobError(
                    f"unknown job {job_id!r}: this daemon holds "
                    f"{', '.join(sorted(self.store.state.jobs)) or 'no jobs'}; nothing changed"))
            return self._info(job_id, led, now)

    # -- dropping -------------------------------------------------------------------------
    def drop(self, job_id: str, force: bool = False) -> int:
        """Drop the job and everything it holds here; returns the bytes freed. Refused
        (ConflictError) when a request named it in the last ``IN_USE_S`` seconds, unless
        ``force``; an unknown job is UnknownJobError. Either way nothing changes then."""
        with self.store.state.lock:
            info = self.show(job_id)
            if not force and info.idle_s < min(IN_USE_S, self.active_s):
                raise self.store.state.refuse(ConflictError(
                    f"job {job_id!r} is in use (a request {info.idle_s:.0f} s ago): dropping it "
                    f"would delete its snapshots under its trainers; stop them first, or force "
                    f"it (snapshotd jobs drop {job_id} --force)"))
            freed = self.store.drop_job(job_id)
        if self.drop_extra is not None:
            freed += self.drop_extra(job_id)
        log.info("job %s dropped (%s, idle %.0f s, committed version %d): %d bytes freed",
                 job_id, info.state, info.idle_s, info.latest_committed_version, freed)
        return freed

    def collect(self, older_than_s: float | None = None,
                dry_run: bool = False) -> tuple[list[JobInfo], int]:
        """Drop every job that is not active and has been idle at least ``older_than_s``
        (default: the TTL). Returns (the jobs dropped, or that would be with
        ``dry_run``; bytes freed)."""
        limit = self.ttl_s if older_than_s is None else older_than_s
        if older_than_s is None and self.ttl_s == 0:
            raise self.store.state.refuse(InvalidRequestError("this daemon runs without a job TTL (--job-ttl 0): "
                                      "say how old a job must be (--older-than)"))
        if not limit >= 0:
            raise self.store.state.refuse(
                InvalidRequestError(f"older_than must be >= 0 seconds, got {older_than_s}"))
        victims = [i for i in self.list() if i.state != "active" and i.idle_s >= limit]
        if dry_run:
            return victims, 0
        dropped, freed = [], 0
        for info in victims:
            try:
                freed += self.drop(info.job_id, force=True)
            except UnknownJobError:
                continue  # dropped meanwhile
            dropped.append(info)
        return dropped, freed

    # -- the background collector -----------------------------------------------------------
    def start(self) -> None:
        if self.ttl_s == 0 or self._thread is not None:
            return
        period = min(60.0, max(self.ttl_s / 4, 0.5))
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True,
                                        name="snapshotd-job-gc")
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                dropped, freed = self.collect()
            except Exception:  # never let the collector die silently
                log.exception("job garbage collection failed")
                continue
            if dropped:
                log.info("job TTL %.0f s: dropped %s (%d bytes)", self.ttl_s,
                         [i.job_id for i in dropped], freed)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
