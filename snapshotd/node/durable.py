"""The durable tier: the daemon flushes committed versions to a directory or fsspec URL.

Two threads per daemon, so a trainer crash never stops a flush:

- the **watcher** hears of each commit (:meth:`DurableFlusher.attach`; and polls the
  store's committed versions every ``poll_s``); a version is due when it is the first
  committed version of a new window of ``every_versions`` (``v // N`` grows; counted from
  the newest complete durable version when the daemon first sees the job, so the same
  versions on every node and across restarts: the nodes' parts meet), or, with
  ``every_s`` on a job whose ranks are all on this node, when ``every_s`` passed since
  the last capture; a version already complete on the durable tier is not due. It
  *captures* a due version at once: copies this node's shards of it into private memory
  and checks every block against the manifest's checksums (a slot reused meanwhile, or a
  corrupt block, is never flushed). At most one capture waits per job: a newer one
  replaces it. A capture's memory, once flushed (or replaced), is kept for the job's next
  capture for ``spare_s`` (a fresh allocation's page faults cost several times the copy
  itself); unused that long, it is freed.
- the **writer** writes a capture (:meth:`DurableFlusher.flush`): each local rank's file
  in DCP's layout (:mod:`snapshotd.node.durable_dcp`), at most ``rate_bytes_per_s``; then
  this node's part record; then, if every rank of the job has a part, the version's
  ``.metadata`` and index (idempotent: every node that sees all parts writes the same
  ones), ``latest.json``, and deletes complete versions older than the newest ``keep``
  ones (and incomplete ones older than the oldest kept), only after a newer one is complete.

Layout, what "complete" means, and the stores: :mod:`snapshotd.wire.durable_store`.
Call order: construct, :meth:`attach` (the daemon's metrics), :meth:`start`, :meth:`stop`;
``status()`` and ``on_commit`` from any thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from snapshotd.core.integrity import pace_delay_s
from snapshotd.node import durable_dcp as dd  # imports torch: this module loads only with --durable-url
from snapshotd.wire import config as c
from snapshotd.wire import durable_store as ds
from snapshotd.wire import manifest as mf

log = logging.getLogger("snapshotd.durable")

REPLICATED_MODES = ("all", "rank0")
STALL_POINTS = ("mid-file", "before-index")


@dataclass
class DurableConfig:
    url: str
    every_versions: int = 0  # 0: not by versions
    every_s: float = 0.0  # 0: not by time
    keep: int = c.DEFAULT_DURABLE_KEEP
    rate_bytes_per_s: int = 0  # 0: no limit
    replicated: str = "all"  # see durable_dcp: "all" | "rank0"
    poll_s: float = 0.2  # besides the commit hook (attach)
    spare_s: float = 30.0  # a flushed capture's buffers wait this long for the next capture
    storage_options: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.every_versions < 0 or self.every_s < 0 or self.rate_bytes_per_s < 0:
            raise ValueError("--durable-every-versions, --durable-every-s and --durable-rate must be >= 0")
        if not (self.every_versions or self.every_s):
            raise ValueError("--durable-url needs --durable-every-versions N and/or --durable-every-s T")
        if self.keep < 1:
            raise ValueError("--durable-keep must be >= 1")
        if self.replicated not in REPLICATED_MODES:
            raise ValueError(f"--durable-replicated must be one of {', '.join(REPLICATED_MODES)}")


@dataclass
class Capture:
    """This node's shards of one committed version, copied out of shared memory."""
    job: str
    version: int
    world_size: int
    shards: list  # [(rank, manifest, np.ndarray payload)]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for _, _, p in self.shards)


