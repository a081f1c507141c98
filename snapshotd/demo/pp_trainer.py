"""A tiny pipeline-parallel trainer on CPU (torch.distributed, gloo), one stage per rank.

Run S processes::

    python -m snapshotd.demo.pp_trainer --rank R --world-size S --master-port P \\
        --socket /path/to/node-R.sock --steps 20 --job pp [--checkfree --peer-sockets a,b,c]

Stage 0 holds the embedding and a transformer block, middle stages a block, the last
stage a block and the head. Each stage's *model* (what the Snapshotter's ``model`` and
its pipeline metadata cover, and what CheckFree averages) is its block, so every stage
has the same parameter layout; the edge layers are the stage's extra state (snapshotted
in the rank's local part; they share the stage's optimizer). One micro-batch per step:
activations go forward with dist.send/recv, gradients come back the same way. Every step
each stage clips its gradients, records the (clipped) norm, steps, and snapshots as
version step+1; the last stage's loss is broadcast and every rank prints one JSON line.
At start every rank restores; with ``--checkfree`` a stage whose shard is lost is rebuilt
approximately from its neighbours (CheckFree) and prints ``"approximate": true``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys

import torch
import torch.distributed as dist
from torch import nn

from snapshotd.demo.trainer import DataStream

VOCAB, D, SEQ, BATCH = 16, 32, 16, 8


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(SEQ, D) * 0.02)

    def forward(self, x):
        return self.tok(x) + self.pos[: x.shape[1]]


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, h):
        return self.out(self.norm(h))


class Data(DataStream):
    """Batches of counting sequences (start, start+1, ... mod VOCAB): every token predicts
    its successor, so the loss falls within a few steps. Position and generator state are
    snapshotted (stage 0 and the last stage each hold a copy: inputs and targets)."""

    def next(self):
        x0 = torch.randint(0, self.vocab, (self.batch, 1), generator=self.gen)
        x = (x0 + torch.arange(self.seq + 1)) % self.vocab
        self.position += 1
        return x[:, :-1], x[:, 1:]


def block() -> nn.Module:
    return nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)


def build(rank: int, S: int, seed: int):
    torch.manual_seed(seed + 1000 * rank)
    model = block()
    edge = nn.ModuleDict()
    if rank == 0:
        edge["embed"] = Embed()
    if rank == S - 1:
        edge["head"] = Head()
    opt = torch.optim.AdamW(list(model.parameters()) + list(edge.parameters()), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    data = Data(seed, batch=BATCH, seq=SEQ, vocab=VOCAB) if rank in (0, S - 1) else None
    return model, edge, opt, sched, data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--socket", default=None, help="this rank's snapshotd daemon socket")
    p.add_argument("--steps", type=int, default=20, help="train until this step")
    p.add_argument("--job", default="pp")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None, help="write losses and restore info as JSON here")
    p.add_argument("--checkfree", action="store_true", help="enable the CheckFree restore fallback")
    p.add_argument("--peer-sockets", default=None,
                   help="comma-separated daemon sockets by rank: where CheckFree fetches "
                        "neighbours' shards when the local daemon cannot open them")
    p.add_argument("--gloo-timeout-s", type=float, default=60.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[rank {a.rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    r, S = a.rank, a.world_size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.master_port}", rank=r, world_size=S,
                            timeout=datetime.timedelta(seconds=a.gloo_timeout_s))
    model, edge, opt, sched, data = build(r, S, a.seed)
    extra = {"edge": edge}
    if data is not None:
        extra["data"] = data

    from snapshotd.checkfree import CheckFreeSettings
    from snapshotd_client import Snapshotter

    sources = None
    if a.peer_sockets:
        sources = {i: s for i, s in enumerate(a.peer_sockets.split(",")) if s}
    snap = Snapshotter(model, opt, lr_scheduler=sched, extra_state=extra, job_id=a.job, socket_path=a.socket,
                       rank=r, world_size=S, local_world_size=1, on_daemon_unavailable="raise",
                       pipeline_stage=(r, S), checkfree=CheckFreeSettings() if a.checkfree else None,
                       checkfree_sources=sources)
    start = snap.restore()
    starts = [None] * S
    dist.all_gather_object(starts, start)
    if len(set(starts)) != 1:
        raise SystemExit(f"ranks restored different steps: {starts}")
    print(json.dumps({"event": "restored", "rank": r, "step": start,
                      "approximate": snap.restored_approximate}), flush=True)
    params = list(model.parameters()) + list(edge.parameters())
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    shape = (BATCH, SEQ, D)
    for step in range(start, a.steps):
        opt.zero_grad(set_to_none=True)
        if data is not None:
            x, y = data.next()
        if r == 0:
            h_in = edge["embed"](x)
        else:
            h_in = torch.empty(shape)
            dist.recv(h_in, r - 1)
            h_in.requires_grad_(True)
        h = model(h_in)
        if r == S - 1:
            loss = loss_fn(edge["head"](h).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            lt = loss.detach().reshape(1).clone()
        else:
            dist.send(h.detach().contiguous(), r + 1)
            g = torch.empty(shape)
            dist.recv(g, r + 1)
            h.backward(g)
            lt = torch.zeros(1)
        if r > 0:
            dist.send(h_in.grad.contiguous(), r - 1)
        norm = nn.utils.clip_grad_norm_(params, 1.0)
        snap.record_grad_norm(torch.clamp(norm, max=1.0))  # the norm after clipping
        opt.step()
        sched.step()
        dist.broadcast(lt, S - 1)
        loss_v = float(lt.item())
        losses.append(loss_v)
        snap.save(step + 1)
        print(json.dumps({"event": "step", "rank": r, "step": step + 1, "loss": round(loss_v, 6),
                          "grad_norm": round(float(norm), 6)}), flush=True)
    snap.wait(60)
    snap.close()
    dist.barrier()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rank": r, "start": start, "approximate": snap.restored_approximate,
                       "losses": losses}, f)
    print(json.dumps({"event": "done", "rank": r}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
