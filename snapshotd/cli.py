"""``snapshotd`` command line: serve, stats, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from snapshotd import config as c


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _scrub_rate(text: str) -> int:
    """--scrub-rate: a size per second (64MiB, 0 = off); a clear error otherwise."""
    try:
        return c.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapshotd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

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
    s.add_argument("--log-level", default=_env("SNAPSHOTD_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING [env SNAPSHOTD_LOG_LEVEL; default INFO]")

    st = sub.add_parser("stats", help="print a daemon's holdings as JSON")
    st.add_argument("--socket", default=None, help=f"daemon socket [env {c.ENV_SOCKET}]")
    st.add_argument("--token", default=_env(c.ENV_TOKEN), help=f"[env {c.ENV_TOKEN}]")

    cl = sub.add_parser("cluster", help="a local cluster of daemons on this machine")
    clsub = cl.add_subparsers(dest="action", required=True)
    cu = clsub.add_parser("up", help="start N daemons with a generated spec")
    cu.add_argument("--nodes", type=int, default=4, help="number of nodes = group size (default 4)")
    cu.add_argument("--parity", type=int, default=2, help="parity blocks per stripe, m (default 2)")
    cu.add_argument("--block-size", default="1MiB", help="erasure block size (default 1MiB)")
    cu.add_argument("--memory-budget-bytes", default="4GiB", help="per daemon (default 4GiB)")
    cu.add_argument("--dir", default=None, help="cluster directory (default /tmp/snapshotd-UID/cluster)")
    cu.add_argument("--peer-encryption", choices=("none", "curve"), default="none",
                    help="peer plane over ZeroMQ CURVE, keys derived from the spec's peer_key "
                         "(default none: HMAC-authenticated, not encrypted)")
    cu.add_argument("--metrics", action="store_true",
                    help="every daemon serves Prometheus metrics on a free port (in NODE.ready)")
    cd = clsub.add_parser("down", help="stop the daemons and free their shared memory")
    cd.add_argument("--dir", default=None, help="cluster directory")

    stt = sub.add_parser("status", help="every node: liveness, versions, bytes, redundancy per group")
    stt.add_argument("--dir", default=None, help="local cluster directory (default /tmp/snapshotd-UID/cluster)")
    stt.add_argument("--socket", default=None,
                     help="instead of a local cluster: ask this daemon (its own figures, and its "
                          "peers' liveness and commits as it sees them)")
    stt.add_argument("--token", default=_env(c.ENV_TOKEN), help=f"daemon token [env {c.ENV_TOKEN}]")
    stt.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser("demo", help="4-node erasure-coded cluster + data-parallel training; "
                                     "a node is killed, rebuilt and the job resumes bit-exactly")
    d.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps (default 30; 40 with --single-node)")
    d.add_argument("--kill-at", type=int, default=None,
                   help="kill node 2 (the trainer, with --single-node) after this step "
                        "(default 12; 17 with --single-node)")
    d.add_argument("--nodes", type=int, default=4, help="cluster nodes = data-parallel ranks (default 4)")
    d.add_argument("--parity", type=int, default=2, help="parity blocks per stripe, m (default 2)")
    d.add_argument("--no-shard-replicated", action="store_true",
                   help="every rank stores the full replicated state (default: its 1/N slice, "
                        "when the client supports shard_replicated)")
    d.add_argument("--single-node", action="store_true",
                   help="the single-daemon demo: trainer and daemon SIGKILLed, resumed from shared memory")
    from snapshotd.chaos import cli as chaos_cli

    chaos_cli.add_parser(sub)
    return p


def _serve(a) -> int:
    from snapshotd.server import Daemon, DaemonConfig

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
                       scrub_interval_s=a.scrub_interval_s)
    from snapshotd.errors import SnapshotdError

    try:
        Daemon(cfg).serve_forever()
    except (ValueError, SnapshotdError) as exc:
        print(f"snapshotd: {exc}", file=sys.stderr)
        return 2
    return 0


def _stats(a) -> int:
    from google.protobuf.json_format import MessageToDict

    from snapshotd.errors import SnapshotdError
    from snapshotd_client.transport import DaemonClient

    cl = DaemonClient.for_socket(a.socket or c.default_socket_path(), token=a.token, timeout_s=5)
    try:
        print(json.dumps(MessageToDict(cl.stats(), always_print_fields_with_no_presence=True), indent=2))
    except SnapshotdError as exc:
        print(f"snapshotd: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "serve":
        return _serve(a)
    if a.command == "stats":
        return _stats(a)
    if a.command in ("cluster", "status"):
        from snapshotd import localcluster as lc

        d = a.dir or lc.DEFAULT_DIR
        if a.command == "status":
            rows = lc.collect_status_via(a.socket, a.token) if a.socket else lc.collect_status(d)
            if a.json:
                print(json.dumps(rows, indent=2))
            else:
                lc.print_status(rows)
            return 0 if all(r.get("alive") for r in rows) else 1
        if a.action == "up":
            info = lc.up(d, a.nodes, a.parity, a.block_size, a.memory_budget_bytes,
                         peer_encryption=a.peer_encryption,
                         daemon_args=["--metrics-addr", "127.0.0.1:0"] if a.metrics else [])
            print(f"cluster of {a.nodes} nodes (m={a.parity}) up in {d}")
            for n, v in info["nodes"].items():
                metrics = f", metrics http://127.0.0.1:{v['metrics_port']}/metrics" if v.get("metrics_port") else ""
                print(f"  {n}: pid {v['pid']}, socket {v['socket']}{metrics}")
            return 0
        return lc.down(d)
    if a.command == "chaos":
        from snapshotd.chaos import cli as chaos_cli

        return chaos_cli.run(a)
    if a.command == "demo":
        if a.single_node:
            from snapshotd.demo.single_node import run_demo

            return run_demo(a.dir, steps=a.steps or 40, kill_at=a.kill_at or 17)
        from snapshotd.demo.multi_node import run_multi_node_demo

        try:
            return run_multi_node_demo(a.dir, steps=a.steps or 30, kill_at=a.kill_at or 12,
                                       nodes=a.nodes, parity=a.parity,
                                       shard_replicated=False if a.no_shard_replicated else None)
        except ValueError as exc:
            print(f"snapshotd demo: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
