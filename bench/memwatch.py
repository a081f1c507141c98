"""Where a local cluster's memory goes: a sampler of its daemons, its writer and its shm.

:class:`MemWatch` samples every ``interval_s`` on a thread of its own: per daemon its
private resident memory (``RssAnon`` of /proc/PID/status: heap, ZeroMQ buffers, held
contributions), the shared memory it has mapped (``RssShmem``), and the bytes its
/dev/shm segments really occupy (allocated blocks of the files named by the cluster's
prefix, mapped or not); the same for the writer (this process). ``total`` is every
daemon's and the writer's private memory plus the cluster's /dev/shm: each byte once.
Peaks are kept per ``phase`` (set by the caller: "staging", "pipeline", "rebuild"...).

Call order: ``MemWatch(pids, shm_prefixes)``, ``start()``, ``phase = ...`` any time,
``stop()`` then ``report()``. Linux only (reads /proc).
"""

from __future__ import annotations

import os
import re
import threading

_SLOT = re.compile(r"\.r\d+\.s\d+")


def _status_kb(pid: int, *fields: str) -> dict:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in out:
                    out[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def shm_bytes(prefix: str) -> dict:
    """{"shm_files", "shm_parity", "shm_data", "shm_other"}: bytes allocated by the
    /dev/shm files whose names start with ``prefix`` (parity buffers: ``.parity.``;
    rank slots: ``.rN.sM``; the rest: copies, rebuild scratch...)."""
    out = {"shm_files": 0, "shm_parity": 0, "shm_data": 0, "shm_other": 0}
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return out
    for name in names:
        if name.startswith(prefix):
            try:
                n = os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
            except OSError:
                continue  # released meanwhile
            kind = "shm_parity" if ".parity." in name else "shm_data" if _SLOT.search(name) else "shm_other"
            out["shm_files"] += n
            out[kind] += n
    return out


class MemWatch:
    def __init__(self, pids: dict, shm_prefixes: dict, interval_s: float = 0.1):
        """``pids``: {node: pid} of the daemons; ``shm_prefixes``: {node: its segments' prefix}."""
        self.pids, self.prefixes, self.interval_s = dict(pids), dict(shm_prefixes), interval_s
        self.phase = "start"
        self.peaks: dict = {}  # phase -> {"total", "nodes": {node: {...}}, "writer_anon"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memwatch", daemon=True)

    def start(self) -> "MemWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sample(self) -> dict:
        nodes = {}
        for node, pid in self.pids.items():
            st = _status_kb(pid, "RssAnon", "RssShmem")
            nodes[node] = {"anon": st["RssAnon"], "shmem_mapped": st["RssShmem"],
                           **shm_bytes(self.prefixes[node])}
        writer = _status_kb(os.getpid(), "RssAnon", "RssShmem")
        total = sum(x["anon"] + x["shm_files"] for x in nodes.values()) + writer["RssAnon"]
        return {"total": total, "nodes": nodes, "writer_anon": writer["RssAnon"],
                "writer_shmem_mapped": writer["RssShmem"]}

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sample()
            peak = self.peaks.setdefault(self.phase, {"total": 0, "nodes": {}, "writer_anon": 0,
                                                      "writer_shmem_mapped": 0})
            peak["total"] = max(peak["total"], s["total"])
            peak["writer_anon"] = max(peak["writer_anon"], s["writer_anon"])
            peak["writer_shmem_mapped"] = max(peak["writer_shmem_mapped"], s["writer_shmem_mapped"])
            for node, x in s["nodes"].items():
                p = peak["nodes"].setdefault(node, dict.fromkeys(x, 0))
                for key, val in x.items():
                    p[key] = max(p[key], val)
            self._stop.wait(self.interval_s)

    def report(self) -> dict:
        """{phase: peaks in MiB}: total, and per daemon its private and shm bytes."""
        mib = 1 << 20
        return {ph: {"total_mib": round(p["total"] / mib), "writer_anon_mib": round(p["writer_anon"] / mib),
                     "nodes_mib": {n: {k: round(v / mib) for k, v in x.items()} for n, x in p["nodes"].items()}}
                for ph, p in self.peaks.items()}


# -- before a run: will it fit? ---------------------------------------------------------------

# Measured private memory of a cluster daemon (RssAnon peak, bench_cluster, this 2-core VM):
# interpreter, gRPC, ZeroMQ and the erasure library at start (~35 MiB) plus what the
# accumulator route keeps in private memory while a version is in flight: received
# contributions held until their stripe is whole and parity rows waiting to be forwarded
# (each accumulated stripe holds at most one such block at a time when m = 2, at most
# m - 1 otherwise: (m-1)/k x D at worst, 1/k x D when m <= 2) -- plus ZeroMQ's receive
# buffers that malloc keeps for reuse (DAEMON_MALLOC_KEPT, see
# snapshotd.node.peer.malloc).
DAEMON_BASE_PRIVATE = 64 << 20
DAEMON_MALLOC_KEPT = 320 << 20  # trim threshold 256 MiB + top pad 64 MiB (one arena)
WRITER_BASE_PRIVATE = 256 << 20  # this process: interpreter, torch, gRPC clients


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (what the kernel can give without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def shm_free(path: str = "/dev/shm") -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def parity_per_version(nodes: int, parity: int, state_bytes: int, block_bytes: int) -> int:
    """The most parity bytes one node holds for one version (the real layout of
    :mod:`snapshotd.core.placement`, with one block more per rank for its header)."""
    from snapshotd.core.placement import place_group

    if not parity:
        return 0
    blocks = -(-state_bytes // block_bytes) + 1
    layout = place_group(nodes, parity, [blocks] * nodes)
    return max(len(layout.parity_blocks(i)) for i in range(nodes)) * block_bytes


def one_job_budget(nodes: int, parity: int, state_bytes: int, block_bytes: int) -> int:
    """A daemon budget that holds one job and no more: its rank's committed slot and the
    slot of the version being staged, two parity buffers (the committed version's and the
    next one's), and less than one slot to spare (half a state, at most 64 MiB). A third
    slot (the client stages the version after next while the next is still in flight)
    does not fit: that save asks for its slot itself once the next has committed and
    freed one."""
    return 2 * (state_bytes + block_bytes) + 2 * parity_per_version(nodes, parity, state_bytes, block_bytes) \
        + min(64 << 20, state_bytes // 2)


def project_cluster(nodes: int, parity: int, state_bytes: int, block_bytes: int, budget_bytes: int,
                    source_bytes: int | None = None, malloc_kept: int = DAEMON_MALLOC_KEPT) -> dict:
    """The peak memory of bench_cluster's local cluster, by part, in bytes.

    Per daemon, in /dev/shm: its rank's slots (the committed version, the next one being
    staged, and a third for the version after when the budget leaves room: the client
    stages ahead) and two parity buffers (the committed version's and the next one's; a
    released one is pooled for reuse), sized from the real layout
    (:mod:`snapshotd.core.placement`); in private memory: see DAEMON_BASE_PRIVATE. The
    writer (this process) holds one source state for every rank (``source_bytes``)."""
    k = nodes - parity
    par = parity_per_version(nodes, parity, state_bytes, block_bytes)
    slots = 3 if 3 * state_bytes + 2 * par <= budget_bytes else 2
    route = (max(1, parity - 1) * state_bytes // k) if parity else 0
    private = DAEMON_BASE_PRIVATE + route + malloc_kept
    per_node_shm = slots * state_bytes + 2 * par
    writer = WRITER_BASE_PRIVATE + (state_bytes if source_bytes is None else source_bytes)
    return {"slots": slots, "parity_per_version": par, "per_node_shm": per_node_shm,
            "per_node_private": private, "shm": nodes * per_node_shm,
            "writer": writer, "total": nodes * (per_node_shm + private) + writer}
