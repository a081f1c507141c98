"""``snapshotd cluster up|down`` and ``snapshotd status``: N daemons on this machine.

``up`` writes a spec (127.0.0.1, free ports, one failure domain per node) and a
``cluster.json`` with each node's pid, socket and log into DIR, then starts every
daemon as its own process (its own session, so it outlives the shell that started it)
and waits until all are serving. Its segments are namespaced by a random instance
name (DIR/instance), so several clusters on one machine never touch each other's
shared memory. ``down`` stops them (SIGTERM, then SIGKILL) and
unlinks their shared memory. ``status`` asks every node for its stats.

``up(..., tie_to_parent=True)`` (the demo's foreground cluster) ties each daemon's life
to the process that started it: the kernel sends the daemon SIGTERM when that process
dies, SIGKILL included (``tied``: Linux ``PR_SET_PDEATHSIG``). Clusters of
``snapshotd cluster up`` are meant to outlive the command and are not tied.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from snapshotd.wire import shm

DEFAULT_DIR = os.path.join(f"/tmp/snapshotd-{os.getuid()}", "cluster")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago. All are
    bound at once before any is released: asked one at a time, the kernel can hand out
    the port it just took back, and two nodes of one spec got the same port (a flaky
    cluster test)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_spec(path: str, nodes: int, parity: int, block_size: str, peer_key: str,
               heartbeat_interval_ms: int = 200, heartbeat_timeout_ms: int = 1500,
               peer_encryption: str = "none") -> list[str]:
    from snapshotd.core.spec import dump_spec, parse_spec

    ids = [f"n{i}" for i in range(nodes)]
    ports = free_ports(2 * nodes)
    doc = {"group_size": nodes, "parity": parity, "block_size_bytes": block_size,
           "peer_key": peer_key, "peer_encryption": peer_encryption,
           "heartbeat_interval_ms": heartbeat_interval_ms,
           "heartbeat_timeout_ms": heartbeat_timeout_ms,
           "nodes": [{"id": i, "host": "127.0.0.1", "port": ports[2 * x], "peer_port": ports[2 * x + 1],
                      "failure_domain": f"host-{i}"} for x, i in enumerate(ids)]}
    text = dump_spec(parse_spec(doc))  # validates
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return ids


def instance_of(d: str) -> str:
    """The shm namespace of the cluster in ``d`` (made once, kept in DIR/instance)."""
    path = os.path.join(d, "instance")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("lc" + os.urandom(3).hex())
    with open(path) as f:
        return f.read().strip()


def shm_prefix(d: str, node: str) -> str:
    return f"snapshotd.{instance_of(d)}.{node}."


# Runs as the child's first program: arms PR_SET_PDEATHSIG (1), catches a parent that is
# already gone, then execs the real command in the same process (the signal survives it).
_TIE = ("import ctypes, os, sys; "
        "ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]), 0, 0, 0) == 0 or sys.exit(127); "
        "os.getppid() == int(sys.argv[1]) or os.kill(os.getpid(), int(sys.argv[2])); "
        "os.execv(sys.argv[3], sys.argv[3:])")


def tied(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``argv`` (an absolute program path first) wrapped so that the process gets ``sig``
    when the process that starts it dies, however it dies (Linux ``PR_SET_PDEATHSIG``).
    A short Python prelude arms it and execs ``argv`` in the same process (same pid), so
    nothing runs between fork and exec (a ``preexec_fn`` could deadlock while other
    threads run). The kernel ties it to the THREAD that forks: start it from a thread that
    lives as long as the child should (the main thread: ``require_main_thread``)."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("tying a process to its parent's life needs Linux (PR_SET_PDEATHSIG)")
    return [sys.executable, "-c", _TIE, str(os.getpid()), str(int(sig)), *argv]


def require_main_thread(what: str) -> None:
    import threading

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"{what}: processes tied to this one must be started from the main "
                           "thread (the kernel signals them when the thread that forked exits)")


def start_node(d: str, node: str, budget: str = "4GiB", extra=(), tie_to_parent: bool = False) -> subprocess.Popen:
    """Start ``node``'s daemon (its own session); with ``tie_to_parent`` it gets SIGTERM
    when this process dies (``tied``; call from the main thread)."""
    ready = os.path.join(d, f"{node}.ready")
    if os.path.exists(ready):
        os.unlink(ready)
    argv = [sys.executable, "-m", "snapshotd.node", "serve", "--node-id", node,
            "--spec", os.path.join(d, "spec.yaml"), "--state-dir", os.path.join(d, node),
            "--socket", os.path.join(d, f"{node}.sock"), "--memory-budget-bytes", budget,
            "--ready-file", ready, "--instance", instance_of(d), *extra]
    if tie_to_parent:
        require_main_thread(f"starting daemon {node}")
        argv = tied(argv, signal.SIGTERM)
    log = open(os.path.join(d, f"{node}.log"), "ab")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(d: str, node: str, proc: subprocess.Popen | None = None, timeout_s: float = 60) -> dict:
    ready = os.path.join(d, f"{node}.ready")
    t0 = time.monotonic()
    while not os.path.exists(ready):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"node {node} exited ({proc.returncode}); see {d}/{node}.log")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"node {node} not ready after {timeout_s} s; see {d}/{node}.log")
        time.sleep(0.02)
    with open(ready) as f:
        return json.load(f)


def node_pid(d: str, node: str) -> int:
    with open(os.path.join(d, "cluster.json")) as f:
        return json.load(f)["nodes"][node]["pid"]


def set_pid(d: str, node: str, pid: int) -> None:
    """Record a node's new daemon pid, so ``down`` stops the replacement too."""
    path = os.path.join(d, "cluster.json")
    with open(path) as f:
        info = json.load(f)
    info["nodes"][node]["pid"] = pid
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


