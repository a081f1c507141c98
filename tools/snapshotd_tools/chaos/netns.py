"""Network partitions: each daemon in its own network namespace, cut by taking its link down.

Layout (root and ``ip`` needed; all traffic stays on this machine)::

    root namespace:  bridge c<id>b (10.R.S.254/24)
                       |-- veth c<id>h0  <->  c<id>p0 in namespace c<id>-n0: 10.R.S.1   (daemon n0)
                       |-- veth c<id>h1  <->  c<id>p1 in namespace c<id>-n1: 10.R.S.2   (daemon n1)
                       ...

The spec's hosts are the namespace addresses, so the peer plane (ZeroMQ) and the
heartbeats cross the veth links; the trainers stay in the root namespace and reach
their daemon by its Unix socket, and /dev/shm is shared, so a partition cuts only the
daemons off from each other. ``cut`` takes the host ends of the chosen nodes' links
down for a while and brings them back.

Daemons are started by ``snapshotd_tools.localcluster`` unchanged: the harness thread enters
the node's namespace (``setns``) just around the fork, so the child is born in it.

Each live ``Network`` has an owner record, ``/run/snapshotd-netns/<id>`` (the creating
process's pid and start time). ``destroy`` removes the namespaces, the bridge and the
record; a harness SIGKILLed before that leaves all three behind (a stale bridge keeps its
10.R.S.254/24 address, so a later network drawing the same subnet would route through
it). ``create`` first sweeps the records whose owner is gone (``sweep_stale``).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import threading
import time
from contextlib import contextmanager

from snapshotd_tools import localcluster as lc

CLONE_NEWNET = 0x40000000
_libc = None


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode != 0:
        return "the ip command (iproute2) is missing"
    name = "chaosprobe" + os.urandom(2).hex()
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@contextmanager
def entered(ns: str):
    """Run the body (this thread only) inside network namespace ``ns``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the harness's namespace")
    finally:
        os.close(own)
        os.close(target)


