"""The harness's handles on real processes: a local cluster (``snapshotd_tools.localcluster``)
and a data-parallel job (``snapshotd_tools.chaos.trainer``, one process per rank).

``Rig`` owns one cluster directory: it starts the daemons, kills, stops, continues,
wipes and replaces them, reads their status and memory, and at the end stops
everything and reports what it could not clean up (a leak). ``Trainers`` owns one
launch of the job: its ranks' JSON events arrive on a queue and are folded into
per-rank progress (last step, digests, restore point, exit code).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from snapshotd_tools import localcluster as lc
from snapshotd.wire import shm
from snapshotd_tools.demo.trainer_group import read_json_events

JOB = "dp"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pid: int, timeout_s: float = 10.0) -> None:
    """Wait for ``pid`` to be gone, reaping it when it is our child."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not _alive(pid):
                return
        time.sleep(0.01)


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class Rig:
    """A fresh local cluster of ``nodes`` daemons (m = ``parity``) in directory ``d``."""

    def __init__(self, d: str, nodes: int, parity: int, block_size: str, budget: str,
                 netns: bool = False):
        self.d, self.n, self.m, self.budget = d, nodes, parity, budget
        os.makedirs(d, exist_ok=True)
        self.net = None  # netns.Network when each daemon has its own network namespace
        if netns:
            from snapshotd_tools.chaos import netns as ns

            self.info, self.net = ns.up_in_namespaces(d, nodes, parity, block_size, budget)
        else:
            self.info = lc.up(d, nodes, parity, block_size=block_size, budget=budget)
        self.nodes = [f"n{i}" for i in range(nodes)]
        self.socks = [self.info["nodes"][n]["socket"] for n in self.nodes]
        self.prefix = f"snapshotd.{lc.instance_of(d)}."
        self.stopped: set[int] = set()  # pids we SIGSTOPped (continued before any kill)
        self.job = JOB  # the data-parallel job now running (a new id per epoch)

    # -- daemons --------------------------------------------------------------------
    def pid(self, node: str) -> int:
        return lc.node_pid(self.d, node)

    def kill_daemon(self, node: str) -> int:
        pid = self.pid(node)
        signal_pid(pid, signal.SIGKILL)
        self.stopped.discard(pid)
        reap(pid)
        return pid

    def stop(self, pid: int) -> None:
        if signal_pid(pid, signal.SIGSTOP):
            self.stopped.add(pid)

    def cont(self, pid: int) -> None:
        signal_pid(pid, signal.SIGCONT)
        self.stopped.discard(pid)

    def restart(self, node: str, wipe: bool) -> None:
        """A replacement daemon in ``node``'s slot; with ``wipe`` the machine was lost
        (state directory and shared memory gone), so it rebuilds from its peers."""
        if wipe:
            lc.wipe_node(self.d, node)
        if self.net is not None:
            from snapshotd_tools.chaos import netns as ns

            ns.start_in_namespace(self.d, node, self.net, self.nodes.index(node), self.budget)
        else:
            lc.restart_node(self.d, node, self.budget)

    def client(self, node: str, timeout_s: float = 5):
        from snapshotd_client.transport import DaemonClient

        return DaemonClient.for_socket(self.socks[self.nodes.index(node)], timeout_s=timeout_s)

    def stats(self, node: str, timeout_s: float = 3) -> dict | None:
        """The node's Stats (with its cluster status parsed), or None if it does not answer."""
        from google.protobuf.json_format import MessageToDict

        from snapshotd.wire.errors import SnapshotdError

        cl = self.client(node, timeout_s)
        try:
            st = cl.stats()
        except SnapshotdError:
            return None
        finally:
            cl.close()
        row = MessageToDict(st, preserving_proto_field_name=True)
        row["cluster"] = json.loads(st.cluster_json) if st.cluster_json else {}
        return row

    def committed(self, node: str, job: str | None = None) -> int:
        row = self.stats(node)
        if row is None:
            return -1
        return int(row["cluster"].get("jobs", {}).get(job or self.job, {}).get("committed", 0))

    def sees_dead(self, observer: str, node: str) -> bool:
        row = self.stats(observer)
        return bool(row) and not row["cluster"].get("peers", {}).get(node, {}).get("alive", True)

    def whole(self, version: int) -> bool:
        """Every node answers, holds ``version`` (or newer) and reports nothing degraded."""
        for n in self.nodes:
            row = self.stats(n)
            if row is None or row["cluster"].get("degraded"):
                return False
            if int(row["cluster"].get("jobs", {}).get(self.job, {}).get("committed", 0)) < version:
                return False
        return True

    def corrupt_reports(self, job: str | None = None, version: int | None = None) -> list[dict]:
        """The corrupt blocks the daemons found (re-fetch, scrubber, peer reports) and
        list in their status, for ``job`` (default: the running one)."""
        out = []
        for n in self.nodes:
            row = self.stats(n)
            for e in (row or {}).get("cluster", {}).get("corrupt", []):
                if e.get("job") == (job or self.job) and version in (None, e.get("version")):
                    out.append(dict(e, reported_by=n))
        return out

    def drop_job(self, job: str) -> None:
        """Drop ``job`` on every node that answers (its versions, parity and memory)."""
        from snapshotd.wire.errors import SnapshotdError

        for n in self.nodes:
            cl = self.client(n, timeout_s=10)
            try:
                cl.drop_job(job)
            except SnapshotdError:  # a node that never saw the job, or is down
                pass
            finally:
                cl.close()

    def shm_bytes(self, node: str) -> int:
        total = 0
        for name in shm.list_segments(f"{self.prefix}{node}."):
            try:
                total += os.path.getsize(shm.path_of(name))
            except OSError:
                pass
        return total

    def rss(self, node: str) -> int:
        """The daemon's resident memory in bytes (0 when it is not running)."""
        try:
            with open(f"/proc/{self.pid(node)}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
                return int(m.group(1)) * 1024 if m else 0
        except (OSError, ValueError):
            return 0

    def memory(self, node: str) -> int:
        """The daemon's resident memory plus the shared memory it holds, in bytes."""
        return self.rss(node) + self.shm_bytes(node)

    def accounting_leaks(self, tries: int = 10) -> list[str]:
        """Segments on /dev/shm that a node's daemon does not account for. With a job
        running, a segment may be made or freed between the two readings: a mismatch
        counts only when it persists over ``tries`` readings."""
        for _ in range(tries):
            out = self._accounting_mismatch()
            if not out:
                return out
            time.sleep(0.2)
        return out

    def _accounting_mismatch(self) -> list[str]:
        out = []
        for n in self.nodes:
            row = self.stats(n)
            if row is None:
                out.append(f"{n}: daemon does not answer")
                continue
            on_disk, held = self.shm_bytes(n), int(row.get("bytes_reserved", 0))
            if on_disk != held:
                out.append(f"{n}: {on_disk} bytes of segments in /dev/shm, {held} accounted for")
        return out

    def log_tail(self, node: str, n: int = 200) -> list[str]:
        try:
            with open(os.path.join(self.d, f"{node}.log"), errors="replace") as f:
                return f.read().splitlines()[-n:]
        except OSError:
            return []

    def down(self) -> list[str]:
        """Stop every daemon and free the cluster's segments; return what leaked."""
        pids = {n: self.pid(n) for n in self.nodes}
        for pid in list(self.stopped):
            self.cont(pid)
        if os.path.exists(os.path.join(self.d, "cluster.json")):
            lc.down(self.d)
        leaks = []
        for n, pid in pids.items():
            reap(pid, 5)
            if _alive(pid):
                leaks.append(f"daemon {n} (pid {pid}) still running after down")
                signal_pid(pid, signal.SIGKILL)
                reap(pid, 5)
        left = shm.list_segments(self.prefix)
        if left:
            leaks.append(f"{len(left)} segment(s) left in /dev/shm: {', '.join(left[:3])}")
            for name in left:
                shm.unlink(name)
        for p in os.listdir("/proc"):  # a daemon of this cluster nobody recorded
            if p.isdigit() and int(p) not in pids.values():
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if b"snapshotd.node" in cmd and self.d.encode() + b"/" in cmd and _alive(int(p)):
                    leaks.append(f"stray daemon pid {p}")
                    signal_pid(int(p), signal.SIGKILL)
                    reap(int(p), 5)
        if self.net is not None:
            leaks += self.net.destroy()
        return leaks


class Trainers:
    """One launch of the job: ``world`` ranks of ``snapshotd_tools.chaos.trainer``."""

    def __init__(self, d: str, tag: str, world: int, steps: int, sockets: list[str] | None,
                 extra: tuple = (), module: str = "snapshotd_tools.chaos.trainer", job: str = JOB,
                 spawner=None):
        self.world, self.tag, self.steps = world, tag, steps
        self.events: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.logs = [os.path.join(d, f"trainer-{tag}-r{r}.log") for r in range(world)]
        self.last = {r: 0 for r in range(world)}
        self.digests: list = []  # (rank, step, digest, restored)
        self.restored: dict[int, int] = {}
        self.restored_ev: dict[int, dict] = {}  # rank -> its "restored" event
        self.losses: list[float] = []
        self.restore_errors: list[str] = []
        self.ended: dict[int, int] = {}  # rank -> exit code
        self.t_restored: float | None = None
        self.job = job
        self.t_launch = time.time()
        # The trainers' own record (chaos/trainer.py): (time.time(), rank, newest committed
        # version an AdoptShard answer named), and the ranks that began a restore.
        self.commits: list[tuple[float, int, int]] = []
        self.restoring: dict[int, float] = {}
        port = lc.free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"
        for r in range(world):
            argv = ["--rank", str(r), "--world-size", str(world), "--master-port", str(port),
                    "--steps", str(steps), "--job", job, *extra]
            argv += ["--socket", sockets[r]] if sockets else ["--no-snapshot"]
            if spawner is not None:  # forkserver.ForkServer: torch already imported
                p = spawner.spawn(module, argv, env, self.logs[r])
            else:
                with open(self.logs[r], "ab") as log:
                    p = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE,
                                         stderr=log, text=True, env=env)
            self.procs.append(p)
            # A rank's stdout JSON lines onto self.events, then (rank, None): the demo's reader.
            threading.Thread(target=read_json_events, args=(self.events, r, p), daemon=True).start()

    def pump(self, timeout_s: float) -> bool:
        """Fold in the events that arrive within ``timeout_s``; False if none did."""
        try:
            rank, ev = self.events.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return False
        while True:
            self._fold(rank, ev)
            try:
                rank, ev = self.events.get_nowait()
            except queue.Empty:
                return True

    def _fold(self, rank: int, ev: dict | None) -> None:
        if ev is None:
            self.ended[rank] = self.procs[rank].wait()
        elif ev.get("event") == "restore_failed":
            self.restore_errors.append(f"rank {rank}: {ev.get('error')}")
        elif ev.get("event") == "commit_seen":
            self.commits.append((float(ev.get("time", 0)), rank, int(ev.get("version", 0))))
        elif ev.get("event") == "restoring":
            self.restoring[rank] = float(ev.get("time", 0))
        elif ev.get("event") == "built":
            self.digests.append((rank, 0, ev.get("digest"), False))
        elif ev.get("event") == "step":
            self.last[rank] = max(self.last[rank], ev["step"])
            if "digest" in ev:
                self.digests.append((rank, ev["step"], ev["digest"], False))
            if "loss" in ev and rank == self.world - 1:
                self.losses.append(float(ev["loss"]))
        elif ev.get("event") == "restored":
            self.restored[rank] = ev["step"]
            self.restored_ev[rank] = ev
            self.last[rank] = ev["step"]
            if "digest" in ev:
                self.digests.append((rank, ev["step"], ev["digest"], True))
            if len(self.restored) == self.world:
                self.t_restored = time.monotonic()

    @property
    def committed(self) -> int:
        """The newest version this launch's trainers were told had committed (0: none)."""
        return max((v for _, _, v in self.commits), default=0)

    def wait(self, pred, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.tag}: {what} not seen within {timeout_s:.0f} s "
                                   f"(steps per rank {self.last}, exited {self.ended}); "
                                   f"see {self.logs[0]}")
            self.pump(0.1)

    def wait_end(self, timeout_s: float) -> dict[int, int]:
        self.wait(lambda: len(self.ended) == self.world, timeout_s, "every rank's exit")
        return self.ended

    def kill(self, rank: int | None = None) -> None:
        for r in ([rank] if rank is not None else range(self.world)):
            p = self.procs[r]
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.send_signal(signal.SIGCONT)
        for r in ([rank] if rank is not None else range(self.world)):
            try:
                self.procs[r].wait(10)
            except subprocess.TimeoutExpired:
                pass

    def error_lines(self) -> list[str]:
        """The last meaningful line of each rank that failed (its exception)."""
        out = list(self.restore_errors)
        for r, rc in sorted(self.ended.items()):
            if rc == 0:
                continue
            try:
                with open(self.logs[r], errors="replace") as f:
                    lines = [x.strip() for x in f.read().splitlines() if x.strip()]
            except OSError:
                lines = []
            err = next((x for x in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", x)),
                       lines[-1] if lines else "no output")
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            out.append(f"rank {r} ({how}): {err}")
        return out

    def leaked(self) -> list[str]:
        return [f"trainer {self.tag} rank {r} (pid {p.pid}) still running"
                for r, p in enumerate(self.procs) if p.poll() is None]
