"""Cluster pipeline and rebuild on loopback: a real local cluster of daemons.

Measures, on one machine (all daemons share its cores):
  * snapshot pipeline per node: every node's rank stages --size-mib of state, the
    daemons exchange parity and vote; time from the first save() to the commit seen
    on every node. Rate per node = state per node / that time. Bytes on the network:
    each daemon's peer-plane counter (``peer_traffic`` in its status: every frame it
    handed to its peer sockets, requests and replies), read before and after each
    version; reported per node and version as a ratio to its state D (issue 16:
    <= (k+m-1)/k with the accumulator route, m before it).
  * memory (bench/memwatch.py): the peak, per phase, of every daemon's private memory
    plus the cluster's /dev/shm plus this writer's private memory, and per daemon.
  * rebuild: a node is lost (SIGKILL, state and shared memory wiped) and restarted
    empty; it rebuilds its data and parity from the others. Rate = bytes rebuilt /
    rebuild time (as measured by the daemon).
Targets (issue 3, this machine): pipeline >= 1 GB/s per node with m = 2, rebuild
>= 2 GB/s. 1 GB = 1e9 bytes.

Before anything starts, the run's peak memory is projected (bench/memwatch.py
``project_cluster``: per daemon two rank slots and two parity buffers in /dev/shm, sized
from the real layout, and its private memory; this writer's state) and a run that would
not fit MemAvailable less --mem-margin-mib, or /dev/shm, is refused (exit 2) with what
it needs, what there is and what to pass instead (--size-mib, --nodes 3 --parity 1,
--source-mib 64). A version that does not commit within --commit-timeout-s fails the run with the
reason, read from every daemon's status: which node has not committed, what its round
still waits for (announces, contributions, votes) and what it has sent that a peer
has not acknowledged yet (issue 18).

    python -m bench.bench_cluster --nodes 4 --parity 2 --size-mib 256 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import torch


def _wait(pred, timeout_s: float, what: str):
    t0 = time.monotonic()
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(what)
        time.sleep(0.005)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through main's finally, which stops the cluster


class NotCommitted(RuntimeError):
    """A version did not commit in time; the message says which node lacks what."""


def why_not_committed(d: str, job: str, v: int) -> str:
    """Each node's view of version ``v`` of ``job`` (from its status): committed, or
    what its round waits for and what its peers have not acknowledged."""
    from snapshotd_tools import localcluster as lc

    lines = []
    for row in lc.collect_status(d):
        node = row.get("node_id", "?")
        if not row.get("alive"):
            lines.append(f"{node}: not answering ({row.get('error', '')})")
            continue
        cl = row.get("cluster") or {}
        j = (cl.get("jobs") or {}).get(job)
        dead = sorted(p for p, x in (cl.get("peers") or {}).items() if not x.get("alive"))
        peers = f"; peers it sees dead: {','.join(dead)}" if dead else ""
        if j is None:
            lines.append(f"{node}: has no round of job {job!r}{peers}")
            continue
        if j.get("committed", 0) >= v:
            lines.append(f"{node}: committed {j['committed']}")
            continue
        w = (j.get("waiting") or {}).get(str(v))
        if not w:
            lines.append(f"{node}: committed {j.get('committed')}, no round for v{v} "
                         f"(its data not delivered here?){peers}")
            continue
        lacks = []
        if not w.get("local_data"):
            lacks.append("its own ranks' data")
        if w.get("announces_missing"):
            lacks.append(f"announces from {','.join(w['announces_missing'])}")
        if w.get("contributions_awaited"):
            frm = ", ".join(f"{n} from {src}" for src, n in sorted((w.get("contributions_awaited_from") or {}).items()))
            lacks.append(f"{w['contributions_awaited']} contributions ({frm})" if frm
                         else f"{w['contributions_awaited']} contributions")
        if w.get("contributions_started") and not w.get("contributions_delivered"):
            lacks.append("acknowledgement of its contributions")
        if w.get("votes_missing"):
            lacks.append(f"votes from {','.join(w['votes_missing'])}")
        unacked = "; ".join(f"its {k} not acknowledged by {','.join(x)}"
                            for k, x in (w.get("unacknowledged") or {}).items())
        resend = ((cl.get("resending") or {}).get(job) or {}).get(str(v))
        fwd = (cl.get("forwarding") or {}).get("waiting") or {}
        if fwd:  # parity rows this accumulator has not delivered yet
            peers += "; forwarding parity rows to " + ", ".join(
                f"{n} ({x['rows']} rows, {x['tries']} failed tries, last: {x['last_error']})" for n, x in sorted(fwd.items()))
        lines.append(f"{node}: committed {j.get('committed')}, v{v} lacks "
                     f"{', '.join(lacks) or 'nothing (commit pending)'}"
                     + (f"; {unacked}" if unacked else "")
                     + (f"; re-sending ({resend['tries']} failed tries, last: {resend['last_error']})"
                        if resend else "") + peers)
    return "\n    ".join(lines)


def wait_committed(d: str, committed, job: str, v: int, timeout_s: float) -> None:
    """Wait until ``committed(job, v)``; raise NotCommitted with the reason if it does not."""
    try:
        _wait(lambda: committed(job, v), timeout_s, "")
    except TimeoutError:
        raise NotCommitted(f"job {job!r} version {v} did not commit within {timeout_s:.0f} s:\n    "
                           + why_not_committed(d, job, v)) from None


def measure_rebuild(d: str, victim: str, budget: str) -> dict:
    """Lose ``victim`` of the local cluster in ``d`` (SIGKILL, state and shared memory
    wiped), start it again empty and wait until it has rebuilt from its peers; the
    figures are the daemon's own (bytes rebuilt, seconds, bytes fetched, phases).
    Also used by the comparison suite (bench/suite.py)."""
    from snapshotd_tools import localcluster as lc
    from snapshotd_client.transport import DaemonClient

    os.kill(lc.node_pid(d, victim), signal.SIGKILL)
    time.sleep(0.2)
    lc.wipe_node(d, victim)
    lc.restart_node(d, victim, budget)
    vc = DaemonClient.for_socket(lc.sockets(d)[victim], timeout_s=30)

    def rebuilt():
        st = json.loads(vc.stats().cluster_json or "{}")
        return st.get("last_rebuild") or None

    try:
        rb = _wait(rebuilt, 300, "rebuild did not finish")
    finally:
        vc.close()
    return {"rebuild_bytes": rb["bytes"], "rebuild_s": rb["seconds"],
            "rebuild_gbps": rb["bytes"] / rb["seconds"] / 1e9,
            "rebuild_fetched_bytes": rb["fetched_bytes"],
            "rebuild_phases_s": rb.get("phases_s", {})}


def change(params, fraction: float) -> None:
    """Rewrite the first ``fraction`` of every tensor in place before a save (1: every
    byte changes, as a full fine-tune's step does; 0.05: a LoRA-style step, 95 % of the
    state frozen); 0 leaves the state as it is."""
    with torch.no_grad():
        for p in params:
            n = int(p.numel() * fraction)
            if n:
                p.view(-1)[:n].add_(1.0)


def measure_one_active(socks: dict, nodes: list, params, repeats: int, committed, d: str | None = None,
                       timeout_s: float = 120, changed_fraction: float = 1.0) -> dict:
    """The pipeline of one node whose work does not share the cores with three others.

    Node 0's rank snapshots the full state; the other ranks snapshot a few bytes (the
    version still needs every rank, and its stripes are padded with virtual zero
    blocks). Node 0 stages, ingests and sends m x its data; the parity holders receive
    and combine it; all vote and commit -- the same path as above, but now the
    machine's cores serve one node's snapshot, roughly as a node with its own cores
    would. Rate = node 0's state / (first save() -> committed on every node)."""
    from snapshotd_client import Snapshotter

    snaps = []
    for r, n in enumerate(nodes):
        model = torch.nn.ParameterList(params if r == 0 else [torch.nn.Parameter(torch.zeros(16))])
        snaps.append(Snapshotter(model, job_id="bench-one", socket_path=socks[n], rank=r,
                                 world_size=len(nodes), local_world_size=1))
    times = []
    try:
        for step in range(1, repeats + 3):
            change(params, changed_fraction)
            t0 = time.perf_counter()
            for s in snaps:
                s.save(step)
            if d is None:
                _wait(lambda: committed("bench-one", step), timeout_s, f"version {step} did not commit")
            else:
                wait_committed(d, committed, "bench-one", step, timeout_s)
            if step > 2:
                times.append(time.perf_counter() - t0)
    finally:
        for s in snaps:
            s.close()
    size = sum(p.numel() * p.element_size() for p in params)
    med = statistics.median(times)
    return {"one_active_pipeline_s": med, "one_active_gbps": size / med / 1e9}


