"""Operator subcommands of ``snapshotd``: ``jobs list | show | drop | gc`` and ``health``.

Each talks to one daemon, over its Unix socket (``--socket``, default
``$SNAPSHOTD_SOCKET`` or the daemon's default path) or over TCP (``--target HOST:PORT``,
which needs the daemon token: ``--token`` or ``$SNAPSHOTD_TOKEN``). Exit status: 0 done
(``health``: SERVING), 1 the daemon refused or is not serving (the reason on stderr),
2 bad usage.

``health`` is for probes and scripts: the standard grpc.health.v1 check (no token
needed), NOT_SERVING until the daemon's start-up is complete; ``--wait S`` keeps asking
until SERVING or S seconds have passed (start-up, a restart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

from snapshotd.node.cli import parse_duration
from snapshotd.wire import config as c


def add_connection_args(p: argparse.ArgumentParser, env_token: str | None) -> None:
    p.add_argument("--socket", default=None,
                   help=f"daemon socket [env {c.ENV_SOCKET}; default: the daemon's default]")
    p.add_argument("--target", default=None,
                   help="HOST:PORT of the daemon's TCP listener instead of the socket (needs the token)")
    p.add_argument("--token", default=env_token, help=f"daemon token [env {c.ENV_TOKEN}]")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")


def add_parsers(sub, env_token: str | None) -> None:
    j = sub.add_parser("jobs", help="the jobs a daemon holds: list, show, drop, gc")
    jsub = j.add_subparsers(dest="action", required=True)
    jl = jsub.add_parser("list", help="every job: ranks, committed version, bytes, last activity, state")
    js = jsub.add_parser("show", help="one job in full")
    js.add_argument("job")
    jd = jsub.add_parser("drop", help="drop a job and free its memory (its snapshots are gone)")
    jd.add_argument("job")
    jd.add_argument("--force", action="store_true",
                    help="drop it even if a request named it in the last 30 s (its trainers "
                         "may still be running: they start over from nothing)")
    jg = jsub.add_parser("gc", help="drop the finished and abandoned jobs now")
    jg.add_argument("--older-than", type=parse_duration, default=None,
                    help="idle at least this long, e.g. 2h, 600 (default: the daemon's --job-ttl)")
    jg.add_argument("--dry-run", action="store_true", help="only list what would be dropped")
    for p in (jl, js, jd, jg):
        add_connection_args(p, env_token)
        p.add_argument("--json", action="store_true", help="machine-readable output")

    h = sub.add_parser("health", help="exit 0 when the daemon is serving, else 1 and why "
                                      "(for probes and scripts)")
    add_connection_args(h, env_token)
    h.set_defaults(timeout=3.0)
    h.add_argument("--wait", type=float, default=0.0,
                   help="keep asking until SERVING or this many seconds have passed (default 0: ask once)")
    h.add_argument("--service", default="", help="health service name (default \"\": the daemon)")
    h.add_argument("--quiet", "-q", action="store_true", help="print nothing when serving")


def _target(a) -> str:
    if a.target and a.socket:
        raise SystemExit("snapshotd: give --socket or --target, not both")
    return a.target or "unix:" + (a.socket or c.default_socket_path())


def _client(a):
    from snapshotd_client.transport import DaemonClient

    return DaemonClient(_target(a), token=a.token, timeout_s=a.timeout)


def _when(unix_s: float) -> str:
    if not unix_s:
        return "-"
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _idle(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _dicts(jobs) -> list[dict]:
    from google.protobuf.json_format import MessageToDict

    return [MessageToDict(j, always_print_fields_with_no_presence=True,
                          preserving_proto_field_name=True) for j in jobs]


def _print_table(jobs, out=None) -> None:
    out = out if out is not None else sys.stdout  # the current one, not the one at import
    rows = [("JOB", "RANKS", "COMMITTED", "HELD", "LAST ACTIVITY", "IDLE", "STATE")]
    for j in jobs:
        ranks = f"{j.local_world_size}/{j.world_size}"
        rows.append((j.job_id, ranks, str(j.latest_committed_version), _size(j.bytes_held),
                     _when(j.last_activity_unix_s), _idle(j.idle_s), j.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip(), file=out)


def run_jobs(a) -> int:
    from snapshotd.wire.errors import SnapshotdError

    cl = _client(a)
    try:
        if a.action == "list":
            resp = cl.list_jobs()
            if a.json:
                print(json.dumps({"jobs": _dicts(resp.jobs), "job_ttl_s": resp.job_ttl_s,
                                  "active_s": resp.active_s}, indent=2))
            elif not resp.jobs:
                print("no jobs")
            else:
                _print_table(resp.jobs)
        elif a.action == "show":
            [job] = cl.list_jobs(a.job).jobs
            versions = cl.list_versions(a.job)
            d = _dicts([job])[0]
            d["versions"] = [{"version": v.version, "committed": v.committed,
                              "delivered_ranks": list(v.delivered_ranks), "bytes": v.bytes}
                             for v in versions.versions]
            if a.json:
                print(json.dumps(d, indent=2))
            else:
                for k in ("job_id", "state", "world_size", "local_world_size",
                          "latest_committed_version", "uncommitted_versions", "segments"):
                    print(f"{k}: {d.get(k)}")
                print(f"bytes_held: {job.bytes_held} ({_size(job.bytes_held)})")
                print(f"last_activity: {_when(job.last_activity_unix_s)} ({_idle(job.idle_s)} ago)")
                for v in d["versions"]:
                    print(f"  version {v['version']}: {'committed' if v['committed'] else 'pending'}, "
                          f"ranks {v['delivered_ranks']}, {_size(int(v['bytes']))}")
        elif a.action == "drop":
            freed = cl.drop_job(a.job, refuse_if_in_use=not a.force)
            print(json.dumps({"dropped": a.job, "bytes_freed": freed}) if a.json
                  else f"dropped job {a.job}: {_size(freed)} freed")
        else:  # gc
            resp = cl.collect_jobs(a.older_than, a.dry_run)
            if a.json:
                print(json.dumps({"dropped": _dicts(resp.dropped), "bytes_freed": resp.bytes_freed,
                                  "dry_run": a.dry_run}, indent=2))
            else:
                verb = "would drop" if a.dry_run else "dropped"
                if not resp.dropped:
                    print(f"nothing to drop")
                for j in resp.dropped:
                    print(f"{verb} {j.job_id} ({j.state}, idle {_idle(j.idle_s)}, "
                          f"{_size(j.bytes_held)})")
                if resp.dropped and not a.dry_run:
                    print(f"{_size(resp.bytes_freed)} freed")
    except SnapshotdError as exc:
        print(f"snapshotd: {exc}", file=sys.stderr)
        return 1
    finally:
        cl.close()
    return 0


def health_check(target: str, service: str = "", timeout_s: float = 3.0,
                 token: str | None = None) -> tuple[bool, str]:
    """(serving?, the reason when not) of one grpc.health.v1 Check."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from snapshotd.wire.limits import TOKEN_METADATA_KEY

    md = ((TOKEN_METADATA_KEY, token),) if token else ()
    try:
        with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=timeout_s, metadata=md)
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    if r.status == health_pb2.HealthCheckResponse.SERVING:
        return True, "SERVING"
    return False, health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def run_health(a) -> int:
    target = _target(a)
    deadline = time.monotonic() + max(a.wait, 0.0)
    while True:
        ok, why = health_check(target, a.service, a.timeout, a.token)
        if ok:
            if not a.quiet:
                print(f"{target}: SERVING")
            return 0
        if time.monotonic() >= deadline:
            waited = f" after {a.wait:g} s" if a.wait else ""
            print(f"snapshotd: {target} is not serving{waited}: {why}", file=sys.stderr)
            return 1
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
