"""Snapshot contenders on the same model state, and what each leaves behind to restore.

For one state size S (parameters + AdamW moments, ``common.build_state``) it measures,
after warm-up, median of ``repeats``:

  blocked  - how long the training loop is held by the call;
  safe     - time from the call until the snapshot survives what it is meant to survive:
               snapshotd m=0        the daemon holds and committed it (survives a trainer
                                    crash, not the loss of the node);
               snapshotd m=1, m=2   committed on every node of a local cluster, i.e. data
                                    and parity held (survives a crash and the loss of any
                                    m nodes);
               torch.save /dev/shm  written (survives a trainer crash, not the node);
               torch.save disk      written and fsync'ed;
               DCP save / async     the checkpoint is written and fsync'ed (DCP's
                                    FileSystemWriter syncs its files); for async_save,
                                    until its future resolves.

Cluster contenders split S over n ranks (one per node, k = 2, n = k + m), all played by
this one process, as a real job would split its state over its ranks; their "blocked" is
the sum over the ranks (one copy of the whole S, the same work the single-process
contenders do), and every daemon shares this machine's cores. The daemon's memory
(peak RSS, private heap, /dev/shm holdings) is sampled after each commit.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
import warnings

import torch

from bench import common as cm

JOB = "bench"


def _row(name: str, blocked: list[float], safe: list[float], **extra) -> dict:
    r = {"contender": name, "blocked_s": cm.med(blocked), "safe_s": cm.med(safe),
         "blocked_all_s": blocked, "safe_all_s": safe}
    r.update(extra)
    return r


def torch_save(sd: dict, path: str, repeats: int, warmup: int, sync: bool) -> dict:
    """torch.save to ``path`` (a fresh file each time, as a periodic save would write).
    With ``sync`` the file is fsync'ed: blocked = safe = write + fsync."""
    blocked, safe, write, fsync_ = [], [], [], []
    for i in range(warmup + repeats):
        if os.path.exists(path):
            os.unlink(path)
        t0 = time.perf_counter()
        torch.save(sd, path)
        t1 = time.perf_counter()
        if sync:
            cm.fsync_path(path)
        t2 = time.perf_counter()
        if i >= warmup:
            blocked.append(t2 - t0)
            safe.append(t2 - t0)
            write.append(t1 - t0)
            fsync_.append(t2 - t1)
    name = "torch.save disk (fsync)" if sync else "torch.save /dev/shm"
    return _row(name, blocked, safe, write_s=cm.med(write), fsync_s=cm.med(fsync_),
                path=path, file_bytes=cm.path_bytes(path))


def _dcp_sd(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def dcp_save(model, opt, root: str, repeats: int, warmup: int, use_async: bool) -> dict:
    """torch.distributed.checkpoint, single process, FileSystemWriter (fsyncs its files)."""
    import torch.distributed.checkpoint as dcp

    blocked, safe = [], []
    path = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        for i in range(warmup + repeats):
            if path:
                shutil.rmtree(path, ignore_errors=True)
            path = os.path.join(root, f"dcp-{'async' if use_async else 'sync'}-{i}")
            t0 = time.perf_counter()
            sd = _dcp_sd(model, opt)
            if use_async:
                fut = dcp.async_save(sd, checkpoint_id=path)
                t1 = time.perf_counter()
                fut.result()
            else:
                dcp.save(sd, checkpoint_id=path)
                t1 = time.perf_counter()
            t2 = time.perf_counter()
            del sd
            if i >= warmup:
                blocked.append(t1 - t0)
                safe.append(t2 - t0)
    return _row("DCP async_save disk" if use_async else "DCP save disk", blocked, safe,
                path=path, file_bytes=cm.path_bytes(path))


class SingleDaemon:
    """A ``snapshotd serve`` process of its own (node id, state dir, socket)."""

    def __init__(self, workdir: str, budget_bytes: int):
        from snapshotd_tools.demo.single_node import start_daemon

        self.node = "bench" + uuid.uuid4().hex[:6]
        self.proc, self.socket = start_daemon(workdir, self.node, budget=str(budget_bytes))
        self.prefix = f"snapshotd.{self.node}."

    def memory(self) -> dict:
        m = cm.proc_memory(self.proc.pid)
        m["shm_bytes"] = cm.shm_bytes(self.prefix)
        return m

    def stop(self) -> None:
        from snapshotd.wire import shm

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)
        for name in shm.list_segments(self.prefix):
            shm.unlink(name)


def _peak(samples: list[dict]) -> dict:
    return {k: max(s.get(k, 0) for s in samples) for k in samples[0]} if samples else {}


def snapshotd_single(model, opt, daemon: SingleDaemon, repeats: int, warmup: int,
                     copy_dst: list[torch.Tensor] | None = None) -> dict:
    """``copy_dst``: touched buffers shaped like ``common.state_tensors``; one warm copy
    into them is timed right before every save (as bench_ingest does), so the blocking
    time is compared with a copy made under the same machine load."""
    from snapshotd_client import Snapshotter

    snap = Snapshotter(model, opt, job_id=JOB, socket_path=daemon.socket, rank=0, world_size=1)
    blocked, safe, mem, copies = [], [], [], []
    src = cm.state_tensors(model, opt) if copy_dst else []
    try:
        for i in range(warmup + repeats):
            if copy_dst:
                tc = time.perf_counter()
                for d_, t in zip(copy_dst, src):
                    d_.copy_(t)
                copies.append(time.perf_counter() - tc)
            t0 = time.perf_counter()
            fut = snap.save(i + 1)
            t1 = time.perf_counter()
            if fut is None:
                raise RuntimeError("snapshotd skipped a snapshot (daemon unavailable?)")
            st = fut.result()
            t2 = time.perf_counter()
            if not st.committed:
                raise RuntimeError(f"snapshot {i + 1} did not commit")
            mem.append(daemon.memory())
            if i >= warmup:
                blocked.append(t1 - t0)
                safe.append(t2 - t0)
        stats = snap.client.stats()
    finally:
        snap.close()
    extra = {}
    if copies:
        extra = {"paired_warm_copy_s": cm.med(copies[warmup:]),
                 "blocked_over_copy": cm.med(blocked) / cm.med(copies[warmup:])}
    return _row("snapshotd m=0", blocked, safe, m=0, k=1, nodes=1, version=warmup + repeats,
                memory=_peak(mem), memory_last=mem[-1] if mem else {},
                committed_bytes=int(stats.bytes_committed), **extra)


