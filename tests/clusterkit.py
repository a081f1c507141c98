"""Shared by the cluster tests: a local cluster of real daemons (``Cluster``), its
fixture, and small helpers (tests/node/test_cluster.py, test_cluster_scrub.py,
tests/integration/test_checkfree_integration.py)."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest

from conftest import REPO
from snapshotd.wire import errors
from snapshotd.wire import shm
from snapshotd_tools import localcluster as lc
from snapshotd.core import placement as pl
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.manifest import block_checksums
from snapshotd.node.peer import PeerAuthError, PeerClient, RemoteError
from snapshotd.core.recovery import plan_recovery
from snapshotd.node.spec_file import load_spec
from snapshotd_client.transport import DaemonClient

JOB = "train"
BLOCK = "64KiB"
KiB = 1 << 10
# One file per running cluster of this test file: {pid of the test process, cluster dir}.
MARKERS = os.path.join(f"/tmp/snapshotd-{os.getuid()}", "test_cluster")
COMMIT_TIMEOUT_S = 30
REBUILD_TIMEOUT_S = 40


# -- helpers ----------------------------------------------------------------------------
def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def wait_for(pred, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll ``pred`` until it returns a truthy value; fail with ``what`` after the timeout."""
    t0 = time.monotonic()
    last_exc = None
    while time.monotonic() - t0 < timeout_s:
        try:
            got = pred()
            if got:
                return got
        except errors.SnapshotdError as exc:  # a daemon still starting, a job not there yet
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + (f" (last error: {last_exc})" if last_exc else ""))


def pl_blocks(nbytes: int, bs: int) -> int:
    return (nbytes + bs - 1) // bs


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _pid_is_ours(pid: int, d: str) -> bool:
    """The pid is still a ``snapshotd serve`` of cluster dir ``d`` (not a reused pid)."""
    cmd = _cmdline(pid)
    return "snapshotd.node" in cmd and d in cmd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _segments(d: str, node: str) -> list[str]:
    return shm.list_segments(lc.shm_prefix(d, node))


