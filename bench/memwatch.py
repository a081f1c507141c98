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