def peer_bytes_sent(d: str) -> dict:
    """{node: bytes its peer plane has sent so far} (the daemons' own counters)."""
    from snapshotd_tools import localcluster as lc

    return {r.get("node_id"): (r.get("cluster") or {}).get("peer_traffic", {}).get("bytes_sent")
            for r in lc.collect_status(d)}


def make_state(size: int, source_bytes: int = 0) -> list:
    """The writer's state: parameters of 64 MiB (fewer, smaller ones below that) making
    ``size`` bytes, every rank saving the same ones. With ``source_bytes`` (less than
    ``size``) they are views of one random tensor of that many bytes, repeated: the
    daemons still get ``size`` bytes per rank to hash, encode and send (their cost does
    not depend on the bytes; none are zero), while this process, which stands in for
    trainers that would each run on a node of their own, holds less memory."""
    n_tensors = max(1, size // (64 << 20))
    numel = size // n_tensors // 4
    if not source_bytes or source_bytes >= size:
        return [torch.nn.Parameter(torch.randn(numel)) for _ in range(n_tensors)]
    base = torch.randn(max(numel, source_bytes // 4))
    span = base.numel() - numel + 1
    return [torch.nn.Parameter(base[(i * numel) % span:(i * numel) % span + numel]) for i in range(n_tensors)]


class WontFit(RuntimeError):
    """The run's projected memory is more than this machine has available now;
    ``figures``: the projection, what was available, and the sizes suggested instead."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def preflight(a, size: int, budget: int) -> dict:
    """Refuse (WontFit, with what is needed, what is available and what to pass instead)
    when the cluster's projected peak (bench/memwatch.py ``project_cluster``) plus
    ``--mem-margin-mib`` exceeds MemAvailable, or its shared memory exceeds the free
    space of /dev/shm: a run the kernel would OOM-kill halfway reports nothing."""
    from snapshotd.wire.config import parse_size

    from bench import memwatch as mw

    bs = parse_size(a.block_size)
    src = min(size, a.source_mib << 20) if a.source_mib else None
    proj = mw.project_cluster(a.nodes, a.parity, size, bs, budget, source_bytes=src)
    avail, shm_free = mw.mem_available(), mw.shm_free()
    margin = a.mem_margin_mib << 20
    proj.update(mem_available=avail, shm_free=shm_free, margin=margin)
    if proj["total"] + margin <= avail and proj["shm"] <= shm_free:
        return proj

    def fits(mib: int, nodes: int, parity: int, source: int | None = src) -> bool:
        pr = mw.project_cluster(nodes, parity, mib << 20, bs, mw.one_job_budget(nodes, parity, mib << 20, bs),
                                source_bytes=min(mib << 20, source) if source else None)
        return pr["total"] + margin <= avail and pr["shm"] <= shm_free

    gib = 1 << 30
    best = next((mib for mib in range(a.size_mib - a.size_mib % 64 or 64, 0, -64) if fits(mib, a.nodes, a.parity)),
                None)
    small = fits(a.size_mib, 3, 1) if (a.nodes, a.parity) != (3, 1) else False
    instead = []
    if (src is None or src > 64 << 20) and size > 64 << 20 and fits(a.size_mib, a.nodes, a.parity, 64 << 20):
        instead.append("--source-mib 64")
    if best:
        instead.append(f"--size-mib {best}")
    if small:
        instead.append("--nodes 3 --parity 1")
    raise WontFit(
        f"{a.nodes} nodes x {a.size_mib} MiB (k={a.nodes - a.parity} m={a.parity}) would need about "
        f"{proj['total'] / gib:.1f} GiB at its peak: per daemon {proj['slots']} rank slots of "
        f"{size / gib:.2f} GiB + 2 parity buffers of {proj['parity_per_version'] / gib:.2f} GiB in /dev/shm "
        f"({proj['per_node_shm'] / gib:.1f} GiB) and ~{proj['per_node_private'] / gib:.1f} GiB private; "
        f"this writer {proj['writer'] / gib:.1f} GiB. Available now: {avail / gib:.1f} GiB (MemAvailable; "
        f"{margin / gib:.1f} GiB kept free by --mem-margin-mib), /dev/shm {shm_free / gib:.1f} GiB free "
        f"(the cluster's segments need {proj['shm'] / gib:.1f}). "
        + (f"Pass {' or '.join(instead)} instead" if instead else "Nothing smaller fits either")
        + ", wait until memory is free, or --skip-memory-check to run anyway.",
        {**proj, "instead_size_mib": best, "instead_3_nodes_m1": small,
         "instead_source_mib_64": "--source-mib 64" in instead})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--parity", type=int, default=2)
    p.add_argument("--size-mib", type=int, default=256, help="state per node (default 256)")
    p.add_argument("--block-size", default="4MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--phases", default="pipeline,one_active,rebuild",
                   help="what to measure, comma-separated (default all three; 'pipeline' alone "
                        "needs the least memory: no second job, no rebuild)")
    p.add_argument("--commit-timeout-s", type=float, default=120,
                   help="a version not committed by then fails the run, with the reason (default 120)")
    p.add_argument("--budget-mib", type=int, default=0,
                   help="each daemon's memory budget (default: what one job needs -- the committed "
                        "and the next version's data and parity, (2 + 2m/k) x state, plus at most 64 MiB -- so "
                        "the store reuses freed slots instead of growing, and no third slot is staged "
                        "ahead; bench/memwatch.py one_job_budget)")
    p.add_argument("--source-mib", type=int, default=0,
                   help="hold only this many MiB of distinct state in this process, the parameters "
                        "being views of it repeated (default 0: the whole state, distinct bytes); the "
                        "daemons' work is the same, this writer's memory smaller (at least 64)")
    p.add_argument("--mem-margin-mib", type=int, default=1024,
                   help="memory to leave free for the rest of the machine: the run is refused, with "
                        "the reason, when its projected peak plus this exceeds MemAvailable (default 1024)")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="run even when the projected peak does not fit the memory available now")
    p.add_argument("--changed-fraction", type=float, default=1.0,
                   help="the fraction of each tensor rewritten before every save (default 1: every byte "
                        "changes; 0.05: a LoRA-style fine-tune, where delta parity sends only the change)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.nodes, a.parity, a.size_mib, a.block_size, a.repeats = 3, 1, 4, "256KiB", 2
    from snapshotd_tools import localcluster as lc
    from snapshotd_client import Snapshotter
    from snapshotd_client.transport import DaemonClient

    from bench.memwatch import MemWatch

    from snapshotd.wire.config import parse_size

    from bench import memwatch as mw

    size = a.size_mib << 20
    need = mw.one_job_budget(a.nodes, a.parity, size, parse_size(a.block_size))
    budget = str(a.budget_mib << 20 if a.budget_mib else need)  # one job at a time (the first is dropped)
    try:
        proj = preflight(a, size, int(budget)) if not a.skip_memory_check else None
    except WontFit as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"nodes": a.nodes, "parity": a.parity, "state_bytes_per_node": size,
                           "refused": str(exc), "projected_memory": exc.figures}, f, indent=2)
        return 2
    d = tempfile.mkdtemp(prefix="bench-cluster-")
    # A SIGTERM (a timeout, ^C from a wrapper) must still take the cluster down: its
    # daemons hold (2 + 2m/k) x the state in /dev/shm each. The daemons are also tied to
    # this process, so a SIGKILL stops them too (their segments then stay; `snapshotd
    # cluster down --dir DIR` or a reboot frees them).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    lc.up(d, a.nodes, a.parity, a.block_size, budget, tie_to_parent=True)
    socks = lc.sockets(d)
    nodes = sorted(socks)
    res: dict = {"nodes": a.nodes, "parity": a.parity, "k": a.nodes - a.parity,
                 "state_bytes_per_node": size, "block_size": a.block_size,
                 "writer_source_bytes": min(size, a.source_mib << 20) if a.source_mib else size,
                 "changed_fraction": a.changed_fraction}
    res["committed_versions"] = 0
    res["projected_memory"] = proj
    with open(os.path.join(d, "cluster.json")) as f:
        pids = {n: v["pid"] for n, v in json.load(f)["nodes"].items()}
    mem = MemWatch(pids, {n: lc.shm_prefix(d, n) for n in pids}).start()
    mem.phase = "setup"
    try:
        # One process plays every node's rank; each stores the same-sized state.
        params = make_state(size, a.source_mib << 20)
        snaps = []
        for r, n in enumerate(nodes):
            model = torch.nn.ParameterList(params)
            snaps.append(Snapshotter(model, job_id="bench", socket_path=socks[n], rank=r,
                                     world_size=len(nodes), local_world_size=1))
        clients = [DaemonClient.for_socket(socks[n], timeout_s=30) for n in nodes]

        def committed_everywhere_job(job, v):
            return all(c.list_versions(job).latest_committed_version >= v for c in clients)

        def committed_everywhere(v):
            return committed_everywhere_job("bench", v)

        import psutil

        with open(os.path.join(d, "cluster.json")) as f:
            procs = [psutil.Process(v["pid"]) for v in json.load(f)["nodes"].values()]

        def daemon_cpu() -> float:
            return sum(sum(pr.cpu_times()[:2]) for pr in procs)

        times, blocking, cpu, sent_ratio = [], [], [], []
        for step in range(1, a.repeats + 3):
            mem.phase = "versions 1-2" if step <= 2 else "versions 3+"
            change(params, a.changed_fraction)
            b0 = peer_bytes_sent(d)
            c0 = daemon_cpu()
            t0 = time.perf_counter()
            for s in snaps:
                s.save(step)
                blocking.append(s.last_blocking_s)
            wait_committed(d, committed_everywhere_job, "bench", step, a.commit_timeout_s)
            dt = time.perf_counter() - t0
            res["committed_versions"] = step
            b1 = peer_bytes_sent(d)
            ratios = {n: round((b1[n] - b0[n]) / size, 3) for n in b1 if b1.get(n) is not None and b0.get(n) is not None}
            sent_ratio.append(ratios)
            print(f"  version {step} committed on every node in {dt * 1e3:.0f} ms; peer bytes sent / D per node "
                  f"{ratios}", file=sys.stderr, flush=True)
            if step > 2:  # first two allocate and touch the segments
                times.append(dt)
                cpu.append(daemon_cpu() - c0)
        for s in snaps:
            s.close()
        med = statistics.median(times)
        res.update({
            "pipeline_s": med, "pipeline_gbps_per_node": size / med / 1e9,
            "bytes_sent_per_node": statistics.median(
                statistics.mean(r.values()) for r in sent_ratio[2:]) * size if sent_ratio[2:] and all(sent_ratio[2:]) else None,
            "bytes_sent_over_d_per_version": sent_ratio,
            "save_blocking_ms_median": statistics.median(blocking) * 1e3,
            "daemon_cpu_s_per_node": statistics.median(cpu) / a.nodes,
        })
        res["gbps_per_node_per_core"] = size / res["daemon_cpu_s_per_node"] / 1e9
        status = lc.collect_status(d)
        acc = [r["cluster"].get("accumulate", {}) for r in status]
        res["accumulate_gbps"] = [round(a["bytes"] / a["cpu_seconds"] / 1e9, 2) if a.get("cpu_seconds") else None
                                  for a in acc]
        par = [sum(r["cluster"].get("parity_bytes", {}).values()) for r in status]
        res["parity_bytes_per_node"] = par
        fw = [r["cluster"].get("forwarding", {}) for r in status]  # private memory of the route
        res["held_contributions_peak_mib"] = [round(f.get("held_peak_bytes", 0) / 2**20) for f in fw]
        res["forward_rows_waiting_peak_mib"] = [round(f.get("waiting_peak_bytes", 0) / 2**20) for f in fw]
        phases = set(a.phases.split(","))
        if phases & {"one_active", "rebuild"}:  # one job at a time: the budget holds one
            for c in clients:
                c.drop_job("bench")
        if "one_active" in phases:
            mem.phase = "one_active"
            res.update(measure_one_active(socks, nodes, params, a.repeats, committed_everywhere_job, d,
                                          a.commit_timeout_s, changed_fraction=a.changed_fraction))
        if "rebuild" in phases:  # lose the last node and bring it back empty
            mem.phase = "rebuild"
            res.update(measure_rebuild(d, nodes[-1], budget))
    except NotCommitted as exc:
        mem.stop()
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"  memory peaks (MiB) {json.dumps(mem.report())}", file=sys.stderr)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({**res, "failed": str(exc), "memory_peaks": mem.report()}, f, indent=2)
        return 1
    finally:
        mem.stop()
        lc.down(d)
        shutil.rmtree(d, ignore_errors=True)
    res["memory_peaks"] = mem.report()
    k = a.nodes - a.parity
    from bench.floor import describe as floor_describe, snapshot_floor

    # The least work the daemons could have done (issue 16): measured after the cluster is
    # down, so it does not share the cores with it; same kernels, same machine, same run.
    res["floor"] = snapshot_floor(size, k, a.parity, parse_size(a.block_size),
                                  sample_bytes=min(size, 64 * 2**20))
    print(f"{a.nodes} nodes, k={k} m={a.parity}, {a.size_mib} MiB of state per node, "
          f"blocks {a.block_size}, median of {a.repeats} (all daemons share this machine's "
          f"{os.cpu_count()} cores); {res['committed_versions']} of {a.repeats + 2} versions committed")
    print(f"  snapshot pipeline  {res['pipeline_s'] * 1e3:8.1f} ms  {res['pipeline_gbps_per_node']:6.2f} GB/s per node"
          f" (target >= 1)")
    if res["bytes_sent_per_node"] is not None:
        print(f"  peer bytes sent    {res['bytes_sent_per_node'] / 2**20:8.1f} MiB per node per version = "
              f"{res['bytes_sent_per_node'] / size:.3f} x D (median over versions 3+ of the mean over nodes; "
              f"m = {a.parity}, (k+m-1)/k = {(k + a.parity - 1) / k:.3f})")
    if "one_active_gbps" in res:
        print(f"  one node active    {res['one_active_pipeline_s'] * 1e3:8.1f} ms  {res['one_active_gbps']:6.2f} GB/s"
              f" (only node 0 snapshots {a.size_mib} MiB; the others a few bytes)")
    print(f"  daemon CPU         {res['daemon_cpu_s_per_node'] * 1e3:8.1f} ms per node per snapshot"
          f" = {res['gbps_per_node_per_core']:.2f} GB/s per node if each node had one core")
    if res.get("floor"):
        fl = res["floor"]
        print(f"  minimum work       {fl['total_s'] * 1e3:8.1f} ms per node per snapshot with this machine's "
              f"kernels: daemon CPU / minimum = {res['daemon_cpu_s_per_node'] / fl['total_s']:.2f} "
              f"({res['daemon_cpu_s_per_node'] / (size / 1e9):.3f} vs {fl['core_s_per_gb']:.3f} core-s per GB; "
              f"bench/floor.py: {floor_describe(fl)})")
    print(f"  save() blocking    {res['save_blocking_ms_median']:8.1f} ms per rank")
    print(f"  parity held        {[round(x / 2**20, 1) for x in res['parity_bytes_per_node']]} MiB "
          f"(ideal m/k x data = {a.parity / k * a.size_mib:.0f} MiB)")
    if "rebuild_gbps" in res:
        print(f"  rebuild of 1 node  {res['rebuild_s'] * 1e3:8.1f} ms  {res['rebuild_gbps']:6.2f} GB/s "
              f"(target >= 2); fetched {res['rebuild_fetched_bytes'] / 2**20:.0f} MiB for "
              f"{res['rebuild_bytes'] / 2**20:.0f} MiB rebuilt")
        print(f"  rebuild phases     {res.get('rebuild_phases_s')}")
    print(f"  parity accumulate  {res.get('accumulate_gbps')} GB/s of contributions per CPU-second, per node")
    print(f"  route memory       held contributions peak {res['held_contributions_peak_mib']} MiB, "
          f"forwarded rows waiting peak {res['forward_rows_waiting_peak_mib']} MiB, per node")
    for ph, pk in res["memory_peaks"].items():
        print(f"  memory peak {ph:<14} total {pk['total_mib']} MiB (daemons' private + cluster /dev/shm + "
              f"writer's private {pk['writer_anon_mib']}); per daemon {pk['nodes_mib']}")
    peak = max(pk["total_mib"] for pk in res["memory_peaks"].values())
    res["memory_peak_mib"] = peak
    proj = res.get("projected_memory")
    bytes_d = res["bytes_sent_per_node"] / size if res["bytes_sent_per_node"] is not None else float("nan")
    print(f"  summary: {res['committed_versions']} of {a.repeats + 2} versions committed; pipeline "
          f"{res['pipeline_gbps_per_node']:.2f} GB/s per node; peer bytes sent {bytes_d:.3f} x D per node; "
          f"memory peak {peak / 1024:.2f} GiB"
          + (f" (projected {proj['total'] / 2**30:.2f} GiB)" if proj else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
