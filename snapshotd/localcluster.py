"""``snapshotd cluster up|down`` and ``snapshotd status``: N daemons on this machine.

``up`` writes a spec (127.0.0.1, free ports, one failure domain per node) and a
``cluster.json`` with each node's pid, socket and log into DIR, then starts every
daemon as its own process (its own session, so it outlives the shell that started it)
and waits until all are serving. Its segments are namespaced by a random instance
name (DIR/instance), so several clusters on one machine never touch each other's
shared memory. ``down`` stops them (SIGTERM, then SIGKILL) and
unlinks their shared memory. ``status`` asks every node for its stats.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from snapshotd import shm

DEFAULT_DIR = os.path.join(f"/tmp/snapshotd-{os.getuid()}", "cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(path: str, nodes: int, parity: int, block_size: str, peer_key: str,
               heartbeat_interval_ms: int = 200, heartbeat_timeout_ms: int = 1500) -> list[str]:
    from snapshotd.spec import dump_spec, parse_spec

    ids = [f"n{i}" for i in range(nodes)]
    doc = {"group_size": nodes, "parity": parity, "block_size_bytes": block_size,
           "peer_key": peer_key, "heartbeat_interval_ms": heartbeat_interval_ms,
           "heartbeat_timeout_ms": heartbeat_timeout_ms,
           "nodes": [{"id": i, "host": "127.0.0.1", "port": _free_port(), "peer_port": _free_port(),
                      "failure_domain": f"host-{i}"} for i in ids]}
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


def start_node(d: str, node: str, budget: str = "4GiB", extra=()) -> subprocess.Popen:
    ready = os.path.join(d, f"{node}.ready")
    if os.path.exists(ready):
        os.unlink(ready)
    log = open(os.path.join(d, f"{node}.log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "snapshotd.cli", "serve", "--node-id", node,
         "--spec", os.path.join(d, "spec.yaml"), "--state-dir", os.path.join(d, node),
         "--socket", os.path.join(d, f"{node}.sock"), "--memory-budget-bytes", budget,
         "--ready-file", ready, "--instance", instance_of(d), *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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
    """Start a (replacement) daemon for ``node`` and wait until it serves."""
    p = start_node(d, node, budget)
    set_pid(d, node, p.pid)
    wait_ready(d, node, p)
    return p


def sockets(d: str) -> dict[str, str]:
    with open(os.path.join(d, "cluster.json")) as f:
        return {n: v["socket"] for n, v in json.load(f)["nodes"].items()}


def up(d: str, nodes: int, parity: int, block_size: str = "1MiB", budget: str = "4GiB") -> dict:
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "cluster.json")):
        raise RuntimeError(f"{d} already holds a cluster; run 'snapshotd cluster down --dir {d}' first")
    ids = write_spec(os.path.join(d, "spec.yaml"), nodes, parity, block_size, os.urandom(16).hex())
    procs = {n: start_node(d, n, budget) for n in ids}
    info = {"dir": d, "spec": os.path.join(d, "spec.yaml"), "nodes": {
        n: {"pid": p.pid, "socket": os.path.join(d, f"{n}.sock"), "log": os.path.join(d, f"{n}.log")}
        for n, p in procs.items()}}
    with open(os.path.join(d, "cluster.json"), "w") as f:  # first, so 'down' can stop them
        json.dump(info, f, indent=2)
    for n, p in procs.items():
        wait_ready(d, n, p)
    return info


def down(d: str) -> int:
    path = os.path.join(d, "cluster.json")
    if not os.path.exists(path):
        print(f"no cluster in {d}", file=sys.stderr)
        return 1
    with open(path) as f:
        info = json.load(f)
    for n, v in info["nodes"].items():
        _stop_pid(v["pid"])
        for name in shm.list_segments(shm_prefix(d, n)):
            shm.unlink(name)
    os.unlink(path)
    return 0


def _stop_pid(pid: int, grace_s: float = 5.0) -> None:
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
    from google.protobuf.json_format import MessageToDict

    from snapshotd.errors import SnapshotdError
    from snapshotd_client.transport import DaemonClient

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
        rows.append(row)
    return rows


def format_status(rows: list[dict]) -> str:
    out = [f"{'node':6} {'alive':5} {'group':5} {'committed':>9} {'data MB':>9} {'parity MB':>9} "
           f"{'reserved MB':>11}  degraded"]
    for r in rows:
        if not r.get("alive"):
            out.append(f"{r['node_id']:6} {'no':5} {'-':5} {'-':>9} {'-':>9} {'-':>9} {'-':>11}  unreachable")
            continue
        c = r.get("cluster", {})
        committed = ",".join(f"{j['job_id']}@{j.get('latest_committed_version', 0)}" for j in r.get("jobs", []))
        parity = sum(c.get("parity_bytes", {}).values())
        data = int(r.get("bytes_committed", 0))  # committed payload
        reserved = int(r.get("bytes_reserved", 0))  # + staging slots, parity, copies
        deg = "; ".join(f"{j}: {why}" for j, why in c.get("degraded", {}).items()) or "-"
        out.append(f"{r['node_id']:6} {'yes':5} {c.get('group', '-')!s:5} {committed or '-':>9} "
                   f"{data / 1e6:9.2f} {parity / 1e6:9.2f} {reserved / 1e6:11.2f}  {deg}")
    return "\n".join(out)
