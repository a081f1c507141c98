"""An FSDP2 trainer for the resharding tests (tests/integration/test_fsdp2_reshard.py).

``python fsdp2_trainer.py RANK WORLD SOCKET PG_FILE JOB MODE STEPS OUT [OUT1]``: a small
transformer, ``fully_shard`` on each layer and on the model, AdamW, gloo on CPU.
MODE ``train``: steps 1..STEPS with a snapshot every step, then the consolidated state
(hashes) after STEPS, then STEPS+1..STEPS+2 without snapshots and their state again, then
"ready" and it waits (killed by the test). MODE ``restore``: a fresh model, ``restore()``,
the consolidated state, then two more steps and the state again. Rank 0 writes OUT as
JSON: {"restored": step, "method": ..., "at": {step: {name: sha256}}}. The hashes are of
the raw bytes of every parameter and optimizer tensor, gathered whole (full_tensor).
With OUT1 (restore mode), rank 0 then restores once more at world size 1, on a
one-rank mesh of its own (a process group of rank 0 only), into a fresh model, and
writes that restore's result to OUT1 (one trainer launch less than a separate run).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from snapshotd_client.snapshotter import Snapshotter

VOCAB, DIM, SEQ, BATCH = 61, 32, 8, 4


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(
            DIM, 2, 64, dropout=0.1, batch_first=True) for _ in range(2))
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def batch(step: int, rank: int):
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return x, torch.roll(x, 1, 1)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def digest(model, opt) -> dict:
    """sha256 of every parameter and optimizer tensor, whole (a collective)."""
    out = {}
    for n, p in model.named_parameters():
        t = full(p.detach())
        out[n] = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, v in sorted(opt.state.get(p, {}).items()):
            t = full(v).contiguous()
            out[f"{n}/{k}"] = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def build(seed: int, job: str, sock: str, rank: int, world: int, mesh=None):
    torch.manual_seed(seed)
    model = Tiny()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = Snapshotter(model, opt, job_id=job, socket_path=sock, rank=rank, world_size=world,
                       local_world_size=1, on_daemon_unavailable="raise", timeout_s=60)
    return model, opt, snap


def restore_at_one(job: str, sock: str, out_path: str) -> None:
    """Rank 0 alone, on a one-rank mesh: restore into a fresh model, write the result."""
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(dist.new_group([0]), "cpu")
    model, opt, snap = build(99, job, sock, 0, 1, mesh)
    step = snap.restore()
    with open(out_path, "w") as f:
        json.dump({"restored": step, "method": snap.restored_method,
                   "from_world": snap.restored_from_world_size, "at": {step: digest(model, opt)}}, f)
    snap.close()


def main():
    rank, world, sock, pg, job, mode, steps, out_path = sys.argv[1:9]
    rank, world, steps = int(rank), int(world), int(steps)
    dist.init_process_group("gloo", init_method="file://" + pg, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    # a restored run starts from other weights
    model, opt, snap = build(0 if mode == "train" else 77, job, sock, rank, world)
    torch.manual_seed(1234 + rank)  # the RNG stream dropout draws from

    def step(i):
        x, y = batch(i, rank)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    result = {"at": {}}
    start = 0
    if mode == "restore":
        start = snap.restore()
        result.update(restored=start, method=snap.restored_method,
                      from_world=snap.restored_from_world_size)
        result["at"][start] = digest(model, opt)
    for i in range(start + 1, steps + 3):
        step(i)
        if mode == "train" and i <= steps:
            snap.save(i).result(120)
        if i >= steps:
            result["at"][i] = digest(model, opt)
    if mode == "train":
        t0 = time.monotonic()
        while snap.client.commit(job, steps).committed is False and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    snap.close()
    if len(sys.argv) > 9:
        dist.barrier()  # every rank of this run is done with the job
        if rank == 0:
            restore_at_one(job, sock, sys.argv[9])
        else:
            dist.new_group([0])  # group creation is collective
    print("ready", flush=True)
    if mode == "train":
        sys.stdin.read()  # wait to be killed
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
