"""Incremental snapshots on a LoRA-style fine-tune (issue 16): what a snapshot costs when
95 % and more of the weights are frozen.

The model is the demo's GPT (tools/snapshotd_tools/demo/gpt_trainer.py) scaled up
(--size-mib of fp32 state), every Linear of its blocks wrapped with a LoRA adapter
(rank --lora-rank): the base weights, embeddings and layer norms are frozen
(``requires_grad=False``), only the adapters train, with AdamW. One process plays one
rank per node of a real local cluster (--nodes, --parity: a 4-node m=2 cluster by
default; every rank snapshots the same state, as data-parallel replicas do) and
snapshots every step, first with ``incremental=False`` and then with
``incremental=True`` (docs/INCREMENTAL.md), each mode a job of its own on the same
cluster, in the same run.

Per snapshot (the mean over the ranks; network per node):
  * copied    bytes the trainer wrote into its staging segment (SaveStats.bytes_copied);
  * hashed    bytes the daemon took in: checksummed at the adoption (SaveStats.bytes_hashed;
              the segment itself is handed over in shared memory, never copied);
  * net/node  bytes each daemon's peer plane handed to its sockets for that version
              (``peer_traffic``, as bench_cluster), and that over D (the state per node);
  * blocking  how long save() held the training loop.
The first saves of each mode fill the staging segments of the ring and copy everything;
the medians are over the saves after --warmup. After each mode, a fresh model restores
the last committed version and every tensor of the model and the optimizer is compared
with the live one, byte for byte.

    python -m bench.bench_lora [--size-mib 128] [--nodes 4 --parity 2] [--steps 8] [--json out.json]
    python -m bench.bench_lora --quick      # smoke test, tiny sizes

Memory: the cluster holds --nodes x (3 slots + parity) of the state; at 128 MiB and 4
nodes that is about 3 GiB: run it as the machine's big-memory rule says (flock, choom).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + (x A^T B^T) * scale`` with ``base`` frozen; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


def build(size_mib: int, lora_rank: int, seed: int, quick: bool):
    """(model, optimizer, config): the demo GPT with LoRA adapters, ~size_mib of state."""
    from snapshotd_tools.demo.gpt_trainer import GPT, GPTConfig

    torch.manual_seed(seed)
    if quick:
        c = GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    else:
        emb, per_layer = 8192 * 768 * 4, 7_084_800 * 4  # wte (tied) and one block's Linears
        layers = max(1, round(((size_mib << 20) - emb) / per_layer))
        c = GPTConfig(block_size=32, vocab_size=8192, n_layer=layers, n_head=12, n_embd=768, dropout=0.0)
    model = GPT(c)
    model.requires_grad_(False)
    for blk in model.h:
        blk.c_attn = LoRALinear(blk.c_attn, lora_rank)
        blk.c_proj = LoRALinear(blk.c_proj, lora_rank)
        blk.mlp[0] = LoRALinear(blk.mlp[0], lora_rank)
        blk.mlp[2] = LoRALinear(blk.mlp[2], lora_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    return model, opt, c


def state_bytes(model, opt) -> dict:
    """Every tensor of the model's and the optimizer's state, as bytes, by name."""
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for k, v in out.items()}


def run_mode(mode: str, a, model, opt, cfg, socks, nodes, d, stats_rows) -> dict:
    from snapshotd_client import Snapshotter
    from snapshotd_client.transport import DaemonClient

    from bench.bench_cluster import peer_bytes_sent, wait_committed

    job = f"lora-{mode}"
    snaps = [Snapshotter(model, opt, job_id=job, socket_path=socks[n], rank=r, world_size=len(nodes),
                         local_world_size=1, on_daemon_unavailable="raise",
                         block_size_bytes=a.block_size_bytes, incremental=(mode == "on"))
             for r, n in enumerate(nodes)]
    clients = [DaemonClient.for_socket(socks[n], timeout_s=30) for n in nodes]

    def committed(job_id, v):
        return all(c.list_versions(job_id).latest_committed_version >= v for c in clients)

    g = torch.Generator().manual_seed(1)
    rows = []
    D = None
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, cfg.vocab_size, (a.batch, cfg.block_size), generator=g)
        _, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        b0 = peer_bytes_sent(d) if a.nodes > 1 else {}
        futs, blocking = [], []
        for s in snaps:
            futs.append(s.save(step))
            blocking.append(s.last_blocking_s)
        st = [f.result(60) for f in futs]
        wait_committed(d, committed, job, step, a.commit_timeout_s)
        b1 = peer_bytes_sent(d) if a.nodes > 1 else {}
        D = st[0].bytes
        net = [b1[n] - b0[n] for n in b1 if b1.get(n) is not None and b0.get(n) is not None]
        row = {"mode": mode, "version": step, "state_bytes": D,
               "copied": statistics.mean(x.bytes_copied for x in st),
               "hashed": statistics.mean(x.bytes_hashed for x in st),
               "tensors_skipped": statistics.mean(x.tensors_skipped for x in st),
               "net_per_node": statistics.mean(net) if net else None,
               "blocking_ms": statistics.mean(blocking) * 1e3, "loss": float(loss.detach())}
        rows.append(row)
        stats_rows.append(row)
        net_s = (f"{row['net_per_node'] / 2**20:8.2f} MiB ({row['net_per_node'] / D:5.3f} x D)"
                 if net else "       - (one node)")
        print(f"  {mode:3s} v{step:<3d} copied {row['copied'] / 2**20:8.2f} MiB  hashed "
              f"{row['hashed'] / 2**20:8.2f} MiB  net/node {net_s}  save() blocked "
              f"{row['blocking_ms']:7.2f} ms", file=sys.stderr, flush=True)
    for s in snaps:
        s.close()
    live = state_bytes(model, opt)
    restored = restore_check(a, socks[nodes[0]], job, len(nodes), a.steps, live)
    for c in clients:
        c.drop_job(job)  # one job at a time fits the budget
        c.close()
    warm = rows[a.warmup:] or rows
    med = {k: statistics.median(r[k] for r in warm) if all(r[k] is not None for r in warm) else None
           for k in ("copied", "hashed", "net_per_node", "blocking_ms")}
    return {"mode": mode, "state_bytes": D, "median_after_warmup": med, "restore_bit_exact": restored,
            "saves": rows}


def restore_check(a, sock, job, world, step, live) -> bool:
    """A fresh model (other seed) restores rank 0's last committed version: every tensor
    of the model and the optimizer must equal the live one, byte for byte."""
    from snapshotd_client import Snapshotter

    model, opt, _ = build(a.size_mib, a.lora_rank, seed=12345, quick=a.quick)
    with Snapshotter(model, opt, job_id=job, socket_path=sock, rank=0, world_size=world,
                     local_world_size=1, on_daemon_unavailable="raise") as s:
        got_step = s.restore()
    got = state_bytes(model, opt)
    bad = [k for k in live if got.get(k) != live[k]]
    ok = got_step == step and not bad and got.keys() == live.keys()
    print(f"  restore of {job} v{got_step}: {'bit-exact' if ok else 'DIFFERS: ' + ', '.join(bad[:5])} "
          f"({len(live)} tensors)", file=sys.stderr, flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=128, help="fp32 state of the base model (default 128)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--parity", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="snapshots per mode (one per step)")
    p.add_argument("--warmup", type=int, default=4,
                   help="saves left out of the medians (the ring of 3 staging segments fills first)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block-size", default="1MiB")
    p.add_argument("--commit-timeout-s", type=float, default=120)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.nodes, a.parity, a.steps, a.warmup, a.block_size, a.lora_rank = 3, 1, 6, 3, "16KiB", 2
    from snapshotd.wire.config import parse_size
    from snapshotd_tools import localcluster as lc

    from bench import memwatch as mw

    a.block_size_bytes = parse_size(a.block_size)
    model, opt, cfg = build(a.size_mib, a.lora_rank, seed=0, quick=a.quick)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # what a rank stores: the model's state_dict (a tied weight is in it twice) and AdamW's moments
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2 * 4 * n_train + (1 << 20)
    budget = mw.one_job_budget(a.nodes, a.parity, size, a.block_size_bytes) + size + (64 << 20)  # + a third slot
    print(f"LoRA GPT: {cfg.n_layer} layers, n_embd {cfg.n_embd}, {n_all / 1e6:.1f} M parameters, "
          f"{n_train / 1e6:.2f} M trainable ({100 * n_train / n_all:.1f} %; {100 - 100 * n_train / n_all:.1f} % "
          f"frozen); state per rank {size / 2**20:.1f} MiB; {a.nodes} nodes, k={a.nodes - a.parity} "
          f"m={a.parity}, blocks {a.block_size}", file=sys.stderr, flush=True)
    d = tempfile.mkdtemp(prefix="bench-lora-")
    lc.up(d, a.nodes, a.parity, a.block_size, str(budget))
    socks = lc.sockets(d)
    nodes = sorted(socks)
    res = {"nodes": a.nodes, "parity": a.parity, "block_size": a.block_size, "parameters": n_all,
           "trainable": n_train, "machine": f"{os.cpu_count()} cores", "modes": {}}
    rows: list = []
    try:
        for mode in ("off", "on"):
            res["modes"][mode] = run_mode(mode, a, model, opt, cfg, socks, nodes, d, rows)
    finally:
        lc.down(d)
        shutil.rmtree(d, ignore_errors=True)
    off, on = res["modes"]["off"]["median_after_warmup"], res["modes"]["on"]["median_after_warmup"]
    D = res["modes"]["on"]["state_bytes"]
    print(f"\nmedians over saves {a.warmup + 1}..{a.steps} of each mode; D = {D / 2**20:.1f} MiB of state per rank")
    print(f"  {'':22s} {'incremental off':>16s} {'incremental on':>16s} {'on / off':>9s}")
    for k, label, unit in (("copied", "copied by the trainer", "MiB"), ("hashed", "hashed by the daemon", "MiB"),
                           ("net_per_node", "network per node", "MiB"), ("blocking_ms", "save() blocking", "ms")):
        if off[k] is None:
            continue
        scale = 2**20 if unit == "MiB" else 1
        ratio = on[k] / off[k] if off[k] else float("nan")
        print(f"  {label:22s} {off[k] / scale:12.2f} {unit:3s} {on[k] / scale:12.2f} {unit:3s} {ratio:9.3f}")
    for mode in ("off", "on"):
        print(f"  restore ({mode}): {'bit-exact' if res['modes'][mode]['restore_bit_exact'] else 'NOT bit-exact'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if all(m["restore_bit_exact"] for m in res["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
