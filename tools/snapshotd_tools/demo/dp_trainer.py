"""One rank of a data-parallel training job (torch.distributed, gloo), snapshotting every step.

Run as ``python -m snapshotd_tools.demo.dp_trainer --rank R --world-size W --master-port P
--socket S --steps N --job J [--no-snapshot] [--out F]``, W times (one per rank).

Every rank holds the same TinyLM (same seed) and trains it on its own batches
(``DataStream`` seeded by rank); gradients are summed with one ``all_reduce`` over a
flat buffer and divided by W, so every rank applies the same AdamW step and the
replicas stay bit-identical. The mean loss rides in the same buffer.

With a socket, rank r snapshots into the daemon at S after every step and restores
from it at start (all ranks must agree on the restored step). With
``shard_replicated`` (when the client supports it) each rank stores only its 1/W
slice of the replicated model + optimizer state plus its own RNG and data state.

Prints one JSON line per event: ``restored``, ``step`` (step, loss, blocking_ms),
``done`` (digest). Rank 0 writes ``{digest, losses, start, state_bytes, ...}`` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from snapshotd_tools.demo.trainer import DataStream, TinyLM, digest_state


def shard_replicated_supported() -> bool:
    """Whether this snapshotd_client's SnapshotterConfig has a ``shard_replicated`` field."""
    try:
        from snapshotd_client import SnapshotterConfig
    except ImportError:
        return False
    return "shard_replicated" in {f.name for f in dataclasses.fields(SnapshotterConfig)}


def build(seed: int, rank: int):
    torch.manual_seed(seed)  # identical replicas on every rank
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = DataStream(seed + 1 + rank)  # each rank its own batches
    torch.manual_seed(seed + 1000 + rank)  # and its own dropout masks (restored per rank)
    return model, opt, sched, data


def state_bytes(model, opt) -> int:
    """Bytes of the replicated training state: parameters/buffers + optimizer tensors."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        n += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v))
    return n


def _emit(rec: dict) -> None:
    from snapshotd_tools.demo.events import emit

    emit(rec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--socket", default=None, help="this node's snapshotd socket")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--job", default="dp")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="rank 0: write final digest and losses as JSON here")
    p.add_argument("--no-snapshot", action="store_true", help="train without snapshotd")
    p.add_argument("--no-shard-replicated", action="store_true",
                   help="store the full replicated state on every rank (default: each rank "
                        "stores its 1/W slice when the client supports shard_replicated)")
    p.add_argument("--gloo-timeout-s", type=float, default=10.0)
    p.add_argument("--inflight-wait-s", type=float, default=10.0,
                   help="how long a save waits for older versions to commit before giving up "
                        "the oldest (default 10 s, the Snapshotter's)")
    p.add_argument("--step-delay-s", type=float, default=0.0, help="sleep per step")
    a = p.parse_args(argv)
    if not a.no_snapshot and not a.socket:
        p.error("--socket is required unless --no-snapshot")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank, world = a.rank, a.world_size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.master_port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=a.gloo_timeout_s))
    model, opt, sched, data = build(a.seed, rank)
    params = [q for q in model.parameters() if q.requires_grad]

    snap = None
    start = 0
    if not a.no_snapshot:
        from snapshotd_client import Snapshotter

        kw = {}
        supported = shard_replicated_supported()
        sharded = supported and not a.no_shard_replicated
        if sharded:
            kw["shard_replicated"] = True
        snap = Snapshotter(model, opt, lr_scheduler=sched, extra_state={"data": data},
                           job_id=a.job, socket_path=a.socket, rank=rank, world_size=world,
                           local_world_size=1, on_daemon_unavailable="raise",
                           inflight_wait_s=a.inflight_wait_s, **kw)
        start = snap.restore()
        # Every replica must resume from the same step, or the collectives would mix steps.
        t = torch.tensor([start, -start], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != start or -int(t[1]) != start:
            raise RuntimeError(f"rank {rank} restored step {start}, but the ranks restored "
                               f"steps {-int(t[1])}..{int(t[0])}")
        _emit({"event": "restored", "rank": rank, "step": start, "shard_replicated": sharded,
               "shard_replicated_supported": supported, "position": data.position})

    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step in range(start, a.steps):
        x, y = data.next()
        loss = loss_fn(model(x).reshape(-1, 64), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # DDP by hand: one all_reduce(SUM) over every gradient and the loss, then / world.
        flat = torch.cat([q.grad.reshape(-1) for q in params] + [loss.detach().reshape(1)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        off = 0
        for q in params:
            n = q.numel()
            q.grad.copy_(flat[off:off + n].view_as(q.grad))
            off += n
        mean_loss = float(flat[off])
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(mean_loss)
        rec = {"event": "step", "rank": rank, "step": step + 1, "loss": round(mean_loss, 6)}
        if snap is not None:
            fut = snap.save(step + 1)
            if fut is not None:
                rec["blocking_ms"] = round(snap.last_blocking_s * 1e3, 3)
                if snap.last_stats is not None:  # of the previous, completed hand-off
                    rec["snapshot_bytes"] = snap.last_stats.bytes
        _emit(rec)
        if a.step_delay_s:
            time.sleep(a.step_delay_s)
    if snap is not None:
        snap.close()
    digest = digest_state(model, opt)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and a.out:
        result = {"steps": a.steps, "start": start, "digest": digest, "losses": losses,
                  "state_bytes": state_bytes(model, opt), "world_size": world}
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(a.out + ".tmp", a.out)
    _emit({"event": "done", "rank": rank, "digest": digest})
    return 0


if __name__ == "__main__":
    sys.exit(main())