def wipe_node(d: str, node: str) -> int:
    """The machine is gone: delete the node's state directory and shared memory.
    Returns the bytes of shared memory freed. (Stop its daemon first.)"""
    import shutil

    shutil.rmtree(os.path.join(d, node), ignore_errors=True)
    freed = 0
    for name in shm.list_segments(shm_prefix(d, node)):
        try:
            freed += os.path.getsize(shm.path_of(name))
        except OSError:
            pass
        shm.unlink(name)
    return freed


def restart_node(d: str, node: str, budget: str = "4GiB") -> subprocess.Popen:
    """Start a (replacement) daemon for ``node`` (with the extra daemon arguments the
    cluster was brought up with, tied to this process if the cluster was) and wait
    until it serves."""
    with open(os.path.join(d, "cluster.json")) as f:
        info = json.load(f)
    p = start_node(d, node, budget, info.get("daemon_args", []), bool(info.get("tied_to_pid")))
    set_pid(d, node, p.pid)
    wait_ready(d, node, p)
    return p


def sockets(d: str) -> dict[str, str]:
    with open(os.path.join(d, "cluster.json")) as f:
        return {n: v["socket"] for n, v in json.load(f)["nodes"].items()}


def up(d: str, nodes: int, parity: int, block_size: str = "1MiB", budget: str = "4GiB",
       peer_encryption: str = "none", daemon_args=(), tie_to_parent: bool = False) -> dict:
    """``daemon_args``: extra ``snapshotd serve`` arguments for every node (and its
    replacements), e.g. ``["--metrics-addr", "127.0.0.1:0"]``. ``tie_to_parent``: every
    daemon (and replacement) gets SIGTERM when this process dies (a foreground cluster,
    e.g. the demo's; call from the main thread)."""
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "cluster.json")):
        raise RuntimeError(f"{d} already holds a cluster; run 'snapshotd cluster down --dir {d}' first")
    ids = write_spec(os.path.join(d, "spec.yaml"), nodes, parity, block_size, os.urandom(16).hex(),
                     peer_encryption=peer_encryption)
    procs = {n: start_node(d, n, budget, daemon_args, tie_to_parent) for n in ids}
    info = {"dir": d, "spec": os.path.join(d, "spec.yaml"), "daemon_args": list(daemon_args),
            "tied_to_pid": os.getpid() if tie_to_parent else None, "nodes": {
        n: {"pid": p.pid, "socket": os.path.join(d, f"{n}.sock"), "log": os.path.join(d, f"{n}.log")}
        for n, p in procs.items()}}
    with open(os.path.join(d, "cluster.json"), "w") as f:  # first, so 'down' can stop them
        json.dump(info, f, indent=2)
    for n, p in procs.items():
        info["nodes"][n]["metrics_port"] = wait_ready(d, n, p).get("metrics_port")
    return info