OWNERS = "/run/snapshotd-netns"  # one record per live Network (module docstring)


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time (clock ticks since boot, /proc/PID/stat field 22): with
    the pid, who a record's owner was even after the pid is reused. None: no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def sweep_stale(owners: str = OWNERS) -> list[str]:
    """Remove what each Network whose owner process is gone left behind: its namespaces
    (and with them their veths), its bridge, its record. Returns what it removed."""
    removed: list[str] = []
    try:
        tags = os.listdir(owners)
    except FileNotFoundError:
        return removed
    for tag in tags:
        if not re.fullmatch(r"[0-9a-f]{1,16}", tag):
            continue  # not a record of ours (a temporary file being written, say)
        path = os.path.join(owners, tag)
        try:
            with open(path) as f:
                rec = json.load(f)
            pid, start, nodes = int(rec["pid"]), str(rec["start"]), int(rec["nodes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _start_time(pid) == start:
            continue  # its owner is alive: in use
        for i in range(nodes):
            ns = f"c{tag}-n{i}"
            if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
                removed.append(ns)
        if subprocess.run(["ip", "link", "del", f"c{tag}b"], capture_output=True).returncode == 0:
            removed.append(f"c{tag}b")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return removed


class Network:
    """The bridge, namespaces and veth pairs of one cluster (``tag``: a few hex digits)."""

    def __init__(self, tag: str, nodes: int):
        self.tag, self.n = tag, nodes
        b = int(tag[:4], 16)
        self.net = f"10.{200 + b % 50}.{(b >> 6) % 256}"
        self.bridge = f"c{tag}b"
        self.made: list[str] = []
        self.owners = OWNERS

    def ns(self, i: int) -> str:
        return f"c{self.tag}-n{i}"

    def host_link(self, i: int) -> str:
        return f"c{self.tag}h{i}"

    def addr(self, i: int) -> str:
        return f"{self.net}.{i + 1}"

    def record(self) -> str:
        return os.path.join(self.owners, self.tag)

    def create(self) -> None:
        gone = sweep_stale(self.owners)
        if gone:
            print(f"[netns] removed what killed harnesses left: {', '.join(gone)}", flush=True)
        os.makedirs(self.owners, exist_ok=True)
        tmp = self.record() + ".tmp"
        with open(tmp, "w") as f:  # before anything is made, so a kill at any point is swept
            json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()), "nodes": self.n}, f)
        os.replace(tmp, self.record())
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self.made.append("bridge")
            _ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, h, p = self.ns(i), self.host_link(i), f"c{self.tag}p{i}"
                _ip("netns", "add", ns)
                self.made.append(ns)
                _ip("link", "add", h, "type", "veth", "peer", "name", p)
                _ip("link", "set", p, "netns", ns)
                _ip("link", "set", h, "master", self.bridge)
                _ip("link", "set", h, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", p)
                _ip("-n", ns, "link", "set", p, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()  # what was made, and the record
            raise

    def set_link(self, i: int, up: bool) -> None:
        _ip("link", "set", self.host_link(i), "up" if up else "down")

    def destroy(self) -> list[str]:
        left = []
        for name in self.made[1:]:
            r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if r.returncode != 0:
                left.append(f"namespace {name}: {r.stderr.strip()}")
        if self.made and self.made[0] == "bridge":
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.made = []
        try:
            os.unlink(self.record())
        except FileNotFoundError:
            pass
        return left


def up_in_namespaces(d: str, nodes: int, parity: int, block_size: str, budget: str) -> tuple[dict, Network]:
    """``localcluster.up``, but each daemon in its own namespace with its own address."""
    import yaml

    os.makedirs(d, exist_ok=True)
    net = Network(lc.instance_of(d)[2:], nodes)
    net.create()
    try:
        spec = os.path.join(d, "spec.yaml")
        ids = lc.write_spec(spec, nodes, parity, block_size, os.urandom(16).hex())
        with open(spec) as f:
            doc = yaml.safe_load(f)
        for i, nd in enumerate(doc["nodes"]):
            nd["host"] = net.addr(i)
        with open(spec, "w") as f:
            yaml.safe_dump(doc, f)
        info = {"dir": d, "spec": spec, "daemon_args": [], "nodes": {
            n: {"pid": 0, "socket": os.path.join(d, f"{n}.sock"), "log": os.path.join(d, f"{n}.log")}
            for n in ids}}
        with open(os.path.join(d, "cluster.json"), "w") as f:
            json.dump(info, f, indent=2)
        threads = [threading.Thread(target=start_in_namespace, args=(d, n, net, i, budget))
                   for i, n in enumerate(ids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(os.path.join(d, "cluster.json")) as f:
            info = json.load(f)
        missing = [n for n, v in info["nodes"].items() if not v["pid"] or not os.path.exists(
            os.path.join(d, f"{n}.ready"))]
        if missing:
            raise RuntimeError(f"daemons {missing} did not start in their namespaces; see {d}/*.log")
        return info, net
    except BaseException:
        if os.path.exists(os.path.join(d, "cluster.json")):
            lc.down(d)
        net.destroy()
        raise


_pid_lock = threading.Lock()


def start_in_namespace(d: str, node: str, net: Network, i: int, budget: str) -> None:
    """Start (or replace) ``node``'s daemon inside its namespace and wait until it serves."""
    with _pid_lock:  # restart_node rewrites cluster.json: one at a time
        with entered(net.ns(i)):
            p = lc.start_node(d, node, budget)
        lc.set_pid(d, node, p.pid)
    lc.wait_ready(d, node, p)


class NetnsPartitioner:
    """Marker the runner checks: partitions run on a namespaced cluster."""

    @staticmethod
    def cut(net: Network, indices: list[int], seconds: float) -> None:
        for i in indices:
            net.set_link(i, False)
        try:
            time.sleep(seconds)
        finally:
            for i in indices:
                net.set_link(i, True)
