"""One rank of the shaped-link experiment (bench/bench_shaped.py starts it in its node's
network namespace with ``ip netns exec``): DDP over gloo on the namespace's veth, one
Snapshotter per daemon cluster of its node, the configurations interleaved in rounds.

Every rank runs the same schedule (so DDP's collectives line up): ``--warmup`` steps of
each configuration, then ``--rounds`` rounds of ``--steps`` steps of each configuration,
the order rotated every round. A configuration is ``none`` (no snapshot), or the name of
a daemon cluster (``snap``: no traffic control, ``paced``: ``--peer-rate``), whose
Snapshotter saves after every optimizer step. The time of a step is from its forward to
the return of its ``save()``. Before a block ends, the rank waits until its daemon has
committed the block's last version every rank saved (so one block's parity never spills
into the next; with ``when_busy="skip"`` a version some rank skipped never commits)
and the time spent draining is recorded apart. The bytes this node put on its link are
read from the veth's counters (``/sys/class/net/IF/statistics/tx_bytes``) around each
block: gloo's all-reduce plus the daemons' peer traffic plus heartbeats.

Writes one JSON file (``--out``): per configuration the step times (s), the bytes sent,
the drain times, the save() blocking times, the versions saved and skipped, the last
version every rank saved and the last committed; per CPU of the machine the ticks of
/proc/stat spent in user, system, softirq (+ irq) and idle during the configuration's
blocks (drain included); this process's CPU over the steps (drain excluded): its
training thread, its other threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time

_T0 = time.monotonic()


def _mark(what: str) -> None:
    print(f"[rank] {time.monotonic() - _T0:7.2f} s {what}", flush=True)


def _tx_bytes(ifname: str) -> int:
    with open(f"/sys/class/net/{ifname}/statistics/tx_bytes") as f:
        return int(f.read())


def cpu_ticks(stat: str | None = None) -> dict[str, list[int]]:
    """Per CPU of the machine (``/proc/stat``, or its text ``stat``; USER_HZ ticks):
    [user + nice, system, softirq + irq, idle + iowait]. Namespaces share the CPUs, so
    this is every node's work: trainers, daemons, and the kernel moving packets through
    the veths."""
    if stat is None:
        with open("/proc/stat") as f:
            stat = f.read()
    out = {}
    for line in stat.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *v = line.split()
            v = [int(x) for x in v[:7]]  # user nice system idle iowait irq softirq
            out[name] = [v[0] + v[1], v[2], v[5] + v[6], v[3] + v[4]]
    return out


def _model(param_mib: float, width: int):
    """An MLP of about ``param_mib`` MiB of float32 parameters: square layers of ``width``."""
    from torch import nn

    per_layer = width * width + width
    layers = max(1, round(param_mib * (1 << 20) / 4 / per_layer))
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 16))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous")
    p.add_argument("--ifname", required=True, help="this namespace's veth")
    p.add_argument("--daemon", action="append", default=[],
                   help="CONFIG=SOCKET: a daemon cluster to snapshot to (repeatable)")
    p.add_argument("--param-mib", type=float, default=8.0)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ready-file", action="append", default=[],
                   help="wait for this file (a daemon's ready file) before the first block")
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument("--shard-replicated", action="store_true",
                   help="each rank stores its 1/W slice of the replicated (DDP) state")
    p.add_argument("--job", default="shaped")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bench.common import thread_cpu_delta, thread_cpu_seconds
    from snapshotd_client import Snapshotter

    _mark("imported")
    torch.set_num_threads(a.threads)
    os.environ["GLOO_SOCKET_IFNAME"] = a.ifname
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank,
                            world_size=a.world, timeout=__import__("datetime").timedelta(seconds=120))
    _mark("process group up")
    torch.manual_seed(1234)
    model = _model(a.param_mib, a.width)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)  # no momentum: the state is the params
    g = torch.Generator().manual_seed(99 + a.rank)
    x = torch.randn(a.batch, a.width, generator=g)
    y = torch.randn(a.batch, 16, generator=g)
    loss_fn = nn.MSELoss()
    snaps = {}
    for spec in a.daemon:
        name, sock = spec.split("=", 1)
        snaps[name] = Snapshotter(ddp, opt, job_id=f"{a.job}-{name}", socket_path=sock, rank=a.rank,
                                  world_size=a.world, local_world_size=1,
                                  shard_replicated=a.shard_replicated,
                                  on_daemon_unavailable="raise",
                                  # the bounded-slowdown mode: skip a step rather than wait
                                  when_busy="skip" if name == "adaptive" else "wait")
    configs = ["none", *snaps]
    res = {c: {"step_s": [], "tx_bytes": 0, "steps": 0, "drain_s": [], "blocking_s": [],
               "saved": 0, "skipped": 0, "last_committed": 0, "last_saved": 0,
               "cpu_ticks": {}, "proc_cpu_s": [0.0, 0.0], "block_s": 0.0} for c in configs}
    me = os.getpid()
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    step = 0

    def block(cfg: str, n: int, record: bool) -> None:
        nonlocal step
        snap = snaps.get(cfg)
        r = res[cfg]
        dist.barrier()
        tx0, cpu0, th0 = _tx_bytes(a.ifname), cpu_ticks(), thread_cpu_seconds(me)
        b0 = time.perf_counter()
        saved = torch.zeros(n, dtype=torch.int32)  # 1 where this rank saved the block's step
        for i in range(n):
            step += 1
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()
            opt.step()
            if snap is not None:
                fut = snap.save(step)
                saved[i] = fut is not None
                if record:
                    r["blocking_s"].append(snap.last_blocking_s if fut is not None else 0.0)
                    r["saved"] += fut is not None
            dt = time.perf_counter() - t0
            if record:
                r["step_s"].append(dt)
        if record:  # this process's CPU over the steps: [training thread, its other threads]
            for tid, (_, sec) in thread_cpu_delta(th0, thread_cpu_seconds(me)).items():
                r["proc_cpu_s"][tid != me] += sec
        if snap is not None:  # drain: the block's last version committed on this node
            # The last version every rank saved: with when_busy="skip" each rank decides
            # alone, and a version one rank skipped never commits (a later one does).
            dist.all_reduce(saved, op=dist.ReduceOp.MIN)
            every = saved.nonzero()
            target = step - n + 1 + int(every[-1]) if len(every) else 0
            t0 = time.perf_counter()
            snap.wait(a.drain_timeout_s)
            last = snap.client.list_versions(snap.cfg.job_id).latest_committed_version
            while last < target and time.perf_counter() - t0 < a.drain_timeout_s:
                time.sleep(0.005)
                last = snap.client.list_versions(snap.cfg.job_id).latest_committed_version
            if record:
                r["drain_s"].append(time.perf_counter() - t0)
                r["last_committed"] = int(last)
                r["last_saved"] = max(r["last_saved"], target)  # by every rank
                r["skipped"] = snap.skipped
        dist.barrier()
        if record:
            r["tx_bytes"] += _tx_bytes(a.ifname) - tx0
            r["steps"] += n
            r["block_s"] += time.perf_counter() - b0  # the wall time the ticks cover
            for cpu, v in cpu_ticks().items():  # the block's CPU, drain included
                acc = r["cpu_ticks"].setdefault(cpu, [0, 0, 0, 0])
                for j, (now, before) in enumerate(zip(v, cpu0.get(cpu, v))):
                    acc[j] += now - before
        _mark(f"block {cfg} x{n} done")

    t0 = time.monotonic()
    while not all(os.path.exists(f) for f in a.ready_file):  # the daemons start beside us
        if time.monotonic() - t0 > 120:
            raise TimeoutError(f"daemons not ready: {a.ready_file}")
        time.sleep(0.05)
    _mark("daemons ready")
    for cfg in configs:
        block(cfg, a.warmup, record=False)
    for rnd in range(a.rounds):
        k = rnd % len(configs)
        for cfg in configs[k:] + configs[:k]:
            block(cfg, a.steps, record=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump({"rank": a.rank, "state_bytes": state_bytes, "configs": res,
                   "cpus": sorted(os.sched_getaffinity(0)),
                   "params": sum(t.numel() for t in model.parameters())}, f)
    os.replace(a.out + ".tmp", a.out)
    for s in snaps.values():
        s.close()
    dist.destroy_process_group()
    _mark("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