def _cluster_up(n: int, m: int, block_size: str, budget: str, attempts: int = 2) -> str:
    """``localcluster.up`` in a fresh folder; one retry (a free port picked for the spec
    can be taken by another process before the daemon binds it on a busy machine)."""
    from snapshotd_tools import localcluster as lc

    for attempt in range(attempts):
        d = tempfile.mkdtemp(prefix="bench-suite-cluster-")
        try:
            lc.up(d, n, m, block_size, budget)
            return d
        except Exception as exc:  # keep the daemons' own words before the folder goes
            logs = []
            for i in range(n):
                try:
                    with open(os.path.join(d, f"n{i}.log")) as f:
                        logs.append(f"n{i}: " + f.read()[-600:])
                except OSError:
                    pass
            if os.path.exists(os.path.join(d, "cluster.json")):
                lc.down(d)
            shutil.rmtree(d, ignore_errors=True)
            msg = f"local cluster did not start: {exc}; " + " | ".join(logs)
            if attempt + 1 == attempts:
                raise RuntimeError(msg) from exc
            cm.say(f"{msg}; trying once more")
    raise AssertionError("unreachable")


def snapshotd_cluster(state_bytes: int, m: int, repeats: int, warmup: int,
                      tensor_bytes: int, block_size: str, k: int = 2, rebuild: bool = False) -> dict:
    """A local cluster of n = k + m daemons; S split over n ranks (one per node).

    ``rebuild``: afterwards, lose the last node (SIGKILL, state and shared memory wiped)
    and start it empty; it rebuilds its data and parity from its peers
    (``bench_cluster.measure_rebuild``, the daemon's own figures)."""
    import json as _json

    from snapshotd_tools import localcluster as lc
    from snapshotd_client import Snapshotter
    from snapshotd_client.transport import DaemonClient

    n = k + m
    parts = cm.split_state(state_bytes, n, tensor_bytes)
    per_node = state_bytes // n
    budget = str(6 * per_node + (256 << 20))
    d = _cluster_up(n, m, block_size, budget)
    snaps, clients = [], []
    try:
        socks = lc.sockets(d)
        nodes = sorted(socks)
        with open(os.path.join(d, "cluster.json")) as f:
            pids = {nd: v["pid"] for nd, v in _json.load(f)["nodes"].items()}
        for r, nd in enumerate(nodes):
            model, opt = parts[r]
            snaps.append(Snapshotter(model, opt, job_id=JOB, socket_path=socks[nd], rank=r,
                                     world_size=n, local_world_size=1))
        clients = [DaemonClient.for_socket(socks[nd], timeout_s=30) for nd in nodes]

        def committed(v: int) -> bool:
            return all(c.list_versions(JOB).latest_committed_version >= v for c in clients)

        def memory() -> dict:
            per = {nd: cm.proc_memory(pids[nd]) for nd in nodes}
            for nd in nodes:
                per[nd]["shm_bytes"] = cm.shm_bytes(lc.shm_prefix(d, nd))
            tot = {key: sum(p[key] for p in per.values()) for key in per[nodes[0]]}
            return {"total": tot, "per_node": per}

        blocked, safe, mem = [], [], []
        for i in range(warmup + repeats):
            v = i + 1
            t0 = time.perf_counter()
            b = 0.0
            for s in snaps:
                tb = time.perf_counter()
                if s.save(v) is None:
                    raise RuntimeError("snapshotd skipped a snapshot (daemon unavailable?)")
                b += time.perf_counter() - tb
            deadline = time.monotonic() + 300
            while not committed(v):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"version {v} did not commit on every node; logs in {d}")
                time.sleep(0.002)
            t2 = time.perf_counter()
            mem.append(memory())
            if i >= warmup:
                blocked.append(b)
                safe.append(t2 - t0)
        status = lc.collect_status(d)
        parity = sum(sum(r.get("cluster", {}).get("parity_bytes", {}).values()) for r in status)
        committed = sum(int(r.get("bytes_committed", 0)) for r in status)
        peak = {key: max(s["total"][key] for s in mem) for key in mem[0]["total"]}
        row = _row(f"snapshotd m={m}", blocked, safe, m=m, k=k, nodes=n, block_size=block_size,
                   state_bytes_per_node=per_node, parity_bytes_held=parity, committed_bytes=committed,
                   memory=peak, memory_last=mem[-1]["total"],
                   memory_per_node_last=mem[-1]["per_node"])
        if rebuild:
            from bench.bench_cluster import measure_rebuild

            for s in snaps:
                s.close()
            snaps = []
            row["rebuild"] = measure_rebuild(d, nodes[-1], budget)
        return row
    finally:
        for s in snaps:
            try:
                s.close()
            except Exception:
                pass
        for c in clients:
            c.close()
        lc.down(d)
        shutil.rmtree(d, ignore_errors=True)
        del parts
