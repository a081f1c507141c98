"""A tiny pipeline-parallel trainer on CPU (torch.distributed, gloo), one stage per rank.

Run S processes (S >= 2), one per stage, rank = stage index::

    python -m snapshotd_tools.demo.pp_trainer --rank R --world-size S --master-port P \\
        (--socket /path/to/node-R.sock | --no-snapshot) --steps 20 --job pp \\
        [--checkfree | --checkfree-plus] [--microbatches M] [--lr-scale 1.1] \\
        [--restart-warmup] [--peer-sockets a.sock,b.sock,...] [--out FILE] [--seed 7]

This CLI is stable (the chaos harness drives it). Every rank prints one JSON line per
event on stdout:

* ``{"event": "restored", "rank", "step", "approximate", "method"}`` -- after the restore
  (``method``: "none" for a fresh start, "exact", "CheckFree" or "CheckFree+");
* ``{"event": "restore_failed", "rank", "error"}`` -- the restore failed (e.g. two
  adjacent stages lost: CheckFree cannot help); the process exits with status 3 before
  it joins the process group, so a harness sees the reason at once;
* ``{"event": "step", "rank", "step", "loss", "grad_norm"}`` -- after every step (the
  loss is the last stage's, broadcast, averaged over the step's micro-batches);
* ``{"event": "done", "rank"}``.

The model: stage 0 = token + position embedding and a transformer block (causal), middle
stages a block, the last stage a block and the head (LayerNorm + linear). Each stage's
``Stage`` module is what the Snapshotter snapshots; its pipeline metadata names the
embedding / head as ``edge_layers``, so CheckFree averages only the blocks. With
``--checkfree-plus`` (CheckFree+), on odd micro-batches the first two and the last two
stages swap their order of execution (``snapshotd_client.pipeline.swapped_stage_order``:
the activations then go embed -> block 1 -> block 0 -> block 2 ...), and the swap partners
keep copies of the edge layers (``embed_copy`` on stage 1, ``head_copy`` on stage S-2, sent
to them after every optimizer step), so a lost first or last stage can be rebuilt as a
copy of its partner. The embedding always runs on rank 0 and the head on rank S-1.

Data: batches of sequences where each token is (the token two places back) + 1 mod 16
with probability 0.8, else uniform; the first two tokens are uniform. Batches depend only
on (seed, step, micro-batch), so a restored or rebuilt stage needs no data state. Every
step each stage clips its gradients to norm 1, records the clipped norm, steps AdamW
(lr 1e-2, 5-step linear warm-up) and snapshots version step + 1.

``build``, ``Stage``, ``batch``, ``sync_edge_copies`` and ``train_step_local`` are also
used by ``bench/bench_checkfree.py``, which simulates the whole pipeline in one process.
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

from snapshotd.core.checkfree import copied_edges
from snapshotd_client.pipeline import swapped_stage_order

VOCAB, D, SEQ, BATCH = 16, 32, 16, 8
NOISE = 0.2
LR, WARMUP_STEPS, CLIP = 1e-2, 5, 1.0
EXIT_RESTORE_FAILED = 3


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


class Stage(nn.Module):
    """One pipeline stage: ``block`` always; ``embed`` on stage 0, ``head`` on stage S-1;
    with CheckFree+ the swap partners' copies ``embed_copy`` / ``head_copy`` (not trained:
    refreshed from the originals after every step)."""

    def __init__(self, index: int, num_stages: int, plus: bool = False):
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self.embed = Embed() if index == 0 else None
        self.block = nn.TransformerEncoderLayer(D, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = Head() if index == num_stages - 1 else None
        copies = copied_edges(index, num_stages) if plus else []
        self.embed_copy = Embed().requires_grad_(False) if 0 in copies else None
        self.head_copy = Head().requires_grad_(False) if num_stages - 1 in copies else None

    def run_block(self, h):
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1])
        return self.block(h, src_mask=mask, is_causal=True)

    def _names(self, *prefixes) -> tuple[str, ...]:
        return tuple(n for n, _ in self.named_parameters() if n.split(".")[0] in prefixes)

    @property
    def edge_layers(self) -> tuple[str, ...]:
        return self._names("embed", "head")

    @property
    def edge_copies(self) -> tuple[str, ...]:
        return self._names("embed_copy") + self._names("head_copy")  # stage 0's first

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build(rank: int, num_stages: int, seed: int, plus: bool = False):
    """(Stage, AdamW, LambdaLR warm-up) of stage ``rank``, seeded per stage."""
    torch.manual_seed(seed + 1000 * rank)
    stage = Stage(rank, num_stages, plus)
    opt = torch.optim.AdamW(stage.trainable(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    return stage, opt, sched


def batch(seed: int, step: int, microbatch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one micro-batch, a pure function of (seed, step, micro-batch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + microbatch)
    x = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    x[:, :2] = torch.randint(0, VOCAB, (BATCH, 2), generator=g)
    noise = torch.rand(BATCH, SEQ + 1, generator=g) < NOISE
    rnd = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    for t in range(2, SEQ + 1):
        x[:, t] = torch.where(noise[:, t], rnd[:, t], (x[:, t - 2] + 1) % VOCAB)
    return x[:, :-1], x[:, 1:]


def stage_order(num_stages: int, microbatch: int, plus: bool) -> list[int]:
    return swapped_stage_order(num_stages, microbatch) if plus else list(range(num_stages))


def sync_edge_copies(stages) -> None:
    """In one process: refresh the partners' copies of the edge layers from the originals."""
    S = len(stages)
    with torch.no_grad():
        for st in stages:
            if st.embed_copy is not None:
                for c, o in zip(st.embed_copy.parameters(), stages[0].embed.parameters()):
                    c.copy_(o)
            if st.head_copy is not None:
                for c, o in zip(st.head_copy.parameters(), stages[S - 1].head.parameters()):
                    c.copy_(o)