def down(d: str) -> int:
    path = os.path.join(d, "cluster.json")
    if not os.path.exists(path):
        print(f"no cluster in {d}", file=sys.stderr)
        return 1
    with open(path) as f:
        info = json.load(f)
    for n, v in info["nodes"].items():
        stop_pid(v["pid"])
        for name in shm.list_segments(shm_prefix(d, n)):
            shm.unlink(name)
    os.unlink(path)
    return 0


def stop_pid(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``grace_s`` if it is still there."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def collect_status(d: str) -> list[dict]:
    """Each node's stats (``alive``: it answered); unreachable nodes keep their group
    from the spec, so the redundancy of their group can still be judged."""
    from google.protobuf.json_format import MessageToDict

    from snapshotd.wire.errors import SnapshotdError
    from snapshotd_client.transport import DaemonClient

    groups: dict[str, int] = {}
    try:
        from snapshotd.node.spec_file import load_spec

        spec = load_spec(os.path.join(d, "spec.yaml"))
        groups = {nid: g for g, ids in enumerate(spec.groups) for nid in ids}
    except Exception:  # no spec (not a local cluster dir): groups come from the nodes
        pass
    rows = []
    for node, sock in sockets(d).items():
        cl = DaemonClient.for_socket(sock, timeout_s=3)
        try:
            st = cl.stats()
            row = MessageToDict(st, preserving_proto_field_name=True)
            row["cluster"] = json.loads(st.cluster_json) if st.cluster_json else {}
            row["alive"] = True
        except SnapshotdError as exc:
            row = {"node_id": node, "alive": False, "error": str(exc)}
        finally:
            cl.close()
        if node in groups:
            row["group"] = groups[node]
        rows.append(row)
    return rows


def collect_status_via(socket_path: str, token: str | None = None) -> list[dict]:
    """Status rows as one daemon sees the cluster: its own stats, plus one row per peer
    (``via``: the node whose heartbeats report it) with liveness and committed versions."""
    from google.protobuf.json_format import MessageToDict

    from snapshotd.wire.errors import SnapshotdError
    from snapshotd_client.transport import DaemonClient

    cl = DaemonClient.for_socket(socket_path, token=token, timeout_s=3)
    try:
        st = cl.stats()
    except SnapshotdError as exc:
        return [{"node_id": socket_path, "alive": False, "error": str(exc)}]
    finally:
        cl.close()
    row = MessageToDict(st, preserving_proto_field_name=True)
    row["cluster"] = json.loads(st.cluster_json) if st.cluster_json else {}
    row["alive"] = True
    c = row["cluster"]
    if c:
        row["group"] = c.get("group")
    rows = [row]
    members = set(c.get("group_members", ()))
    for peer, p in sorted(c.get("peers", {}).items()):
        rows.append({"node_id": peer, "alive": bool(p.get("alive")), "via": row["node_id"],
                     "group": c.get("group") if peer in members else None,
                     "jobs": [{"job_id": j, "latest_committed_version": v}
                              for j, v in sorted(p.get("committed", {}).items())]})
    return rows


def group_health(rows: list[dict]) -> list[dict]:
    """Redundancy per group from the nodes' status rows: nodes up, the worst stripe's
    lost shards against m (as the live nodes see it), degraded jobs. Pure."""
    out: dict[int, dict] = {}
    for r in rows:
        c = r.get("cluster") or {}
        g = r.get("group", c.get("group"))
        if g is None:
            continue
        h = out.setdefault(int(g), {"group": int(g), "nodes": 0, "up": 0, "m": None,
                                    "max_lost_shards": 0, "degraded_stripes": 0, "degraded": [],
                                    "down": set()})
        h["nodes"] += 1
        if not r.get("alive"):
            h["down"].add(r["node_id"])
            continue
        h["up"] += 1
        h["m"] = c.get("m", h["m"])
        for job, x in (c.get("redundancy") or {}).items():
            h["max_lost_shards"] = max(h["max_lost_shards"], int(x.get("max_lost_shards", 0)))
            h["degraded_stripes"] = max(h["degraded_stripes"], int(x.get("degraded_stripes", 0)))
            h["down"].update(x.get("down", []))
        for job, why in (c.get("degraded") or {}).items():
            h["degraded"].append(f"{r['node_id']}/{job}: {why}")
    res = []
    for g in sorted(out):
        h = out[g]
        h["down"] = sorted(h["down"])
        m = h["m"]
        if m is not None and (h["max_lost_shards"] > m or h["nodes"] - h["up"] > m):
            h["state"] = "LOST"  # more than m shards of a stripe gone: restores fail
        elif h["down"] or h["degraded"] or h["max_lost_shards"]:
            h["state"] = "degraded"
        else:
            h["state"] = "ok"
        res.append(h)
    return res


def status_tables(rows: list[dict]) -> list:
    """rich tables (no borders, so each row is one line of whitespace-separated
    fields): one row per node, then one row per group with its redundancy health."""
    from rich import box
    from rich.table import Table

    nodes = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, just in (("node", "left"), ("alive", "left"), ("group", "left"), ("committed", "right"),
                      ("data MB", "right"), ("parity MB", "right"), ("reserved MB", "right"),
                      ("refused", "right"), ("degraded", "left")):
        nodes.add_column(col, justify=just, no_wrap=col != "degraded")
    for r in rows:
        grp = "-" if r.get("group") is None else str(r["group"])
        if not r.get("alive"):
            why = f"no heartbeat (seen by {r['via']})" if r.get("via") else "unreachable"
            nodes.add_row(r["node_id"], "[red]no[/]", grp, "-", "-", "-", "-", "-", f"[red]{why}[/]")
            continue
        if r.get("via"):  # a peer as another node sees it: no figures of its own
            committed = ",".join(f"{j['job_id']}@{j['latest_committed_version']}" for j in r["jobs"]) or "-"
            nodes.add_row(r["node_id"], "[green]yes[/]", grp, committed, "-", "-", "-", "-",
                          f"(seen by {r['via']})")
            continue
        c = r.get("cluster", {})
        committed = ",".join(f"{j['job_id']}@{j.get('latest_committed_version', 0)}"
                             for j in r.get("jobs", [])) or "-"
        parity = sum(c.get("parity_bytes", {}).values())
        data = int(r.get("bytes_committed", 0))  # committed payload
        reserved = int(r.get("bytes_reserved", 0))  # + staging slots, parity, copies
        deg = "; ".join(f"{j}: {why}" for j, why in c.get("degraded", {}).items())
        nodes.add_row(r["node_id"], "[green]yes[/]", str(c.get("group", r.get("group", "-"))), committed,
                      f"{data / 1e6:.2f}", f"{parity / 1e6:.2f}", f"{reserved / 1e6:.2f}",
                      str(int(r.get("requests_refused", 0))), f"[yellow]{deg}[/]" if deg else "-")
    health = group_health(rows)
    groups = None
    if health:
        groups = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left",
                       title="redundancy per group")
        for col in ("group", "nodes up", "lost/m", "degraded stripes", "health", "down"):
            groups.add_column(col, no_wrap=col != "down")
        color = {"ok": "green", "degraded": "yellow", "LOST": "red"}
        for h in health:
            m = "?" if h["m"] is None else h["m"]
            groups.add_row(f"g{h['group']}", f"{h['up']}/{h['nodes']}", f"{h['max_lost_shards']}/{m}",
                           str(h["degraded_stripes"]), f"[{color[h['state']]}]{h['state']}[/]",
                           ",".join(h["down"]) or "-")
    return [nodes] if groups is None else [nodes, groups]


def format_status(rows: list[dict], width: int = 160) -> str:
    """The status tables as plain text (logs, pipes, the demo)."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False, color_system=None, highlight=False)
    for t in status_tables(rows):
        con.print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()).strip("\n")


def print_status(rows: list[dict]) -> None:
    """Print the status tables: in colour on a terminal, plain text otherwise."""
    if not sys.stdout.isatty():
        print(format_status(rows))
        return
    from rich.console import Console

    con = Console()
    for t in status_tables(rows):
        con.print(t)
