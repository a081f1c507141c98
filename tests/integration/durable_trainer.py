"""One rank of the durable-tier cluster test (tests/integration/test_durable_cluster.py).

``--mode train``: trains a small model (each rank its own data, so every rank's state
differs), snapshots every step, prints one JSON line per step with a digest of the
model and optimizer state. ``--mode restore``: ``Snapshotter.restore()`` and prints the
step, the rung it used (``restored_method``) and the same digest, or the error.
gloo on CPU; one rank per node of a local cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from snapshotd_client import Snapshotter


def digest(model, opt) -> str:
    h = hashlib.sha256()
    for t in list(model.state_dict().values()) + [v for s in opt.state_dict()["state"].values()
                                                   for v in s.values() if torch.is_tensor(v)]:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--socket", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--durable-url", required=True)
    p.add_argument("--mode", choices=("train", "restore"), required=True)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.master_port))
    dist.init_process_group("gloo", rank=a.rank, world_size=a.world_size)
    torch.manual_seed(100 + a.rank)
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = Snapshotter(model, opt, job_id=a.job, socket_path=a.socket, rank=a.rank,
                       world_size=a.world_size, local_world_size=1, durable_url=a.durable_url,
                       on_daemon_unavailable="raise")
    try:
        if a.mode == "train":
            g = torch.Generator().manual_seed(a.rank)
            for step in range(1, a.steps + 1):
                loss = model(torch.randn(16, 24, generator=g)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                snap.save(step).result(60)
                print(json.dumps({"step": step, "digest": digest(model, opt)}), flush=True)
            dist.barrier()
        else:
            try:
                step = snap.restore()
                print(json.dumps({"restored": step, "method": snap.restored_method,
                                  "digest": digest(model, opt)}), flush=True)
            except Exception as exc:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    finally:
        snap.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