def _kill_daemons_of(d: str) -> None:
    """SIGKILL every daemon serving cluster dir ``d`` (found by its command line, so
    also those a failed ``up`` never recorded) and wait until they are gone."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pid_is_ours(int(p), d)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        _reap(pid, d, timeout_s=None, wait_s=5)


def _drop_segments_of(d: str) -> None:
    if os.path.exists(os.path.join(d, "instance")):
        for name in shm.list_segments(f"snapshotd.{lc.instance_of(d)}."):
            shm.unlink(name)


def _clean_leftovers() -> None:
    """Runs killed before their finalizer: stop their daemons, drop their segments.
    Clusters of a test process still alive (a concurrent run) are left alone."""
    for path in glob.glob(os.path.join(MARKERS, "*.json")):
        try:
            with open(path) as f:
                owner = json.load(f)
            pid, d = int(owner["pid"]), str(owner["dir"])
        except (OSError, ValueError, KeyError, TypeError):
            os.unlink(path)
            continue
        if pid != os.getpid() and _pid_alive(pid) and "python" in _cmdline(pid):
            continue
        _kill_daemons_of(d)
        _drop_segments_of(d)
        os.unlink(path)


def _reap(pid: int, d: str, timeout_s: float | None = None, wait_s: float | None = None) -> None:
    """Wait for daemon ``pid`` of cluster ``d`` to exit (reaping it if it is our child):
    SIGKILL it after ``timeout_s``; give up after ``wait_s``."""
    t0 = time.monotonic()
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # reaped by subprocess already, or not our child
            if not _pid_is_ours(pid, d):
                return
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            os.kill(pid, signal.SIGKILL)
            timeout_s = None
        if wait_s is not None and time.monotonic() - t0 > wait_s:
            return
        time.sleep(0.01)


class Cluster:
    """A local cluster of ``n`` daemons, group n = k + m, node ni hosting rank i."""

    def __init__(self, d: str, n: int, m: int):
        self.d, self.n, self.m = d, n, m
        self.info = lc.up(d, n, m, block_size=BLOCK, budget="1GiB")
        self.nodes = sorted(self.info["nodes"], key=lambda x: int(x[1:]))
        self.spec = load_spec(os.path.join(d, "spec.yaml"))
        self.bs = self.spec.block_size_bytes
        self._clients: dict[str, DaemonClient] = {}
        self.versions: dict[int, dict[int, tuple[bytes, pb.ShardManifest]]] = {}

    # -- processes
    def pid(self, node: str) -> int:
        return lc.node_pid(self.d, node)

    def kill(self, node: str, wipe: bool) -> None:
        """SIGKILL the daemon; with ``wipe`` the machine is lost: state and shm gone."""
        c = self._clients.pop(node, None)
        if c is not None:
            c.close()
        pid = self.pid(node)
        if _pid_is_ours(pid, self.d):
            os.kill(pid, signal.SIGKILL)
        _reap(pid, self.d)
        if wipe:
            lc.wipe_node(self.d, node)

    def start(self, node: str) -> None:
        lc.restart_node(self.d, node, "1GiB")

    def lose(self, nodes) -> None:
        """Lose every node of ``nodes`` at once, then bring each back empty."""
        for node in nodes:
            self.kill(node, wipe=True)
        for node in nodes:
            assert not _segments(self.d, node)
            self.start(node)

    def crash_restart(self, node: str) -> None:
        """The daemon dies (SIGKILL), the machine and its shared memory stay."""
        self.kill(node, wipe=False)
        self.start(node)

    # -- the client API
    def client(self, node: str) -> DaemonClient:
        c = self._clients.get(node)
        if c is None:
            c = self._clients[node] = DaemonClient.for_socket(
                os.path.join(self.d, f"{node}.sock"), timeout_s=30)
        return c

    def cluster_status(self, node: str) -> dict:
        return json.loads(self.client(node).stats().cluster_json)

    def committed(self, node: str) -> int:
        """The job's committed version as the node's store reports it (0: none / no job)."""
        for j in self.client(node).stats().jobs:
            if j.job_id == JOB:
                return j.latest_committed_version
        return 0

    def write(self, node: str, version: int, data: bytes, seed: int = 0) -> pb.ShardManifest:
        """Deliver rank int(node[1:])'s shard of ``version`` to ``node`` (raw API)."""
        rank = self.nodes.index(node)
        cl = self.client(node)
        reg = cl.register_job(JOB, self.n, 1)
        assert reg.block_size_bytes == self.bs
        st = cl.acquire_staging(JOB, rank, version, len(data))
        assert st.segment_name.startswith(lc.shm_prefix(self.d, node)), st.segment_name
        seg = shm.open_segment(st.segment_name, writable=True)
        try:
            if data:
                seg.buf[:len(data)] = data
        finally:
            seg.close()
        n = len(data)
        m = pb.ShardManifest(
            job_id=JOB, rank=rank, version=version, payload_bytes=n, block_size_bytes=self.bs,
            checksum_algo="xxh3_64", meta_json=json.dumps({"step": version, "rank": rank}),
            tensors=[pb.TensorEntry(name="w", dtype="uint8", shape=[n], offset=0, nbytes=n)] if n else [])
        m.block_checksums.extend(block_checksums(data, n, self.bs))
        resp = cl.adopt(st.segment_name, m)
        assert not resp.committed  # in a cluster the commit comes from the votes
        return m

    def push(self, version: int, nodes=None, empty: int | None = None) -> None:
        """Deliver ``version`` on ``nodes`` (all by default): uneven random sizes of
        100-400 KiB, rank ``empty`` (default: rotating with the version) with none."""
        empty = version % self.n if empty is None else empty
        shards = self.versions.setdefault(version, {})
        for node in nodes or self.nodes:
            rank = self.nodes.index(node)
            rng = random.Random(f"{self.n}/{self.m}/{version}/{rank}")
            size = 0 if rank == empty else rng.randrange(100 * KiB, 400 * KiB)
            data = random.Random(f"{version}/{rank}").randbytes(size)
            shards[rank] = (data, self.write(node, version, data))

    def wait_committed(self, version: int, nodes=None, timeout_s: float = COMMIT_TIMEOUT_S) -> None:
        for node in nodes or self.nodes:
            wait_for(lambda: self.committed(node) == version, timeout_s,
                     f"{node} to commit version {version} (it has {self._safe_committed(node)})")

    def _safe_committed(self, node: str):
        try:
            return self.committed(node)
        except errors.SnapshotdError as exc:
            return exc

    def open(self, node: str, version: int = 0) -> tuple[pb.ShardManifest, bytes]:
        rank = self.nodes.index(node)
        r = self.client(node).open_shard(JOB, rank, version)
        seg = shm.open_segment(r.segment_name)
        try:
            n = r.manifest.payload_bytes
            data = bytes(seg.buf[:n]) if n else b""
        finally:
            seg.close()
        return r.manifest, data

    def check_restorable(self, version: int, nodes=None) -> None:
        """OpenShard on each node returns its rank's exact bytes and manifest of ``version``."""
        for node in nodes or self.nodes:
            rank = self.nodes.index(node)
            want_data, want_m = self.versions[version][rank]
            for v in (0, version):
                m, data = self.open(node, v)
                assert m.version == version and m.rank == rank, (node, m.version, m.rank)
                assert m == want_m, f"{node}: manifest differs"
                assert len(data) == len(want_data) and sha(data) == sha(want_data), \
                    f"{node}: rank {rank} v{version} bytes differ"

    def check_settled(self, version: int) -> None:
        """After ``version`` committed everywhere and nothing is in flight: every node
        holds the parity segment of ``version`` plus at most two released ones kept for
        reuse, and a bounded number of rank segments (no leak across versions)."""
        for node in self.nodes:
            segs = _segments(self.d, node)
            parity = [s for s in segs if ".parity." in s]
            ranks = [s for s in segs if ".parity." not in s]
            if self.m:
                assert 1 <= len(parity) <= 3, (node, segs)
            else:
                assert parity == [], (node, segs)
            assert 1 <= len(ranks) <= 3, (node, segs)  # max_slots_per_rank
            st = self.cluster_status(node)
            assert st["jobs"][JOB]["committed"] == version, (node, st["jobs"])
            assert not st["degraded"], (node, st["degraded"])

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()


