"""One rank of the shaped-link experiment (bench/bench_shaped.py starts it in its node's
network namespace with ``ip netns exec``): DDP over gloo on the namespace's veth, one
Snapshotter per daemon cluster of its node, the configurations interleaved in rounds.

Every rank runs the same schedule (so DDP's collectives line up): ``--warmup`` steps of
each configuration, then ``--rounds`` rounds of ``--steps`` steps of each configuration,
the order rotated every round. A configuration is ``none`` (no snapshot), or the name of
a daemon cluster (``snap``: no traffic control, ``paced``: ``--peer-rate``), whose
Snapshotter saves after every optimizer step. The time of a step is from its forward to
the return of its ``save()``. Before a block ends, the rank waits until its daemon has
committed the block's last version (so one block's parity never spills into the next)
and the time spent draining is recorded apart. The bytes this node put on its link are
read from the veth's counters (``/sys/class/net/IF/statistics/tx_bytes``) around each
block: gloo's all-reduce plus the daemons' peer traffic plus heartbeats.

Writes one JSON file (``--out``): per configuration the step times (s), the bytes sent,
the drain times, the save() blocking times, the versions saved, skipped and the last
committed.
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
    p.add_argument("--job", default="shaped")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

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
                                  on_daemon_unavailable="raise",
                                  # the bounded-slowdown mode: skip a step rather than wait
                                  when_busy="skip" if name == "adaptive" else "wait")
    configs = ["none", *snaps]
    res = {c: {"step_s": [], "tx_bytes": 0, "steps": 0, "drain_s": [], "blocking_s": [],
               "saved": 0, "skipped": 0, "last_committed": 0, "last_saved": 0} for c in configs}
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    step = 0

    def block(cfg: str, n: int, record: bool) -> None:
        nonlocal step
        snap = snaps.get(cfg)
        r = res[cfg]
        dist.barrier()
        tx0 = _tx_bytes(a.ifname)
        target = 0  # the block's last saved version
        for _ in range(n):
            step += 1
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()
            opt.step()
            if snap is not None:
                fut = snap.save(step)
                target = step if fut is not None else target
                if record:
                    r["blocking_s"].append(snap.last_blocking_s if fut is not None else 0.0)
                    r["saved"] += fut is not None
                    r["last_saved"] = step if fut is not None else r["last_saved"]
            dt = time.perf_counter() - t0
            if record:
                r["step_s"].append(dt)
        if snap is not None:  # drain: the block's last version committed on this node
            t0 = time.perf_counter()
            snap.wait(a.drain_timeout_s)
            last = snap.client.list_versions(snap.cfg.job_id).latest_committed_version
            while last < target and time.perf_counter() - t0 < a.drain_timeout_s:
                time.sleep(0.005)
                last = snap.client.list_versions(snap.cfg.job_id).latest_committed_version
            if record:
                r["drain_s"].append(time.perf_counter() - t0)
                r["last_committed"] = int(last)
                r["skipped"] = snap.skipped
        dist.barrier()
        if record:
            r["tx_bytes"] += _tx_bytes(a.ifname) - tx0
            r["steps"] += n
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
