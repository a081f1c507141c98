"""A small deterministic transformer trained on CPU, snapshotting every step.

Run as ``python -m snapshotd_tools.demo.trainer --steps 40 --out result.json``. It restores
from the local daemon when a committed snapshot exists, so killing and restarting it
resumes where the last committed snapshot left off. It prints one JSON line per step
and writes a digest of its final parameters and optimizer state, so two runs can be
compared bit for bit without pickling anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
from torch import nn

from snapshotd_tools.demo.events import emit


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, d_model: int = 32, layers: int = 2, seq: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=64,
                                           dropout=0.1, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x) + self.pos[: x.shape[1]]))


class DataStream:
    """Synthetic token batches whose position and generator state are snapshotted."""

    def __init__(self, seed: int, batch: int = 8, seq: int = 16, vocab: int = 64):
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.seq, self.vocab, self.position = batch, seq, vocab, 0

    def next(self):
        # A learnable pattern: counting from a random start, modulo vocab.
        start = torch.randint(0, self.vocab, (self.batch, 1), generator=self.gen)
        x = (start + torch.arange(self.seq + 1)) % self.vocab
        self.position += 1
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"position": self.position, "gen": self.gen.get_state()}

    def load_state_dict(self, d):
        self.position = d["position"]
        self.gen.set_state(d["gen"])


def digest_state(model, optimizer) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for idx, s in sorted(optimizer.state_dict()["state"].items()):
        for k, v in sorted(s.items()):
            h.update(f"{idx}/{k}".encode())
            h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if torch.is_tensor(v)
                     else repr(v).encode())
    return h.hexdigest()


def build(seed: int):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return model, opt, sched, DataStream(seed + 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--job", default="demo")
    p.add_argument("--socket", default=None)
    p.add_argument("--out", default=None, help="write final digest and losses as JSON here")
    p.add_argument("--no-snapshot", action="store_true", help="train without snapshotd")
    p.add_argument("--step-delay-s", type=float, default=0.0, help="sleep per step (tests)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--local-world-size", type=int, default=0, help="ranks on this node (0 = all)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model, opt, sched, data = build(a.seed + a.rank)
    snap = None
    start = 0
    if not a.no_snapshot:
        from snapshotd_client import Snapshotter

        snap = Snapshotter(model, opt, lr_scheduler=sched, extra_state={"data": data},
                           job_id=a.job, socket_path=a.socket, rank=a.rank,
                           world_size=a.world_size, local_world_size=a.local_world_size)
        start = snap.restore()
        emit({"event": "restored", "step": start})
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step in range(start, a.steps):
        x, y = data.next()
        loss = loss_fn(model(x).reshape(-1, 64), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        rec = {"event": "step", "step": step + 1, "loss": round(loss.item(), 6)}
        if snap is not None:
            if snap.save(step + 1) is not None:
                rec["blocking_ms"] = round(snap.last_blocking_s * 1e3, 3)
        emit(rec)
        if a.step_delay_s:
            time.sleep(a.step_delay_s)
    if snap is not None:
        snap.close()
    result = {"steps": a.steps, "start": start, "digest": digest_state(model, opt), "losses": losses}
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(a.out + ".tmp", a.out)
    emit({"event": "done", "digest": result["digest"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