class DurableFlusher:
    """Flushes committed versions of ``store`` (a ShardStore) to ``cfg.url`` (module docstring)."""

    def __init__(self, store, cfg: DurableConfig, node_id: str, registry=None):
        cfg.check()
        self.store, self.cfg, self.node_id = store, cfg, node_id
        self.target = ds.open_store(cfg.url, cfg.storage_options or None)
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._pending: dict[str, Capture] = {}
        self._commits: list[tuple[str, int]] = []  # heard from the commit hook, not yet looked at
        self._wake = threading.Event()
        self._seen: dict[str, int] = {}  # job -> last version looked at
        self._last: dict[str, tuple[int, float]] = {}  # job -> (last captured version, when)
        self._threads: list[threading.Thread] = []
        self._spare: dict[tuple[str, int], tuple[np.ndarray, float]] = {}  # (job, rank) -> (buffer, since)
        self._stall = os.environ.get(c.ENV_DURABLE_TEST_STALL, "")
        if self._stall and self._stall not in STALL_POINTS:
            raise ValueError(f"{c.ENV_DURABLE_TEST_STALL}={self._stall!r}: use one of {STALL_POINTS}")
        self.stats = {"flushed": 0, "completed": 0, "abandoned": 0, "failed": 0, "bytes": 0,
                      "last_version": {}, "last_complete": {}, "last_error": None}
        self._metrics = _Metrics(registry) if registry is not None else None
        self.dcp_metadata_wait_s = 120.0  # a DCP version: how long other nodes wait for its metadata

    # -- threads ----------------------------------------------------------------------
    def start(self) -> None:
        dd.warm_up()  # DCP's modules, imported before the daemon says ready, not mid-flush
        for name, fn in (("durable-watch", self._watch), ("durable-write", self._write_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("durable tier: %s every %s, keep %d, rate %s", self.target.url,
                 " and ".join(x for x in (f"{self.cfg.every_versions} versions" if self.cfg.every_versions else "",
                                          f"{self.cfg.every_s:g} s" if self.cfg.every_s else "") if x),
                 self.cfg.keep, f"{self.cfg.rate_bytes_per_s} B/s" if self.cfg.rate_bytes_per_s else "unlimited")

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout_s)

    def status(self) -> dict:
        with self._cv:
            return {**self.stats, "url": self.target.url, "pending": sorted(self._pending)}

    def attach(self, metrics) -> None:
        """Hear of every commit as it happens: ``metrics.committed(job, version)`` is called
        on each one (single node and cluster), and the watcher captures at once (a poll
        could miss a version superseded between two polls)."""
        inner = metrics.committed

        def committed(job_id: str, version: int) -> None:
            inner(job_id, version)
            self.on_commit(job_id, version)

        metrics.committed = committed

    def on_commit(self, job: str, version: int) -> None:
        with self._cv:
            self._commits.append((job, version))
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.poll_s)
            self._wake.clear()
            try:
                self.poll_once()
                self.free_spares()
            except Exception as exc:  # the store closing under us at shutdown, a bug
                if not self._stop.is_set():
                    log.warning("durable: watcher: %s: %s", type(exc).__name__, exc)

    def poll_once(self, now: float | None = None) -> None:
        """Capture every job's committed version that is due (see the module docstring):
        those the commit hook reported, in order, then each job's latest."""
        now = time.monotonic() if now is None else now
        with self._cv:
            heard, self._commits = self._commits, []
        jobs = self.store.jobs_summary()
        seen = [(j, v) for j, v in heard] + [(j, i["committed"]) for j, i in jobs.items()]
        for job, v in seen:
            info = jobs.get(job)
            if not v or info is None or v <= self._seen.get(job, 0):
                continue
            self._seen[job] = v
            if job not in self._last:  # first sight (a restart too): go on from the durable tier
                done = ds.complete_versions(self.target, job)
                self._last[job] = (done[-1] if done else 0, now)
            if not self._due(job, v, info, now):
                continue
            if ds.INDEX in self.target.listdir(f"{job}/{ds.version_dir(v)}"):
                continue  # already complete (flushed before a restart)
            cap = self.capture(job, v, info["world_size"])
            if cap is None:
                continue
            self._last[job] = (v, now)
            with self._cv:
                old = self._pending.get(job)
                if old is not None:
                    log.info("durable: %s v%d not flushed yet, v%d replaces it", job, old.version, v)
                self._pending[job] = cap
                self._cv.notify_all()
            if old is not None:
                self.give_back(old)

    def _due(self, job: str, v: int, info: dict, now: float) -> bool:
        last_v, last_t = self._last.get(job, (0, None))
        n = self.cfg.every_versions
        if n and v // n > last_v // n:
            return True
        single_node = info.get("local_world_size") in (0, info.get("world_size"))
        if self.cfg.every_s and single_node:
            return last_t is None or now - last_t >= self.cfg.every_s
        return False

    def capture(self, job: str, version: int, world_size: int) -> Capture | None:
        """Copy this node's shards of ``version`` out of shared memory, verified; None when
        the version moved on (its slot was reused) or a block is corrupt (logged)."""
        shards = []
        for rank, m, seg in self.store.local_shards(job, version):
            n = int(m.payload_bytes)
            buf = self._buffer(job, rank, n)
            shards.append((rank, m, buf))
            if n:
                if seg.buf is None:
                    self.give_back(Capture(job, version, world_size, shards))
                    return None
                buf[:] = np.frombuffer(seg.buf, np.uint8, n)
            if m.block_checksums and mf.block_checksums(buf, n, m.block_size_bytes) != list(m.block_checksums):
                still = any(r == rank for r, _, _ in self.store.local_shards(job, version))
                if still and self.store.committed_version(job) == version:
                    log.error("durable: %s v%d rank %d: a block does not match its checksum; "
                              "not flushed", job, version, rank)
                self._count("abandoned")
                self.give_back(Capture(job, version, world_size, shards))
                return None
        if not shards:
            return None
        return Capture(job, version, world_size, shards)

    # -- capture buffers: one spare per (job, rank), for spare_s --------------------------
    def _buffer(self, job: str, rank: int, n: int) -> np.ndarray:
        with self._cv:
            spare = self._spare.pop((job, rank), None)
        if spare is not None and spare[0].nbytes == n:
            return spare[0]
        return np.empty(n, np.uint8)

    def give_back(self, cap: Capture) -> None:
        """``cap`` is done with (flushed, replaced, abandoned): its buffers become the
        spares of its job's ranks (nothing may use them afterwards)."""
        now = time.monotonic()
        with self._cv:
            for rank, _, buf in cap.shards:
                if buf.nbytes and self.cfg.spare_s > 0:
                    self._spare[(cap.job, rank)] = (buf, now)
        cap.shards = []

    def free_spares(self, now: float | None = None) -> int:
        """Drop the spares unused for ``spare_s``; returns how many are left."""
        now = time.monotonic() if now is None else now
        with self._cv:
            for key in [k for k, (_, since) in self._spare.items() if now - since >= self.cfg.spare_s]:
                del self._spare[key]
            return len(self._spare)

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                while not self._pending and not self._stop.is_set():
                    self._cv.wait(0.5)
                if self._stop.is_set():
                    return
                job = min(self._pending, key=lambda j: self._pending[j].version)
                cap = self._pending.pop(job)
            try:
                self.flush(cap)
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._count("failed")
                with self._cv:
                    self.stats["last_error"] = f"{cap.job} v{cap.version}: {type(exc).__name__}: {exc}"
                log.warning("durable: flush of %s v%d failed: %s: %s", cap.job, cap.version,
                            type(exc).__name__, exc)
            finally:
                self.give_back(cap)

    # -- one flush --------------------------------------------------------------------
    def flush(self, cap: Capture) -> bool:
        """Write ``cap``; returns True when this call completed the version (wrote its index)."""
        t0 = time.monotonic()
        base = f"{cap.job}/{ds.version_dir(cap.version)}"
        pacer = _Pacer(self.cfg.rate_bytes_per_s, self._stop, self._stall == "mid-file", self.target,
                       base)
        files, items, manifests = {}, {}, {}
        heads = {rank: dd.dcp_head(m) for rank, m, _ in cap.shards}
        kind = "dcp" if any(heads.values()) else "snapshotter"
        doc = self._dcp_metadata(base, heads) if kind == "dcp" else None
        for rank, m, payload in cap.shards:
            its = dd.dcp_items(rank, doc) if kind == "dcp" else dd.plan_rank(m, self.cfg.replicated)
            name = ds.rank_file(rank)
            files[name] = self.target.write_with(
                f"{base}/{name}", lambda w, m=m, p=payload, i=its: dd.write_rank(m, p, i, w, pacer)).to_json()
            items[str(rank)] = [{k: v for k, v in it.items() if k not in ("src", "nbytes")} for it in its]
            manifests[str(rank)] = dd.manifest_json(m)
        part = {"format": ds.FORMAT, "kind": kind, "job": cap.job, "version": cap.version, "node": self.node_id,
                "world_size": cap.world_size, "replicated": self.cfg.replicated,
                "ranks": sorted(r for r, _, _ in cap.shards), "files": files, "items": items,
                "manifests": manifests}
        self.target.write_bytes(f"{base}/{ds.PARTS}/{self.node_id}.json", _json(part))
        written = pacer.done
        self._count("flushed", nbytes=written)
        log.info("durable: %s v%d: this node's %d rank file(s), %.1f MiB in %.2f s", cap.job,
                 cap.version, len(files), written / 2**20, time.monotonic() - t0)
        if self._stall == "before-index":
            pacer.stall("before-index")
        return self.try_complete(cap.job, cap.version)

    def _dcp_metadata(self, base: str, heads: dict) -> dict:
        """A SnapshotdWriter version's DCP metadata (JSON): from our metadata rank's manifest
        (then written beside the parts for the other nodes), or read from there."""
        rel = f"{base}/{dd.DCP_METADATA_PART}"
        for rank, head in heads.items():
            if head and head.get("metadata_rank") == rank and "metadata" in head:
                self.target.write_bytes(rel, _json(head["metadata"]))
                return head["metadata"]
        deadline = time.monotonic() + self.dcp_metadata_wait_s
        while True:
            try:
                return json.loads(self.target.read_bytes(rel))
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() > deadline or self._stop.wait(0.1):
                raise TimeoutError(f"{rel}: the metadata rank's node did not write the DCP metadata "
                                   f"within {self.dcp_metadata_wait_s:g} s")

    def try_complete(self, job: str, version: int) -> bool:
        """Write the version's metadata and index if every rank has a part (idempotent)."""
        base = f"{job}/{ds.version_dir(version)}"
        parts = []
        for name in self.target.listdir(f"{base}/{ds.PARTS}"):
            if name.endswith(".json"):
                try:
                    parts.append(json.loads(self.target.read_bytes(f"{base}/{ds.PARTS}/{name}")))
                except (FileNotFoundError, ValueError):
                    continue  # a part being replaced: its node completes the version itself
        world = max((p["world_size"] for p in parts), default=0)
        ranks = {r for p in parts for r in p["ranks"]}
        if not world or ranks != set(range(world)):
            log.debug("durable: %s v%d: parts of ranks %s of %d so far", job, version, sorted(ranks), world)
            return False
        kind = parts[0].get("kind", "snapshotter")
        if kind == "dcp":
            doc = json.loads(self.target.read_bytes(f"{base}/{dd.DCP_METADATA_PART}"))
            meta_bytes = dd.build_dcp_metadata(doc, parts)
        else:
            meta_bytes = dd.build_metadata(parts)
        meta = self.target.write_bytes(f"{base}/{ds.METADATA}", meta_bytes)
        files = {ds.METADATA: meta.to_json()}
        ranks_rec = {}
        for p in parts:
            files.update(p["files"])
            for r in p["ranks"]:
                ranks_rec[str(r)] = {"node": p["node"], "file": ds.rank_file(r),
                                     "manifest": p["manifests"][str(r)], "items": p["items"][str(r)]}
        index = {"format": ds.FORMAT, "kind": kind, "job": job, "version": version, "world_size": world,
                 "replicated": parts[0]["replicated"], "files": files, "ranks": ranks_rec,
                 "nodes": sorted(p["node"] for p in parts), "created_unix": time.time()}
        self.target.write_bytes(f"{base}/{ds.INDEX}", _json(index))  # the commit
        self._count("completed", job=job, version=version)
        log.info("durable: %s v%d complete at %s", job, version, self.target.url)
        self._update_latest(job)
        self.prune(job)
        return True

    def _update_latest(self, job: str) -> None:
        done = ds.complete_versions(self.target, job)
        if done:
            self.target.write_bytes(f"{job}/{ds.LATEST}", _json(
                {"version": done[-1], "path": ds.version_dir(done[-1])}))

    def prune(self, job: str) -> None:
        """Keep the newest ``keep`` complete versions; drop older complete ones, and
        incomplete ones older than the oldest kept (a flush that died)."""
        done = ds.complete_versions(self.target, job)
        if not done:
            return
        kept = done[-self.cfg.keep:]
        for v in ds.versions(self.target, job):
            if v < kept[0]:
                self.target.remove_tree(f"{job}/{ds.version_dir(v)}")
                log.info("durable: %s v%d deleted (keeping %s)", job, v, kept)

    def _count(self, what: str, nbytes: int = 0, job: str | None = None, version: int = 0) -> None:
        with self._cv:
            self.stats[what] += 1
            self.stats["bytes"] += nbytes
            if job is not None:
                self.stats["last_complete"][job] = version
        if self._metrics is not None:
            self._metrics.count(what, nbytes, job, version)


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class _Pacer:
    """Called after each chunk written: keeps to the rate limit; the test hook stalls
    halfway through the first file (and says so in a marker file beside the folder)."""

    def __init__(self, rate: int, stop: threading.Event, stall_mid: bool, target, base: str):
        self.rate, self._stop, self.stall_mid = rate, stop, stall_mid
        self.target, self.base = target, base
        self.done, self.t0 = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.stall_mid and self.done > 0:
            self.stall("mid-file")
        delay = pace_delay_s(self.done, self.t0, time.monotonic(), self.rate)
        if delay > 0:
            self._stop.wait(delay)

    def stall(self, where: str) -> None:
        log.warning("durable: test hook: stalling the flush of %s (%s)", self.base, where)
        self.target.write_bytes(f"{self.base}.stalled", where.encode())
        while not self._stop.wait(1.0):
            pass
        raise InterruptedError("stopped while stalled")


class _Metrics:
    def __init__(self, registry):
        from prometheus_client import Counter, Gauge

        self.flushes = Counter("snapshotd_durable_flushes", "Durable flushes by outcome "
                               "(flushed: this node's files written; completed: a version's index "
                               "written; abandoned; failed)", ["outcome"], registry=registry)
        self.bytes = Counter("snapshotd_durable_bytes", "Bytes of rank files written to the durable "
                             "tier", registry=registry)
        self.complete = Gauge("snapshotd_durable_complete_version", "Newest durable version this "
                              "node completed", ["job"], registry=registry)

    def count(self, what: str, nbytes: int, job: str | None, version: int) -> None:
        self.flushes.labels(what).inc()
        if nbytes:
            self.bytes.inc(nbytes)
        if job is not None:
            self.complete.labels(job).set(version)
