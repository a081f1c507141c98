"""A nanoGPT-style training script with snapshotd, as a user would write it (issue 15).

    torchrun --standalone --nproc-per-node=2 -m snapshotd_tools.demo.gpt_trainer --max-iters 40

A tiny GPT built from a config (no downloads), DDP over gloo on CPU, AdamW with a cosine
learning rate set by hand each iteration, gradient accumulation, and, as in nanoGPT:
the next batch is fetched from the torch RNG *inside* the iteration (before backward),
``X, Y = get_batch(...)`` rebinds the loop's variables, and rank 0 tracks
``best_val_loss``. The snapshotd part is the region between the README markers below:
it is, word for word, the first example of the README's "Using it in a training loop"
(tests/integration/test_gpt_resume.py checks that, and that a run SIGKILLed mid-way and
relaunched ends bit-identical to one that never failed).

Everything else comes from the environment, as under torchrun: RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; the daemon socket ($SNAPSHOTD_SOCKET) and the job id
($TORCHELASTIC_RUN_ID, or $SNAPSHOTD_JOB_ID). Prints JSON lines: ``iter`` (rank 0, with
the loss), ``done`` (every rank, with a digest of the final model and optimizer state). ``--crash-at N --crash-rank R``: rank R SIGKILLs itself right after
``snap.save(N)`` on a run that did not restore (a fault for the tests).
``--nproc N`` instead of torchrun: this process launches N local ranks (see ``launch``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from snapshotd_tools.demo.events import emit


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.1


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(),
                                 nn.Linear(4 * c.n_embd, c.n_embd), nn.Dropout(c.dropout))
        self.n_head, self.dropout = c.n_head, c.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1])
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def digest(model: nn.Module, optimizer) -> str:
    """sha256 over the final parameters and the optimizer's state and hyper-parameters."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    sd = optimizer.state_dict()
    for pid in sorted(sd["state"]):
        for k, v in sorted(sd["state"][pid].items()):
            h.update(f"{pid}/{k}".encode())
            h.update(v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if torch.is_tensor(v)
                     else repr(v).encode())
    h.update(json.dumps(sd["param_groups"], sort_keys=True).encode())
    return h.hexdigest()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-iters", type=int, default=40)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--crash-at", type=int, default=0)
    p.add_argument("--crash-rank", type=int, default=1)
    a = p.parse_args(argv)
    max_iters, eval_interval, grad_accum, batch_size = a.max_iters, a.eval_interval, 2, 4
    warmup_iters, learning_rate, min_lr = 5, 3e-3, 3e-4

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    master_process = rank == 0
    torch.manual_seed(1337 + rank)  # each rank its own dropout and batches (nanoGPT's seed_offset)
    cfg = GPTConfig()
    data = torch.Generator().manual_seed(0)
    train_data = torch.randint(cfg.vocab_size, (4096,), generator=data)
    val_data = torch.randint(cfg.vocab_size, (1024,), generator=data)

    def get_batch(split):
        d = train_data if split == "train" else val_data
        ix = torch.randint(len(d) - cfg.block_size, (batch_size,))  # the global torch RNG
        x = torch.stack([d[i:i + cfg.block_size] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + cfg.block_size] for i in ix])
        return x, y

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        ratio = (it - warmup_iters) / max(1, max_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    @torch.no_grad()
    def estimate_loss():
        raw_model.eval()
        losses = torch.stack([raw_model(*get_batch("val"))[1] for _ in range(4)])
        raw_model.train()
        return losses.mean().item()

    raw_model = GPT(cfg)
    model = nn.parallel.DistributedDataParallel(raw_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1,
                                  betas=(0.9, 0.95))
    best_val_loss = 1e9

    # --- README: first example ---
    from snapshotd_client import Snapshotter

    snap = Snapshotter(model, optimizer, state={
        "batch": lambda: (X, Y),                # the batch already fetched for the next step
        "best_val_loss": lambda: best_val_loss,  # read at each save: rebinding is fine
    })
    iter_num = snap.restore()                   # 0 when there is nothing to restore
    if iter_num:
        X, Y = snap.restored["batch"]
        best_val_loss = snap.restored["best_val_loss"]
    else:
        X, Y = get_batch("train")               # the first batch of a fresh run
    while iter_num < max_iters:
        for group in optimizer.param_groups:
            group["lr"] = get_lr(iter_num)
        if iter_num % eval_interval == 0 and master_process:
            best_val_loss = min(best_val_loss, estimate_loss())
        for micro_step in range(grad_accum):
            logits, loss = model(X, Y)
            X, Y = get_batch("train")           # prefetch the next batch (torch RNG)
            (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        snap.save(iter_num)                     # asynchronous: only the copy to host memory blocks
    # --- end of README example ---
        if master_process:
            emit({"event": "iter", "iter": iter_num, "loss": loss.item()})
        if iter_num == a.crash_at and rank == a.crash_rank and not snap.restored:
            os.kill(os.getpid(), signal.SIGKILL)
    snap.wait()
    emit({"event": "done", "rank": rank, "iter": iter_num, "best_val_loss": best_val_loss,
          "digest": digest(raw_model, optimizer), "job_id": snap.cfg.job_id})
    snap.close()
    dist.destroy_process_group()


def _rank(rank: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    main(argv)


def launch(nproc: int, argv: list[str]) -> int:
    """A minimal stand-in for ``torchrun --standalone`` without restarts, for tests and a
    quick look: forks ``nproc`` ranks (torch is imported once, before the fork), and when
    one dies kills the others, as torchrun does. Prints one ``exit`` JSON line with each
    rank's exit code; returns 0 when all exited 0."""
    import multiprocessing as mp
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, argv)) for r in range(nproc)]
    for p in procs:
        p.start()
    while any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.exitcode is None:
                    p.kill()
        time.sleep(0.05)
        for p in procs:
            p.join(0)
    codes = [p.exitcode for p in procs]
    emit({"event": "exit", "codes": codes})
    return 0 if codes == [0] * nproc else 1


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if "--nproc" in args:  # be the launcher
        i = args.index("--nproc")
        sys.exit(launch(int(args[i + 1]), args[:i] + args[i + 2:]))
    main(args)
