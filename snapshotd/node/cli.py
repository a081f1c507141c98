"""``snapshotd serve``: the daemon's command line (its flags, their env vars and defaults).

The full ``snapshotd`` command (stats, status, cluster, demo, chaos) is
:mod:`snapshotd_tools.cli`, which adds this parser as its ``serve`` subcommand. The
daemon alone runs as ``python -m snapshotd.node serve ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from snapshotd.wire import config as c


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _scrub_rate(text: str) -> int:
    """--scrub-rate: a size per second (64MiB, 0 = off); a clear error otherwise."""
    try:
        return c.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` -> seconds (>= 0); a clear error otherwise."""
    t = str(text).strip().lower()
    unit = _UNITS.get(t[-1:], None)
    num = t[:-1] if unit is not None else t
    try:
        value = float(num) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds or a number with s, m, h or d (e.g. 24h)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be >= 0 and finite")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="run the per-node daemon")
    s.add_argument("--node-id", default=None,
                   help=f"this node's id [env {c.ENV_NODE_ID}; default: the host name]")
    s.add_argument("--state-dir", default=None,
                   help=f"index and manifests [env {c.ENV_STATE_DIR}; default /tmp/snapshotd-UID/NODE]")
    s.add_argument("--socket", default=None,
                   help=f"Unix socket for clients, mode 0600 [env {c.ENV_SOCKET}; default STATE_DIR/snapshotd.sock]")
    s.add_argument("--tcp", default=_env(c.ENV_TCP),
                   help=f"also listen on HOST:PORT (port 0 = any); needs a token [env {c.ENV_TCP}; default off]")
    s.add_argument("--token", default=_env(c.ENV_TOKEN),
                   help=f"shared secret clients must send [env {c.ENV_TOKEN}; default none]")
    s.add_argument("--token-file", default=None, help="read the token from this file")
    s.add_argument("--memory-budget-bytes", default=_env(c.ENV_MEMORY_BUDGET),
                   help=f"bytes of shared memory this daemon may hold, e.g. 8GiB "
                        f"[env {c.ENV_MEMORY_BUDGET}; default {int(c.DEFAULT_BUDGET_FRACTION * 100)}%% "
                        "of available RAM]")
    s.add_argument("--max-slots-per-rank", type=int, default=3,
                   help="staging/committed segments kept per rank (default 3)")
    s.add_argument("--no-verify-on-adopt", action="store_true",
                   help="trust client checksums on adopt (they are still verified on fetch)")
    s.add_argument("--spec", default=_env("SNAPSHOTD_SPEC"),
                   help="cluster spec (YAML): take part in erasure-coded snapshots with the "
                        "nodes it names [env SNAPSHOTD_SPEC; default: a single node]")
    s.add_argument("--instance", default=_env("SNAPSHOTD_INSTANCE", ""),
                   help="namespace for this daemon's /dev/shm segments, to keep several "
                        "clusters on one machine apart [env SNAPSHOTD_INSTANCE; default none]")
    s.add_argument("--ready-file", default=None,
                   help="write {pid, socket, tcp_port, metrics_port} as JSON here once serving")
    s.add_argument("--metrics-addr", default=_env("SNAPSHOTD_METRICS_ADDR"),
                   help="serve Prometheus metrics on HOST:PORT at /metrics, e.g. 0.0.0.0:9464 "
                        "(port 0 = any) [env SNAPSHOTD_METRICS_ADDR; default off]")
    s.add_argument("--require-job-token", action="store_true",
                   default=_env("SNAPSHOTD_REQUIRE_JOB_TOKEN", "") not in ("", "0", "false"),
                   help="refuse to register a job without a job token (x-snapshotd-job-token; "
                        "client env SNAPSHOTD_JOB_TOKEN), so every job is bound to its own "
                        "secret [env SNAPSHOTD_REQUIRE_JOB_TOKEN=1; default off]")
    s.add_argument("--scrub-rate", default=_env("SNAPSHOTD_SCRUB_RATE", "64MiB"), type=_scrub_rate,
                   help="cluster mode: bytes/s the background scrubber re-hashes held blocks at, "
                        "e.g. 64MiB; 0 = no background passes [env SNAPSHOTD_SCRUB_RATE; default 64MiB]")
    s.add_argument("--scrub-interval-s", type=float, default=_env("SNAPSHOTD_SCRUB_INTERVAL_S", "600"),
                   help="cluster mode: a full scrub pass starts at most this often "
                        "[env SNAPSHOTD_SCRUB_INTERVAL_S; default 600]")
    s.add_argument("--job-ttl", type=parse_duration, default=_env("SNAPSHOTD_JOB_TTL", "24h"),
                   help="drop a finished or abandoned job (no request for this long) and free "
                        "its memory, e.g. 24h, 30m, 3600; 0 = never (snapshotd jobs gc runs it "
                        "now) [env SNAPSHOTD_JOB_TTL; default 24h]")
    s.add_argument("--job-active-s", type=parse_duration, default=_env("SNAPSHOTD_JOB_ACTIVE_S", "600"),
                   help="a job with a request this recent is active: never garbage-collected "
                        "[env SNAPSHOTD_JOB_ACTIVE_S; default 600]")
    s.add_argument("--durable-url", default=_env(c.ENV_DURABLE_URL),
                   help="flush committed versions in the background to this directory or fsspec "
                        "URL (s3://bucket/prefix, ...) in DCP's layout (docs/DURABLE.md) "
                        f"[env {c.ENV_DURABLE_URL}; default off]")
    s.add_argument("--durable-every-versions", type=int,
                   default=int(_env(c.ENV_DURABLE_EVERY_VERSIONS, "0")),
                   help="flush the first committed version of every N (the same versions on "
                        f"every node) [env {c.ENV_DURABLE_EVERY_VERSIONS}; default 0 = not by versions]")
    s.add_argument("--durable-every-s", type=parse_duration, default=_env(c.ENV_DURABLE_EVERY_S, "0"),
                   help="flush a job whose ranks are all on this node at most this often, e.g. "
                        f"30m [env {c.ENV_DURABLE_EVERY_S}; default 0 = not by time]")
    s.add_argument("--durable-keep", type=int,
                   default=int(_env(c.ENV_DURABLE_KEEP, str(c.DEFAULT_DURABLE_KEEP))),
                   help="complete durable checkpoints kept per job (older ones are deleted once "
                        f"a newer one is complete) [env {c.ENV_DURABLE_KEEP}; default {c.DEFAULT_DURABLE_KEEP}]")
    s.add_argument("--durable-rate", type=_scrub_rate, default=_env(c.ENV_DURABLE_RATE, "0"),
                   help=f"bytes/s a flush writes at most, e.g. 200MiB [env {c.ENV_DURABLE_RATE}; "
                        "default 0 = no limit]")
    s.add_argument("--durable-replicated", choices=("all", "rank0"),
                   default=_env(c.ENV_DURABLE_REPLICATED, "all"),
                   help="'all': every rank's model/optimizer state is written; 'rank0': data-parallel "
                        "jobs with identical replicas write rank 0's copy only "
                        f"[env {c.ENV_DURABLE_REPLICATED}; default all]")
    s.add_argument("--log-level", default=_env("SNAPSHOTD_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING [env SNAPSHOTD_LOG_LEVEL; default INFO]")
    from snapshotd.node.peer import pacing  # --peer-rate, --peer-burst (bulk peer traffic)
    pacing.add_arguments(s)

    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapshotd", description=__doc__)
    add_serve_parser(p.add_subparsers(dest="command", required=True))
    return p


def serve(a) -> int:
    from snapshotd.node.server import Daemon, DaemonConfig

    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = a.node_id or c.default_node_id()
    state_dir = a.state_dir or c.default_state_dir(node)
    token = a.token
    if a.token_file:
        with open(a.token_file) as f:
            token = f.read().strip()
    budget = c.parse_size(a.memory_budget_bytes) if a.memory_budget_bytes else c.default_memory_budget_bytes()
    cfg = DaemonConfig(node_id=node, state_dir=state_dir,
                       socket_path=a.socket or os.environ.get(c.ENV_SOCKET) or os.path.join(state_dir, "snapshotd.sock"),
                       memory_budget_bytes=budget, tcp=a.tcp, token=token,
                       max_slots_per_rank=a.max_slots_per_rank,
                       verify_on_adopt=not a.no_verify_on_adopt, ready_file=a.ready_file,
                       spec_path=a.spec, instance=a.instance, metrics_addr=a.metrics_addr or None,
                       require_job_token=a.require_job_token,
                       scrub_rate_bytes_per_s=a.scrub_rate,
                       scrub_interval_s=a.scrub_interval_s,
                       job_ttl_s=a.job_ttl, job_active_s=a.job_active_s)
    from snapshotd.node.peer import pacing
    from snapshotd.wire.errors import SnapshotdError

    try:
        pacing.configure(a.peer_rate, a.peer_burst, a.peer_dscp)
        daemon = Daemon(cfg)
        flusher = _durable(a, daemon)
        try:
            daemon.serve_forever()
        finally:
            if flusher is not None:
                flusher.stop()
    except (ValueError, SnapshotdError) as exc:
        print(f"snapshotd: {exc}", file=sys.stderr)
        return 2
    return 0


def _durable(a, daemon):
    """The durable tier's flusher (snapshotd.node.durable), started; None when off."""
    if not a.durable_url:
        return None
    from snapshotd.node.durable import DurableConfig, DurableFlusher

    flusher = DurableFlusher(daemon.store, DurableConfig(
        url=a.durable_url, every_versions=a.durable_every_versions, every_s=a.durable_every_s,
        keep=a.durable_keep, rate_bytes_per_s=a.durable_rate, replicated=a.durable_replicated),
        daemon.cfg.node_id, registry=daemon.metrics.registry)
    flusher.attach(daemon.metrics)
    flusher.start()
    return flusher


def main(argv: list[str] | None = None) -> int:
    return serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
