"""Same-host ingest: a trainer process pushes its state into a real daemon.

Measures, side by side in one run (medians over --repeats snapshots, after warm-up):
  * warm copy   - one torch copy_ of the whole state into an already-touched buffer
                  (the physical floor of any snapshot that copies the state once);
  * blocking    - how long ``Snapshotter.save()`` holds the training loop;
  * ingest      - save() plus the hand-off (daemon checksums and adopts the segment),
                  i.e. the time until the daemon holds the snapshot.
Targets (issue 2): ingest >= 6 GB/s; blocking <= 1.2x warm copy. 1 GB = 1e9 bytes.

    python -m bench.bench_ingest --size-mib 1024 --repeats 7 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid

import torch

from snapshotd.wire import shm


class StateModel(torch.nn.Module):
    """Parameters totalling ``size`` bytes, in tensors of at most ``tensor_bytes``."""

    def __init__(self, size: int, tensor_bytes: int):
        super().__init__()
        n_full, rest = divmod(size, tensor_bytes)
        sizes = [tensor_bytes] * n_full + ([rest] if rest else [])
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(max(1, s // 4))) for s in sizes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="state size (default 1024)")
    p.add_argument("--tensor-mib", type=int, default=64, help="bytes per tensor (default 64)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.size_mib, a.tensor_mib, a.repeats, a.warmup = 8, 2, 3, 1
    from snapshotd_tools.demo.single_node import start_daemon
    from snapshotd_client import Snapshotter

    size = a.size_mib << 20
    model = StateModel(size, a.tensor_mib << 20)
    state_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    workdir = tempfile.mkdtemp(prefix="bench-ingest-")
    node = "bench" + uuid.uuid4().hex[:6]
    daemon, sock = start_daemon(workdir, node, budget=f"{4 * size + (64 << 20)}")
    try:
        snap = Snapshotter(model, job_id="bench", socket_path=sock, rank=0, world_size=1)
        # Warm copy baseline: one copy of every parameter into touched, reused buffers.
        dst = [torch.empty_like(t) for t in model.parameters()]
        for d in dst:
            d.fill_(0)
        copy_s, blocking_s, ingest_s = [], [], []
        step = 0
        for i in range(a.warmup + a.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for d, t in zip(dst, model.parameters()):
                    d.copy_(t)
            t1 = time.perf_counter()
            step += 1
            snap.save(step)
            blk = snap.last_blocking_s
            st = snap.wait()
            t2 = time.perf_counter()
            if not st.committed:
                raise RuntimeError(f"snapshot {step} did not commit")
            if i >= a.warmup:
                copy_s.append(t1 - t0)
                blocking_s.append(blk)
                ingest_s.append(t2 - t1)
        snap.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        for name in shm.list_segments(f"snapshotd.{node}."):
            shm.unlink(name)
    med = statistics.median
    res = {
        "state_bytes": state_bytes, "tensors": len(dst), "repeats": a.repeats,
        "torch_threads": torch.get_num_threads(),
        "warm_copy_ms": med(copy_s) * 1e3, "blocking_ms": med(blocking_s) * 1e3,
        "ingest_ms": med(ingest_s) * 1e3,
        "warm_copy_gbps": state_bytes / med(copy_s) / 1e9,
        "ingest_gbps": state_bytes / med(ingest_s) / 1e9,
        "blocking_over_copy": med(blocking_s) / med(copy_s),
    }
    print(f"state {state_bytes / 2**20:.0f} MiB in {len(dst)} tensors, torch threads "
          f"{res['torch_threads']}, medians of {a.repeats}")
    print(f"  warm copy (floor)   {res['warm_copy_ms']:8.1f} ms  {res['warm_copy_gbps']:6.2f} GB/s")
    print(f"  save() blocking     {res['blocking_ms']:8.1f} ms  = {res['blocking_over_copy']:.2f}x warm copy (target <= 1.2x)")
    print(f"  ingest (until held) {res['ingest_ms']:8.1f} ms  {res['ingest_gbps']:6.2f} GB/s (target >= 6)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