def cluster_fixture(tmp_path, factory=None):
    """The body of ``make_cluster``, for ``Cluster`` or a subclass (``factory(d, n, m, *args,
    **kw)``): one cluster per test, and at the end every daemon stopped, no segment left
    and no traceback in any daemon log."""
    factory = factory or Cluster
    made: list[Cluster] = []
    marker = os.path.join(MARKERS, f"{os.getpid()}.json")

    def make(n: int, m: int, *args, **kw) -> Cluster:
        assert not made, "one cluster per test"
        _clean_leftovers()
        d = str(tmp_path / f"cluster-{n}-{m}")
        os.makedirs(MARKERS, exist_ok=True)
        with open(marker, "w") as f:
            json.dump({"pid": os.getpid(), "dir": d}, f)
        try:
            c = factory(d, n, m, *args, **kw)
        except BaseException:
            _kill_daemons_of(d)
            _drop_segments_of(d)
            os.unlink(marker)
            raise
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
        logs = {n: open(os.path.join(c.d, f"{n}.log"), errors="replace").read()
                for n in c.nodes if os.path.exists(os.path.join(c.d, f"{n}.log"))}
        pids = [c.pid(n) for n in c.nodes]
        for pid in pids:  # stop them all at once (each may wait out a heartbeat) ...
            if _pid_is_ours(pid, c.d):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            _reap(pid, c.d, timeout_s=10)
        assert lc.down(c.d) == 0  # ... then down() finds them gone and frees the shm
        if os.path.exists(marker):
            os.unlink(marker)
        inst = lc.instance_of(c.d)
        left = shm.list_segments(f"snapshotd.{inst}.")
        assert not left, f"segments left behind: {left}"
        tracebacks = {n: t[max(0, t.index("Traceback") - 2000):][:6000]
                      for n, t in logs.items() if "Traceback" in t}
        assert not tracebacks, f"daemon logs with tracebacks: {tracebacks}"


@pytest.fixture
def make_cluster(tmp_path):
    yield from cluster_fixture(tmp_path)


