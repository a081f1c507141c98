"""One rank of a 2-rank DDP job (torch DistributedDataParallel, gloo, CPU) that snapshots
every step, for tests/integration/test_daemon_restart.py.

``python tests/integration/ddp_restart_trainer.py --rank R --world-size W --master-port P
--steps N [--socket S --job J] [--step-delay-s D] [--out F]``. Restores at start (every
rank must restore the same step), then trains to step N; prints one JSON line per step:
``{"event": "step", "rank", "step", "saved", "blocking_s", "t"}`` (``saved``: save()
returned a future; ``blocking_s``: how long save() held the loop), and ``restored`` /
``done`` (digest of model + optimizer). Rank 0 writes ``{digest, start}`` to --out.
Warnings go to stderr as Python prints them (the test counts them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from snapshotd_tools.demo.trainer import DataStream, TinyLM, digest_state


def _emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--socket", default=None)
    p.add_argument("--job", default="ddp")
    p.add_argument("--step-delay-s", type=float, default=0.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank, world = a.rank, a.world_size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.master_port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(1234)
    module = TinyLM()
    model = DDP(module)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = DataStream(1235 + rank)
    torch.manual_seed(2234 + rank)

    snap, start = None, 0
    if a.socket:
        from snapshotd_client import Snapshotter

        snap = Snapshotter(module, opt, extra_state={"data": data}, job_id=a.job,
                           socket_path=a.socket, rank=rank, world_size=world,
                           local_world_size=world, on_daemon_unavailable="warn")
        start = snap.restore()
        t = torch.tensor([start, -start], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != start or -int(t[1]) != start:
            raise RuntimeError(f"rank {rank} restored step {start}; the ranks restored "
                               f"{-int(t[1])}..{int(t[0])}")
        _emit({"event": "restored", "rank": rank, "step": start})

    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, a.steps):
        x, y = data.next()
        loss = loss_fn(model(x).reshape(-1, 64), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {"event": "step", "rank": rank, "step": step + 1, "t": time.monotonic()}
        if snap is not None:
            t0 = time.perf_counter()
            fut = snap.save(step + 1)
            rec["blocking_s"] = time.perf_counter() - t0
            rec["saved"] = fut is not None
        _emit(rec)
        if a.step_delay_s:
            time.sleep(a.step_delay_s)
    if snap is not None:
        snap.close()
    digest = digest_state(module, opt)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump({"digest": digest, "start": start}, f)
        os.replace(a.out + ".tmp", a.out)
    _emit({"event": "done", "rank": rank, "digest": digest})
    return 0


if __name__ == "__main__":
    sys.exit(main())