def train_step_local(stages, opts, scheds, seed: int, step: int, microbatches: int = 1, plus: bool = False):
    """One training step of the whole pipeline in one process (the same order of stages,
    clipping and updates as the distributed loop below). Returns (mean loss, clipped grad
    norm of every stage)."""
    S, loss_fn, total = len(stages), nn.CrossEntropyLoss(), 0.0
    for o in opts:
        o.zero_grad(set_to_none=True)
    for j in range(microbatches):
        x, y = batch(seed, step, j)
        h = stages[0].embed(x)
        for s in stage_order(S, step * microbatches + j, plus):
            h = stages[s].run_block(h)
        loss = loss_fn(stages[S - 1].head(h).reshape(-1, VOCAB), y.reshape(-1))
        (loss / microbatches).backward()
        total += float(loss.detach())
    norms = []
    for st, o, sc in zip(stages, opts, scheds):
        norms.append(float(torch.clamp(nn.utils.clip_grad_norm_(st.trainable(), CLIP), max=CLIP)))
        o.step()
        sc.step()
    if plus:
        sync_edge_copies(stages)
    return total / microbatches, norms


# -- the distributed loop ------------------------------------------------------------------

def _emit(rec: dict) -> None:
    from snapshotd_tools.demo.events import emit

    emit(rec)


def _flat(mod: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in mod.parameters()])


def _unflat(mod: nn.Module, flat: torch.Tensor) -> None:
    k = 0
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(flat[k:k + p.numel()].view_as(p))
            k += p.numel()


def _sync_edge_copies_dist(stage: Stage) -> None:
    """Send the edge layers to the swap partners' copies (CheckFree+), point to point."""
    r, S = stage.index, stage.num_stages
    reqs, recvs = [], []
    if r == 0:
        reqs.append(dist.isend(_flat(stage.embed), 1))
    if r == S - 1:
        reqs.append(dist.isend(_flat(stage.head), S - 2))
    for src, mod in ((0, stage.embed_copy), (S - 1, stage.head_copy)):
        if mod is not None:
            buf = torch.empty(sum(p.numel() for p in mod.parameters()))
            reqs.append(dist.irecv(buf, src))
            recvs.append((mod, buf))
    for q in reqs:
        q.wait()
    for mod, buf in recvs:
        _unflat(mod, buf)


