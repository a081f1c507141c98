"""DCP on snapshotd against DCP on disk, side by side in one run (issue 14).

1. **async_save**: 4 gloo ranks save a DTensor state (Shard(0) of ``--size-mib`` in all,
   float32, in tensors of ``--tensor-mib``) with ``dcp.async_save`` (THREAD executor), 3
   times each, alternating:
   - ``fs``: ``FileSystemWriter`` (sync_files: fsync) to a directory on disk, DCP's
     DefaultStager (a copy into private memory);
   - ``snapshotd m=0``: ``SnapshotdWriter`` (its own stager: the copy goes straight into
     the daemon's shared memory) on ONE daemon holding the 4 ranks;
   - ``snapshotd m=2``: ``SnapshotdWriter``, rank i on node i of a 4-node local cluster
     with 2 parity nodes (the save is safe once the version commits).
   "blocking" is how long ``async_save`` held the trainer (the staging copy); "safe" is
   until its future returned (FS: files and metadata fsynced; ours: the version
   committed). The slowest rank's time counts.
2. **Reshard restore**: a 2-rank save of the same state, loaded by ``dcp.load`` at 1 and at 4
   ranks (Shard(0) DTensors of the new world), from RAM (``SnapshotdReader`` on the m=0
   daemon) and from disk (``FileSystemReader``, the files' pages dropped first). Every load
   checks every element it got.

Memory: the run refuses to start when MemAvailable is below its projected peak
(``projected_peak_bytes``: about 8x the state plus 3 GiB for the whole run at 1 GiB) plus
4 GiB; the m=2 cluster is taken down before the reshard part.

Each process warms up with one untimed save (or load) first. Medians of 3 (one timed
operation per set of rank processes, the kinds alternating). ``python -m bench.bench_dcp [--size-mib 256] [--json out.json]``; ``--quick``
for tiny sizes (the smoke test). Times in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="state size, all ranks together")
    p.add_argument("--tensor-mib", type=int, default=16, help="size of one global tensor")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--disk-dir", default=None, help="where FileSystemWriter writes (default: a "
                   "temporary directory beside the repository, on disk)")
    p.add_argument("--part", choices=["all", "save", "load"], default="all",
                   help="run only the async_save part or only the reshard restore part")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a smoke test)")
    p.add_argument("--no-mem-check", action="store_true", help="run even if MemAvailable is below "
                   "the projected peak plus a 4 GiB margin")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.size_mib, a.tensor_mib, a.repeats = 4, 1, 1
    return a


# -- the state: deterministic, checkable without holding the global tensors ----------------------
def pattern(start: int, n: int) -> torch.Tensor:
    """Elements [start, start+n) of every global tensor (float32, exact in float32)."""
    i = torch.arange(start, start + n, dtype=torch.int64)
    return ((i * 2654435761) % 16777213).to(torch.float32)


def shapes(size_mib: int, tensor_mib: int) -> list[tuple[int, int]]:
    rows = tensor_mib * MiB // 4 // 256
    return [(rows, 256)] * max(1, size_mib // tensor_mib)


def make_state(mesh, size_mib: int, tensor_mib: int, fill: bool = True) -> dict:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sd = {}
    for k, (r, c) in enumerate(shapes(size_mib, tensor_mib)):
        shape, off = compute_local_shape_and_global_offset((r, c), mesh, [Shard(0)])
        if fill:
            local = pattern(off[0] * c, shape[0] * c).view(shape[0], c)
        else:
            local = torch.zeros(shape[0], c)
        sd[f"t{k}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(r, c),
                                         stride=(c, 1))
    return sd


def check_state(sd: dict) -> None:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for k, t in sd.items():
        shape, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        c = t.shape[1]
        want = pattern(off[0] * c, shape[0] * c).view(shape[0], c)
        if not torch.equal(t.to_local(), want):
            raise AssertionError(f"{k}: loaded values differ from the saved ones")


# -- one rank ---------------------------------------------------------------------------------------
def _writer(cfg: dict, rank: int):
    import torch.distributed.checkpoint as dcp

    if cfg["kind"] == "fs":
        return dcp.FileSystemWriter(cfg["dir"], sync_files=True)
    from snapshotd_client.dcp import SnapshotdWriter

    socks = cfg["sockets"]
    return SnapshotdWriter(job_id=cfg["job"], socket_path=socks[rank % len(socks)],
                           local_world_size=cfg["local_world_size"], commit_timeout_s=600)


def _reader(cfg: dict):
    import torch.distributed.checkpoint as dcp

    if cfg["kind"] == "fs":
        return dcp.FileSystemReader(cfg["dir"])
    from snapshotd_client.dcp import SnapshotdReader

    return SnapshotdReader(job_id=cfg["job"], socket_path=cfg["sockets"][0])


def worker(cfg: dict) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import init_device_mesh

    rank, world = cfg["rank"], cfg["world"]
    dist.init_process_group("gloo", init_method=f"file://{cfg['init']}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    out = {"blocking": [], "safe": [], "load": []}

    def slowest(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    try:
        if cfg["op"] == "save":
            sd = make_state(mesh, cfg["size_mib"], cfg["tensor_mib"])
            for rep in range(cfg["repeats"] + 1):  # the first one warms up (connections, pools)
                if cfg["kind"] == "fs" and rank == 0:
                    shutil.rmtree(cfg["dir"], ignore_errors=True)
                dist.barrier()
                w = _writer(cfg, rank)
                t0 = time.perf_counter()
                fut = dcp.async_save(sd, storage_writer=w)
                t1 = time.perf_counter()
                fut.result()
                t2 = time.perf_counter()
                blocking, safe = slowest(t1 - t0), slowest(t2 - t0)
                if rep:
                    out["blocking"].append(blocking)
                    out["safe"].append(safe)
                if cfg["kind"] != "fs":
                    w.close()
        else:
            sd = make_state(mesh, cfg["size_mib"], cfg["tensor_mib"], fill=False)
            for rep in range(cfg["repeats"] + 1):  # the first one warms up
                if cfg["kind"] == "fs" and rank == 0:
                    from bench.common import drop_page_cache

                    drop_page_cache(cfg["dir"])
                dist.barrier()
                for t in sd.values():
                    t.to_local().zero_()
                t0 = time.perf_counter()
                dcp.load(sd, storage_reader=_reader(cfg))
                took = slowest(time.perf_counter() - t0)
                check_state(sd)
                if rep:
                    out["load"].append(took)
        if rank == 0:
            with open(cfg["out"], "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def run_ranks(cfg: dict, world: int, tmp: str) -> dict:
    init = tempfile.mktemp(prefix="pg-", dir=tmp)
    res = os.path.join(tmp, f"res-{os.path.basename(init)}.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    procs = []
    for r in range(world):
        c = dict(cfg, rank=r, world=world, init=init, out=res)
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.bench_dcp", "--worker", json.dumps(c)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=1800)[0].decode(errors="replace") for p in procs]
    for r, (p, o) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {r} of {cfg['op']} {cfg['kind']} at {world} failed:\n{o[-3000:]}")
    with open(res) as f:
        return json.load(f)


# -- daemons ----------------------------------------------------------------------------------------
def start_daemon(d: str, node: str = f"solo{os.getpid()}") -> tuple[subprocess.Popen, str]:
    sock, ready = os.path.join(d, f"{node}.sock"), os.path.join(d, f"{node}.ready")
    proc = subprocess.Popen([sys.executable, "-m", "snapshotd.node", "serve", "--node-id", node,
                             "--state-dir", os.path.join(d, node), "--socket", sock,
                             "--memory-budget-bytes", "6GiB", "--ready-file", ready,
                             "--log-level", "WARNING"], cwd=REPO,
                            stdout=open(os.path.join(d, f"{node}.log"), "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon {node} did not start (see {d}/{node}.log)")
        time.sleep(0.05)
    return proc, sock


def stop_daemon(proc: subprocess.Popen, node: str) -> None:
    """Stop the daemon and free its shared memory (a stopped daemon keeps its segments)."""
    from snapshotd.wire import shm

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for name in shm.list_segments(f"snapshotd.{node}."):
        shm.unlink(name)


GiB = 1 << 30
MARGIN = 4 * GiB  # left for everything else on the machine


def projected_peak_bytes(size_mib: int, part: str) -> int:
    """What this bench adds to the machine's memory at its peak, from a 1 GiB run
    (shared memory, then processes): async_save holds the solo daemon's m=0 job (two
    versions, 2x the state) and the m=2 cluster's data and parity (two versions, 4x);
    the reshard part the m=0 job and the 2-rank job (2x each); plus the rank processes
    (torch, the state, DCP's staging copy: 2x) and the daemons, about 3 GiB."""
    state = size_mib * MiB
    return (6 if part != "load" else 4) * state + 2 * state + 3 * GiB


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def check_memory(size_mib: int, part: str, available: int | None = None) -> None:
    """Refuse (SystemExit with the figures) when MemAvailable is below the projected
    peak plus MARGIN: a run that pushes the machine into the OOM killer measures nothing."""
    need = projected_peak_bytes(size_mib, part)
    have = mem_available_bytes() if available is None else available
    if have < need + MARGIN:
        raise SystemExit(f"bench_dcp: refusing to run --size-mib {size_mib} --part {part}: projected "
                         f"peak {need / GiB:.1f} GiB + {MARGIN / GiB:.0f} GiB margin > MemAvailable "
                         f"{have / GiB:.1f} GiB (try later, a smaller --size-mib, or --no-mem-check)")


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return {}
    from bench.common import machine, say
    from snapshotd_tools import localcluster

    if not a.no_mem_check:
        check_memory(a.size_mib, a.part)
    tmp = tempfile.mkdtemp(prefix="bench-dcp-")
    disk = a.disk_dir or tempfile.mkdtemp(prefix="bench-dcp-disk-", dir=os.path.dirname(REPO))
    node = f"solo{os.getpid()}"
    solo_proc, solo = start_daemon(tmp, node)
    cdir = os.path.join(tmp, "cluster")
    base = {"size_mib": a.size_mib, "tensor_mib": a.tensor_mib, "repeats": 1}
    res = {"size_mib": a.size_mib, "repeats": a.repeats, "machine": machine(),
           "loadavg_start": os.getloadavg()[0], "mem_available_start_gib": mem_available_bytes() / GiB,
           "projected_peak_gib": projected_peak_bytes(a.size_mib, a.part) / GiB, "save": {}, "load": {}}
    try:
        csocks = []
        if a.part != "load":
            info = localcluster.up(cdir, nodes=4, parity=2, budget="4GiB")
            csocks = [info["nodes"][f"n{i}"]["socket"] for i in range(4)]
        kinds = {"fs": {"kind": "fs", "dir": os.path.join(disk, "save4")},
                 "snapshotd m=0": {"kind": "snap", "sockets": [solo], "local_world_size": 4,
                                   "job": "bench-dcp-m0"},
                 "snapshotd m=2": {"kind": "snap", "sockets": csocks, "local_world_size": 1,
                                   "job": "bench-dcp-m2"}}
        got = {k: {"blocking": [], "safe": []} for k in kinds}
        for rep in range(a.repeats if a.part != "load" else 0):  # alternating: load changes hit all
            for k, cfg in kinds.items():
                r = run_ranks({**base, **cfg, "op": "save"}, 4, tmp)
                got[k]["blocking"] += r["blocking"]
                got[k]["safe"] += r["safe"]
                say(f"save {k} rep {rep}: blocking {r['blocking'][0]:.3f} s, safe {r['safe'][0]:.3f} s")
        for k, v in got.items() if a.part != "load" else ():
            res["save"][k] = {"blocking_s": med(v["blocking"]), "safe_s": med(v["safe"]), "runs": v}
        if os.path.exists(os.path.join(cdir, "cluster.json")):
            localcluster.down(cdir)  # the reshard part needs only the solo daemon: free the memory
        # reshard restore: saved at 2 ranks, loaded at 1 and 4
        two = {"fs": {"kind": "fs", "dir": os.path.join(disk, "save2")},
               "snapshotd (RAM)": {"kind": "snap", "sockets": [solo], "local_world_size": 2,
                                   "job": "bench-dcp-r2"}}
        for k, cfg in two.items() if a.part != "save" else ():
            run_ranks({**base, **cfg, "op": "save"}, 2, tmp)
        for world in (1, 4) if a.part != "save" else ():
            lg = {k: [] for k in two}
            for rep in range(a.repeats):
                for k, cfg in two.items():
                    r = run_ranks({**base, **cfg, "op": "load"}, world, tmp)
                    lg[k] += r["load"]
                    say(f"load 2->{world} {k} rep {rep}: {r['load'][0]:.3f} s")
            res["load"][f"2->{world}"] = {k: {"load_s": med(v), "runs": v} for k, v in lg.items()}
    finally:
        stop_daemon(solo_proc, node)
        if os.path.exists(os.path.join(cdir, "cluster.json")):
            localcluster.down(cdir)
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()[0]
    print(report(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def report(res: dict) -> str:
    lines = [f"DCP, {res['size_mib']} MiB state, medians of {res['repeats']} "
             f"(load average {res['loadavg_start']:.1f} -> {res['loadavg_end']:.1f}; MemAvailable at "
             f"start {res['mem_available_start_gib']:.1f} GiB, projected peak {res['projected_peak_gib']:.1f} GiB)",
             f"{'async_save at 4 ranks':28s} {'blocking s':>11s} {'safe s':>9s}"]
    for k, v in res["save"].items():
        lines.append(f"{k:28s} {v['blocking_s']:11.3f} {v['safe_s']:9.3f}")
    lines.append(f"{'reshard restore':28s} {'load s':>11s}")
    for step, v in res["load"].items():
        for k, x in v.items():
            lines.append(f"{step + ' ' + k:28s} {x['load_s']:11.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
