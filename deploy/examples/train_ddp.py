"""Example training script for torchrun: data-parallel (DDP, gloo) with a snapshot every step.

    torchrun --nnodes=N --nproc-per-node=P ... train_ddp.py --steps 40 [--crash-at 15]

It is the smallest complete use of the client in a launcher-managed job, and what the
Slurm example (deploy/slurm/snapshotd.sbatch) and the Kubernetes example Job run:

- torchrun sets RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the rendezvous; the Snapshotter
  takes the rank and world size from torch.distributed and the ranks per node from
  $LOCAL_WORLD_SIZE, the daemon socket from $SNAPSHOTD_SOCKET, the job id from
  $SNAPSHOTD_JOB_ID and the token (when the daemon has one) from $SNAPSHOTD_TOKEN.
- ``restore()`` at start returns the step of the last committed snapshot (0 on a fresh
  start); the loop resumes from there.
- ``--crash-at S``: on a fresh start only (nothing was restored), once step S is
  committed, rank 0 SIGKILLs itself and torchrun stops the other ranks. Launched again
  (the Slurm example retries torchrun; a Kubernetes Job retries its pod), every rank
  resumes from step S instead of step 0. This is how the examples show "killed,
  restarted, restored" without a real fault. torchrun's own ``--max-restarts=N`` works
  too (the workers are restarted in place and restore the same way), provided torchrun
  runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in its environment: without it,
  torch >= 2.5 hands the restarted workers the agent's TCPStore still holding the failed
  attempt's keys, and gloo's ``init_process_group`` connects to the dead workers' ports
  and hangs or fails (docs/INTEGRATIONS.md; tests/integration/test_torchrun.py).

Each rank stores only its 1/W slice of the replicated model and optimizer
(``shard_replicated``), plus its own RNG and data position. Prints one JSON line per
event: ``restored`` (every rank), ``step`` (rank 0), ``crash`` and ``done`` (every rank,
with a digest of the final model and optimizer; all ranks must agree).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from snapshotd_tools.demo.trainer import DataStream, TinyLM, digest_state
from snapshotd_client import Snapshotter


def emit(**rec) -> None:
    print(json.dumps(rec), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="train up to this step (default 40)")
    p.add_argument("--crash-at", type=int, default=0,
                   help="on a fresh start only: rank 0 SIGKILLs itself once step S is committed (0: never)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--require-daemon", action="store_true",
                   help="fail when the daemon is unreachable (default: warn and train on)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// rendezvous, set up by torchrun
    rank = dist.get_rank()

    torch.manual_seed(a.seed)  # identical replicas; DDP also broadcasts rank 0's weights
    model = TinyLM()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = DataStream(a.seed + 1 + rank)  # each rank its own batches
    torch.manual_seed(a.seed + 1000 + rank)  # and its own dropout masks

    snap = Snapshotter(model, opt, lr_scheduler=sched, extra_state={"data": data},
                       shard_replicated=True,
                       on_daemon_unavailable="raise" if a.require_daemon else "warn")
    start = snap.restore()
    emit(event="restored", rank=rank, step=start, data_position=data.position)

    loss_fn = nn.CrossEntropyLoss()
    for step in range(start, a.steps):
        x, y = data.next()
        loss = loss_fn(ddp(x).reshape(-1, 64), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients
        opt.step()
        sched.step()
        snap.save(step + 1)
        if rank == 0:
            emit(event="step", step=step + 1, loss=round(loss.detach().item(), 5),
                 blocking_ms=round(snap.last_blocking_s * 1e3, 3))
        if start == 0 and step + 1 == a.crash_at:
            snap.wait()  # every rank handed step S over ...
            dist.barrier()
            if rank == 0:  # ... and it committed: then the "fault"
                deadline = time.monotonic() + 30
                while (snap.client.list_versions(snap.cfg.job_id).latest_committed_version < step + 1
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                emit(event="crash", rank=rank, step=step + 1)
                os.kill(os.getpid(), signal.SIGKILL)
            dist.barrier()  # the other ranks wait here until torchrun stops them

    snap.close()
    digest = digest_state(model, opt)
    dist.barrier()
    dist.destroy_process_group()
    emit(event="done", rank=rank, step=a.steps, start=start, digest=digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