def _pipeline_step(stage: Stage, seed: int, step: int, microbatches: int, plus: bool) -> float:
    """Forward and backward of every micro-batch of one step along the hops
    embed(0) -> block(order[0]) -> ... -> block(order[-1]) -> head(S-1); returns the mean
    loss on rank S-1 (0 elsewhere)."""
    r, S, loss_fn, total = stage.index, stage.num_stages, nn.CrossEntropyLoss(), 0.0
    shape = (BATCH, SEQ, D)
    for j in range(microbatches):
        hops = [0] + stage_order(S, step * microbatches + j, plus) + [S - 1]
        last = len(hops) - 1
        mine = [k for k, owner in enumerate(hops) if owner == r]
        acts: dict[int, tuple] = {}
        x, y = batch(seed, step, j)
        for k in mine:  # forward
            if k == 0:
                inp, out = None, stage.embed(x)
            else:
                prev = hops[k - 1]
                if prev == r:
                    inp = acts[k - 1][1].detach().requires_grad_(True)
                else:
                    inp = torch.empty(shape)
                    dist.recv(inp, prev)
                    inp.requires_grad_(True)
                if k == last:
                    out = loss_fn(stage.head(inp).reshape(-1, VOCAB), y.reshape(-1))
                else:
                    out = stage.run_block(inp)
            acts[k] = (inp, out)
            if k < last and hops[k + 1] != r:
                dist.send(out.detach().contiguous(), hops[k + 1])
        for k in reversed(mine):  # backward
            inp, out = acts[k]
            if k == last:
                (out / microbatches).backward()
                total += float(out.detach())
            else:
                nxt = hops[k + 1]
                if nxt == r:
                    g = acts[k + 1][0].grad
                else:
                    g = torch.empty(shape)
                    dist.recv(g, nxt)
                out.backward(g)
            if k > 0 and hops[k - 1] != r:
                dist.send(inp.grad.contiguous(), hops[k - 1])
    return total / microbatches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True, help="this process's rank = its stage index")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks = stages (>= 2)")
    p.add_argument("--master-port", type=int, required=True, help="gloo rendezvous port on 127.0.0.1")
    p.add_argument("--socket", default=None, help="this rank's snapshotd daemon socket (default: $SNAPSHOTD_SOCKET)")
    p.add_argument("--no-snapshot", action="store_true", help="train without snapshotd (a reference run)")
    p.add_argument("--steps", type=int, default=20, help="train until this step (default 20)")
    p.add_argument("--job", default="pp", help="snapshotd job id (default pp)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None, help="write losses and restore info as JSON here")
    p.add_argument("--checkfree", action="store_true", help="enable the CheckFree restore fallback")
    p.add_argument("--checkfree-plus", action="store_true",
                   help="CheckFree+ (implies --checkfree): swapped order on odd micro-batches, edge-layer "
                        "copies on the swap partners, lost edge stages rebuilt as copies")
    p.add_argument("--microbatches", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--lr-scale", type=float, default=1.1, help="LR multiplier of a rebuilt stage (default 1.1)")
    p.add_argument("--restart-warmup", action="store_true", help="a rebuilt stage restarts its LR warm-up")
    p.add_argument("--peer-sockets", default=None,
                   help="comma-separated daemon sockets by rank: where CheckFree fetches "
                        "neighbours' shards when the local daemon cannot open them")
    p.add_argument("--gloo-timeout-s", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.world_size < 2 or not 0 <= a.rank < a.world_size or a.microbatches < 1:
        p.error("need --world-size >= 2, 0 <= --rank < --world-size and --microbatches >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[rank {a.rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    # (no torch.use_deterministic_algorithms: its first call costs seconds of imports, and these
    # CPU kernels on one thread are deterministic anyway)
    r, S, plus = a.rank, a.world_size, a.checkfree_plus
    stage, opt, sched = build(r, S, a.seed, plus)

    from snapshotd.core.checkfree import CheckFreeSettings
    from snapshotd.wire.errors import SnapshotdError
    from snapshotd_client import Snapshotter

    sources = None
    if a.peer_sockets:
        sources = {i: s for i, s in enumerate(a.peer_sockets.split(",")) if s}
    settings = None
    if a.checkfree or plus:
        settings = CheckFreeSettings(lr_scale=a.lr_scale, restart_warmup=a.restart_warmup, checkfree_plus=plus)
    snap, start = None, 0
    if not a.no_snapshot:
        snap = Snapshotter(stage, opt, lr_scheduler=sched, job_id=a.job, socket_path=a.socket, rank=r,
                           world_size=S, local_world_size=1, on_daemon_unavailable="raise", pipeline_stage=(r, S),
                           edge_layers=stage.edge_layers, edge_copies=stage.edge_copies, checkfree=settings,
                           checkfree_sources=sources)
        try:  # before joining the group: a rank that cannot restore says why at once
            start = snap.restore()
        except SnapshotdError as exc:
            _emit({"event": "restore_failed", "rank": r, "error": str(exc)})
            snap.close()
            return EXIT_RESTORE_FAILED
    approximate = snap is not None and snap.restored_approximate
    method = (snap.restored_method if snap is not None else None) or "none"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.master_port}", rank=r, world_size=S,
                            timeout=datetime.timedelta(seconds=a.gloo_timeout_s))
    starts = [None] * S
    dist.all_gather_object(starts, start)
    if len(set(starts)) != 1:
        raise SystemExit(f"ranks restored different steps: {starts}")
    _emit({"event": "restored", "rank": r, "step": start, "approximate": approximate, "method": method})
    if plus:
        _sync_edge_copies_dist(stage)
    losses = []
    for step in range(start, a.steps):
        opt.zero_grad(set_to_none=True)
        loss_v = _pipeline_step(stage, a.seed, step, a.microbatches, plus)
        norm = nn.utils.clip_grad_norm_(stage.trainable(), CLIP)
        if snap is not None:
            snap.record_grad_norm(torch.clamp(norm, max=CLIP))  # the norm after clipping
        opt.step()
        sched.step()
        if plus:
            _sync_edge_copies_dist(stage)
        lt = torch.tensor([loss_v])
        dist.broadcast(lt, S - 1)
        loss_v = float(lt.item())
        losses.append(loss_v)
        if snap is not None:
            snap.save(step + 1)
        _emit({"event": "step", "rank": r, "step": step + 1, "loss": round(loss_v, 6),
               "grad_norm": round(float(norm), 6)})
    if snap is not None:
        snap.wait(60)
        snap.close()
    dist.barrier()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rank": r, "start": start, "approximate": approximate, "method": method,
                       "losses": losses}, f)
    _emit({"event": "done", "rank": r})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
