"""Prometheus metrics of one daemon, and the redundancy health its status reports.

Two kinds of metric, so that the hot path pays (almost) nothing:

* **Gauges and the peer plane's counters are read at scrape time** by
  :class:`_DaemonCollector` from state the daemon keeps anyway (the store's
  accounting, the cluster's liveness, rounds and degraded jobs, the peer server's
  refusal counters). No code on the snapshot path touches them.
* **Histograms and a few counters are fed at the handful of event points** (a staging
  segment handed out, a version committed, a restore served, a rebuild done, a request
  refused): one dict lookup plus ``observe()``/``inc()`` each, microseconds against
  milliseconds of work.

Each daemon has its own :class:`~prometheus_client.CollectorRegistry` (never the
process-global one), so several daemons in one test process never mix their samples.
The HTTP endpoint is off unless ``--metrics-addr HOST:PORT`` (``SNAPSHOTD_METRICS_ADDR``)
is given; the Kubernetes manifests scrape port 9464.

Metric names (the deploy manifests and dashboards rely on them)::

    snapshotd_memory_budget_bytes                        gauge
    snapshotd_reserved_bytes                             gauge  segments reserved (staging, committed, parity)
    snapshotd_held_bytes{kind="data"|"parity"}           gauge  committed payload / parity held
    snapshotd_job_versions_held{job}                     gauge  versions with a slot (committed + in flight)
    snapshotd_job_latest_committed_version{job}          gauge
    snapshotd_job_last_commit_age_seconds{job}           gauge  since the last commit this daemon saw
    snapshotd_degraded_stripes{job}                      gauge  stripes with a shard on a down node
    snapshotd_lost_shards_max{job}                       gauge  worst stripe's lost shards (> m: unrecoverable)
    snapshotd_degraded_jobs                              gauge
    snapshotd_peers_up / snapshotd_group_size            gauge
    snapshotd_snapshot_seconds                           histogram  first staging of a version -> its commit
    snapshotd_restore_seconds{op="open"|"fetch"}         histogram  OpenShard (incl. on-demand rebuild) / FetchShard
    snapshotd_rebuild_seconds                            histogram
    snapshotd_rebuild_bytes_total                        counter
    snapshotd_requests_refused_total{reason}             counter  client API, reason = gRPC status code name
    snapshotd_peer_messages_refused_total{reason}        counter  peer plane: malformed, checksum, auth, unknown_peer, curve
    snapshotd_checksum_failures_total{where}             counter  client_api, peer_in, peer_reply
    snapshotd_peer_auth_failures_total                   counter  wrong/missing MAC, unknown sender, CURVE key denied
    snapshotd_corrupt_blocks_total{kind="data"|"parity"} counter  blocks that failed their checksum, found by the
                                                                  scrubber, a rebuild or a degraded read; once each
    snapshotd_scrub_bytes_total / snapshotd_scrub_passes_total  counter  the background scrubber's progress
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("snapshotd.metrics")

ENV_METRICS_ADDR = "SNAPSHOTD_METRICS_ADDR"
DEFAULT_METRICS_PORT = 9464

# Snapshots take ms (one node) to tens of seconds (GiBs over a busy network).
SNAPSHOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
REBUILD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_MAX_PENDING_STAGES = 4096  # (job, version) start times kept for versions not yet committed


def lost_shards_per_stripe(layout, down: frozenset[int]) -> list[int]:
    """For each stripe of ``layout``: how many of its shards (real data blocks and
    parity rows) sit on the group-local nodes in ``down``. Pure; > m means lost for good."""
    if not down:
        return [0] * layout.num_stripes
    out = []
    for s in range(layout.num_stripes):
        data_nodes, parity_nodes = layout.stripe_nodes(s)
        lost = sum(1 for node in parity_nodes if node in down)
        lost += sum(1 for p, node in enumerate(data_nodes)
                    if node in down and layout.data_block(s, p) is not None)
        out.append(lost)
    return out


def parse_addr(text: str) -> tuple[str, int]:
    """"HOST:PORT" (or ":PORT", or "PORT") -> (host, port); port 0 picks a free one."""
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or "0.0.0.0"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"metrics address {text!r}: expected HOST:PORT, e.g. 0.0.0.0:{DEFAULT_METRICS_PORT}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"metrics address {text!r}: port must be in 0..65535")
    return host, p


class DaemonMetrics:
    """The metrics of one daemon: event hooks plus a scrape-time collector.

    Thread-safe: hooks are called from gRPC worker threads and cluster threads.
    """

    def __init__(self, store, cluster=None):
        self.store = store
        self.cluster = cluster
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._staged: dict[tuple[str, int], float] = {}
        self._last_commit: dict[str, tuple[int, float]] = {}  # job -> (version, wall time)
        self._redundancy_cache: dict = {}
        self.snapshot_seconds = Histogram(
            "snapshotd_snapshot_seconds", "First staging of a version until its commit",
            buckets=SNAPSHOT_BUCKETS, registry=self.registry)
        self.restore_seconds = Histogram(
            "snapshotd_restore_seconds", "Serving a restore: OpenShard (incl. an on-demand "
            "rebuild or copy from peers) and FetchShard", ["op"], buckets=SNAPSHOT_BUCKETS,
            registry=self.registry)
        self.rebuild_seconds = Histogram(
            "snapshotd_rebuild_seconds", "Rebuilding this node's data and parity of a version",
            buckets=REBUILD_BUCKETS, registry=self.registry)
        self.rebuild_bytes = Counter(
            "snapshotd_rebuild_bytes", "Bytes rebuilt (data and parity written)", registry=self.registry)
        self.refused = Counter(
            "snapshotd_requests_refused", "Client API requests refused, by gRPC status code",
            ["reason"], registry=self.registry)
        self.checksum_api = 0  # DATA_LOSS refusals; exported in snapshotd_checksum_failures_total
        self.registry.register(_DaemonCollector(self))
        self._http = None

    # -- event hooks (cheap) -------------------------------------------------------
    def staged(self, job_id: str, version: int) -> None:
        """A staging segment was handed out for ``version``: its snapshot starts now
        (the first rank's, so the figure covers the slowest rank too)."""
        key = (job_id, int(version))
        with self._lock:
            if key not in self._staged:
                if len(self._staged) >= _MAX_PENDING_STAGES:  # versions that never commit
                    self._staged.pop(next(iter(self._staged)))
                self._staged[key] = time.monotonic()

    def committed(self, job_id: str, version: int) -> None:
        now = time.monotonic()
        with self._lock:
            t0 = self._staged.pop((job_id, int(version)), None)
            for key in [k for k in self._staged if k[0] == job_id and k[1] < version]:
                del self._staged[key]
            self._last_commit[job_id] = (int(version), time.time())
        if t0 is not None:
            self.snapshot_seconds.observe(now - t0)

    def last_commits(self) -> dict[str, tuple[int, float]]:
        """job -> (version, wall time) of the last commit this daemon saw (a copy)."""
        with self._lock:
            return dict(self._last_commit)

    def restore_served(self, op: str, seconds: float) -> None:
        self.restore_seconds.labels(op).observe(seconds)

    def rebuilt(self, job_id: str, version: int, seconds: float, nbytes: int) -> None:
        self.rebuild_seconds.observe(seconds)
        self.rebuild_bytes.inc(nbytes)
        self.committed(job_id, version)

    def refused_request(self, code_name: str) -> None:
        self.refused.labels(code_name).inc()
        if code_name == "DATA_LOSS":
            with self._lock:
                self.checksum_api += 1

    # -- redundancy (also shown by ``snapshotd status``) ---------------------------------
    def redundancy(self) -> dict:
        """Per job with a committed version: stripes, how many are degraded (a shard on
        a node this daemon sees as down, or on itself while it rebuilds) and the worst
        stripe's lost shards against m. Empty for a single node."""
        c = self.cluster
        if c is None:
            return {}
        alive = c.alive_peers()
        down_ids = {nd for nd in c.group if nd != c.me and nd not in alive}
        out = {}
        for job, v, layout in c.committed_layouts():
            if layout is None:
                continue
            down = set(down_ids)
            if job in c.degraded:
                down.add(c.me)
            idx = frozenset(c.group.index(nd) for nd in down)
            key = (job, v, layout.block_counts, idx)
            hit = self._redundancy_cache.get(key)
            if hit is None:
                lost = lost_shards_per_stripe(layout, idx)
                hit = {"version": v, "stripes": len(lost), "degraded_stripes": sum(1 for x in lost if x),
                       "max_lost_shards": max(lost, default=0), "m": c.m}
                if len(self._redundancy_cache) > 256:
                    self._redundancy_cache.clear()
                self._redundancy_cache[key] = hit
            out[job] = dict(hit, down=sorted(down))
        return out

    # -- HTTP endpoint ---------------------------------------------------------------
    def serve(self, addr: str) -> int:
        """Start the /metrics HTTP endpoint on ``addr``; returns the bound port."""
        from prometheus_client import start_http_server

        host, port = parse_addr(addr)
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ValueError(f"metrics address {addr!r}: cannot listen: {exc.strerror or exc}") from None
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _DaemonCollector:
    """Reads the daemon's own accounting at scrape time (no hot-path cost)."""

    def __init__(self, metrics: DaemonMetrics):
        self.m = metrics

    def collect(self):
        m, store, c = self.m, self.m.store, self.m.cluster
        st = store.stats()
        yield GaugeMetricFamily("snapshotd_memory_budget_bytes", "Memory budget of this daemon",
                                value=st["memory_budget_bytes"])
        yield GaugeMetricFamily("snapshotd_reserved_bytes", "Shared memory reserved (staging, "
                                "committed, parity and copies)", value=st["bytes_reserved"])
        status = c.status() if c is not None else {}
        held = GaugeMetricFamily("snapshotd_held_bytes", "Committed bytes held", labels=["kind"])
        held.add_metric(["data"], st["bytes_committed"])
        held.add_metric(["parity"], sum(status.get("parity_bytes", {}).values()))
        yield held
        versions = GaugeMetricFamily("snapshotd_job_versions_held",
                                     "Versions of the job with a slot here (committed and in flight)",
                                     labels=["job"])
        latest = GaugeMetricFamily("snapshotd_job_latest_committed_version",
                                   "Latest committed version (training step) of the job", labels=["job"])
        age = GaugeMetricFamily("snapshotd_job_last_commit_age_seconds",
                                "Seconds since this daemon last saw the job commit (absent until "
                                "a commit is seen after the daemon started)", labels=["job"])
        last = m.last_commits()
        now = time.time()
        for j in st["jobs"]:
            job = j["job_id"]
            try:
                _, vs = store.list_versions(job)
            except Exception:  # dropped between stats() and here
                continue
            versions.add_metric([job], len(vs))
            latest.add_metric([job], j["latest_committed_version"])
            if job in last:
                age.add_metric([job], now - last[job][1])
        yield versions
        yield latest
        yield age
        refused = {}
        if c is not None:
            refused = dict(c.server.refused)
            curve = getattr(c, "curve", None)
            if curve is not None:
                refused["curve"] = curve.denied
            yield from self._cluster(c, status, refused)
        reply_bad = c.peer_reply_checksum_failures() if c is not None else 0
        cs = CounterMetricFamily("snapshotd_checksum_failures",
                                 "Blocks that failed their checksum", labels=["where"])
        cs.add_metric(["client_api"], m.checksum_api)
        cs.add_metric(["peer_in"], refused.get("checksum", 0))
        cs.add_metric(["peer_reply"], reply_bad)
        yield cs

    def _cluster(self, c, status: dict, refused: dict):
        red = self.m.redundancy()
        deg = GaugeMetricFamily("snapshotd_degraded_stripes",
                                "Stripes of the committed version with a shard on a down node", labels=["job"])
        worst = GaugeMetricFamily("snapshotd_lost_shards_max",
                                  "Most shards lost in one stripe (more than m: unrecoverable)", labels=["job"])
        for job, r in red.items():
            deg.add_metric([job], r["degraded_stripes"])
            worst.add_metric([job], r["max_lost_shards"])
        yield deg
        yield worst
        yield GaugeMetricFamily("snapshotd_degraded_jobs", "Jobs this node does not hold whole",
                                value=len(status.get("degraded", {})))
        alive = c.alive_peers()
        yield GaugeMetricFamily("snapshotd_peers_up", "Peers of this node's group seen alive",
                                value=sum(1 for nd in c.group if nd != c.me and nd in alive))
        yield GaugeMetricFamily("snapshotd_group_size", "Nodes in this node's group (n)", value=len(c.group))
        fam = CounterMetricFamily("snapshotd_peer_messages_refused",
                                  "Peer-plane messages refused, by reason", labels=["reason"])
        for reason in ("malformed", "checksum", "auth", "unknown_peer", "internal", "curve"):
            fam.add_metric([reason], refused.get(reason, 0))
        yield fam
        auth = CounterMetricFamily("snapshotd_peer_auth_failures",
                                   "Peer messages or connections refused for authentication "
                                   "(MAC, unknown sender, CURVE key)")
        auth.add_metric([], refused.get("auth", 0) + refused.get("unknown_peer", 0) + refused.get("curve", 0))
        yield auth
        corrupt = CounterMetricFamily("snapshotd_corrupt_blocks",
                                      "Held blocks found failing their checksum (here, or at a peer "
                                      "this node fetched from), each counted once", labels=["kind"])
        for kind in ("data", "parity"):
            corrupt.add_metric([kind], status.get("corrupt_blocks", {}).get(kind, 0))
        yield corrupt
        scrub = status.get("scrub", {})
        yield CounterMetricFamily("snapshotd_scrub_bytes", "Bytes re-hashed by the background scrubber",
                                  value=scrub.get("bytes", 0))
        yield CounterMetricFamily("snapshotd_scrub_passes", "Full scrub passes completed",
                                  value=scrub.get("passes", 0))


class NullMetrics:
    """Stands in for :class:`DaemonMetrics` where none is attached (a ClusterNode built
    without a server, unit tests): every hook is a no-op."""

    def staged(self, *a) -> None: ...
    def committed(self, *a) -> None: ...
    def restore_served(self, *a) -> None: ...
    def rebuilt(self, *a) -> None: ...
    def refused_request(self, *a) -> None: ...


class Progress:
    """Progress of long work (a rebuild, a restore) as log lines: phase, bytes done of
    the total, rate and time left, at most every ``interval_s`` (nothing for work that
    ends sooner). ``update(done_bytes)`` is cheap enough to call per block."""

    def __init__(self, logger: logging.Logger, what: str, total_bytes: int, interval_s: float = 2.0):
        self.log, self.what, self.total = logger, what, max(0, int(total_bytes))
        self.interval_s = interval_s
        self.t0 = self._last = time.monotonic()
        self.reported = False

    def update(self, done_bytes: int, phase: str = "") -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last, self.reported = now, True
        dt = now - self.t0
        rate = done_bytes / dt if dt > 0 else 0.0
        left = (self.total - done_bytes) / rate if rate > 0 and self.total else float("nan")
        pct = 100.0 * done_bytes / self.total if self.total else 0.0
        self.log.info("%s%s: %.1f of %.1f MiB (%.0f%%), %.1f MiB/s, ~%.0f s left", self.what,
                      f" [{phase}]" if phase else "", done_bytes / 2**20, self.total / 2**20, pct,
                      rate / 2**20, left)
