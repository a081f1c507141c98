"""The ``snapshotd`` command: serve (the daemon, :mod:`snapshotd.node.cli`), stats,
jobs and health (:mod:`snapshotd_tools.ops`), status, cluster, demo and chaos.

Output into a closed pipe (``snapshotd stats | head``) ends the command quietly with
status 141 (128 + SIGPIPE), as other Unix tools do, never with a traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from snapshotd.node import cli as node_cli
from snapshotd.wire import config as c


# The --help text the command has always shown (the module docstring is for readers).
DESCRIPTION = "``snapshotd`` command line: serve, stats, demo."


def _env(name: str, default=None):
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapshotd", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    node_cli.add_serve_parser(sub)

    st = sub.add_parser("stats", help="print a daemon's holdings as JSON")
    st.add_argument("--socket", default=None, help=f"daemon socket [env {c.ENV_SOCKET}]")
    st.add_argument("--target", default=None,
                    help="HOST:PORT of the daemon's TCP listener instead of the socket (needs the token)")
    st.add_argument("--token", default=_env(c.ENV_TOKEN), help=f"[env {c.ENV_TOKEN}]")

    from snapshotd_tools import ops

    ops.add_parsers(sub, _env(c.ENV_TOKEN))

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
    from snapshotd_tools.chaos import cli as chaos_cli

    chaos_cli.add_parser(sub)
    from snapshotd_tools import plan as plan_cli

    plan_cli.add_parser(sub)
    return p


def _stats(a) -> int:
    from google.protobuf.json_format import MessageToDict

    from snapshotd.wire.errors import SnapshotdError
    from snapshotd_client.transport import DaemonClient

    if a.target and a.socket:
        print("snapshotd: give --socket or --target, not both", file=sys.stderr)
        return 2
    target = a.target or "unix:" + (a.socket or c.default_socket_path())
    cl = DaemonClient(target, token=a.token, timeout_s=5)
    try:
        print(json.dumps(MessageToDict(cl.stats(), always_print_fields_with_no_presence=True), indent=2))
    except SnapshotdError as exc:
        print(f"snapshotd: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return rc
    except BrokenPipeError:
        _quiet_closed_pipe()
        return 128 + signal.SIGPIPE


def _quiet_closed_pipe() -> None:
    """The reader of our output went away: point stdout at /dev/null so that the flush
    at exit does not raise again (and print 'Exception ignored ...')."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "serve":
        return node_cli.serve(a)
    if a.command == "stats":
        return _stats(a)
    if a.command == "jobs":
        from snapshotd_tools import ops

        return ops.run_jobs(a)
    if a.command == "health":
        from snapshotd_tools import ops

        return ops.run_health(a)
    if a.command in ("cluster", "status"):
        from snapshotd_tools import localcluster as lc

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
        from snapshotd_tools.chaos import cli as chaos_cli

        return chaos_cli.run(a)
    if a.command == "plan":
        from snapshotd_tools import plan as plan_cli

        return plan_cli.run(a)
    if a.command == "demo":
        if a.single_node:
            from snapshotd_tools.demo.single_node import run_demo

            return run_demo(a.dir, steps=a.steps or 40, kill_at=a.kill_at or 17)
        from snapshotd_tools.demo.multi_node import run_multi_node_demo

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
