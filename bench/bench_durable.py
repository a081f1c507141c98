"""The durable tier: flush throughput against a plain write, and its effect on training.

1. **Flush vs plain write**, side by side, alternating, same bytes, same folder: the
   flusher's ``flush`` of one captured version (a Snapshotter-shaped shard of
   ``--size-mib``: parameters and AdamW moments in tensors of ``--tensor-mib``; DCP
   layout, torch.save per tensor, xxh3 of every file, fsync + rename, part, .metadata and
   index) against writing the same number of bytes to one file with write + fsync. The
   capture (the copy out of shared memory, verified) is timed on its own.
2. **Training step time** with and without flushing: a real daemon per run, a small
   model snapshotted every step by ``Snapshotter``; one daemon flushes every
   ``--every`` versions (``--durable-rate`` as given), the other does not. Median step
   time (forward, backward, optimizer, save) of each, after warm-up.

``python -m bench.bench_durable [--size-mib 256] [--json out.json]``; ``--quick`` for tiny
sizes. Times in seconds, 1 MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_durable", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=float, default=256.0, help="state of the flushed version")
    p.add_argument("--tensor-mib", type=float, default=32.0, help="largest tensor")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--train-mib", type=float, default=64.0, help="state of the training loop's model")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=5, help="flush every N versions in the training run")
    p.add_argument("--durable-rate", default="0", help="--durable-rate of the flushing daemon")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.size_mib, a.tensor_mib, a.repeats = 2.0, 0.5, 1
        a.train_mib, a.steps, a.every = 1.0, 8, 2
    return a


def _shard(size_bytes: int, tensor_bytes: int):
    """(manifest, payload) shaped like a Snapshotter's shard: replicated tensors back to back."""
    from snapshotd.wire import manifest as mf
    from snapshotd.wire._proto import snapshotd_pb2 as pb

    m = pb.ShardManifest(job_id="bench", rank=0, version=1, block_size_bytes=mf.DEFAULT_BLOCK_SIZE_BYTES,
                         checksum_algo="xxh3_64", meta_json="{}")
    off, i = 0, 0
    while off < size_bytes:
        n = min(tensor_bytes, size_bytes - off) // 4 * 4
        if n <= 0:
            break
        m.replicated_tensors.add(name=f"model/p{i}", dtype="float32", shape=[n // 4], offset=off, nbytes=n)
        off += n
        i += 1
    m.replicated_bytes = m.slice_bytes = m.payload_bytes = off
    buf = np.random.default_rng(0).integers(0, 255, off, dtype=np.uint8)
    m.block_checksums.extend(mf.block_checksums(buf, off, m.block_size_bytes))
    return m, buf


class _OneShard:
    def __init__(self, m, buf):
        self.m, self.buf = m, buf

    def jobs_summary(self):
        return {"bench": {"committed": self.m.version, "world_size": 1, "local_world_size": 1}}

    def local_shards(self, job, version):
        from types import SimpleNamespace

        return [(0, self.m, SimpleNamespace(buf=self.buf))] if version == self.m.version else []

    def committed_version(self, job):
        return self.m.version


def _plain_write(path: str, buf: np.ndarray, chunk: int = 8 * MiB) -> None:
    with open(path, "wb") as f:
        mv = memoryview(buf)
        for off in range(0, len(mv), chunk):
            f.write(mv[off:off + chunk])
        f.flush()
        os.fsync(f.fileno())


def bench_flush(a, root: str) -> dict:
    from snapshotd.node.durable import DurableConfig, DurableFlusher

    m, buf = _shard(int(a.size_mib * MiB), int(a.tensor_mib * MiB))
    store = _OneShard(m, buf)
    flush_s, plain_s, capture_s, written = [], [], [], 0
    from snapshotd.node import durable_dcp

    durable_dcp.warm_up()  # the flusher's writer thread does this when the daemon starts
    for rep in range(a.repeats):
        m.version = rep + 1
        url = os.path.join(root, f"flush-{rep}")
        f = DurableFlusher(store, DurableConfig(url=url, every_versions=1, keep=1), "bench")
        t0 = time.perf_counter()
        cap = f.capture("bench", m.version, 1)
        capture_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert f.flush(cap) is True
        flush_s.append(time.perf_counter() - t0)
        written = f.stats["bytes"]
        path = os.path.join(root, f"plain-{rep}.bin")
        t0 = time.perf_counter()
        _plain_write(path, buf)
        plain_s.append(time.perf_counter() - t0)
        shutil.rmtree(url, ignore_errors=True)
        os.unlink(path)
    n = int(buf.nbytes)
    fl, pl, ca = statistics.median(flush_s), statistics.median(plain_s), statistics.median(capture_s)
    return {"bytes": n, "file_bytes": written, "flush_s": fl, "plain_write_s": pl, "capture_s": ca,
            "flush_mib_s": n / MiB / fl, "plain_mib_s": n / MiB / pl, "capture_mib_s": n / MiB / ca,
            "flush_over_plain": fl / pl, "runs": {"flush": flush_s, "plain": plain_s, "capture": capture_s}}


def _daemon(d: str, extra: list[str]):
    sock, ready = os.path.join(d, "d.sock"), os.path.join(d, "ready.json")
    node = "b" + uuid.uuid4().hex[:8]
    log = open(os.path.join(d, "daemon.log"), "ab")
    p = subprocess.Popen([sys.executable, "-m", "snapshotd.node", "serve", "--node-id", node,
                          "--state-dir", os.path.join(d, "state"), "--socket", sock,
                          "--memory-budget-bytes", "2GiB", "--ready-file", ready, *extra],
                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"daemon did not start: {open(os.path.join(d, 'daemon.log')).read()[-2000:]}")
        time.sleep(0.05)
    return p, sock, node


def _train_run(a, d: str, extra: list[str]) -> dict:
    from snapshotd.wire import shm
    from snapshotd_client import Snapshotter

    os.makedirs(d, exist_ok=True)
    p, sock, node = _daemon(d, extra)
    try:
        torch.manual_seed(0)
        width = max(8, int((a.train_mib * MiB / 12) ** 0.5))  # params + 2 AdamW moments
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(32, width)
        times = []
        with Snapshotter(model, opt, job_id="bench-train", socket_path=sock) as snap:
            for step in range(1, a.steps + 1):
                t0 = time.perf_counter()
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                fut = snap.save(step)
                if fut is not None:
                    fut.result(60)
                times.append(time.perf_counter() - t0)
        warm = times[min(3, len(times) - 1):]
        return {"median_step_s": statistics.median(warm), "mean_step_s": statistics.fmean(warm),
                "steps": len(warm)}
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for name in shm.list_segments(f"snapshotd.{node}."):
            shm.unlink(name)


def bench_train(a, root: str) -> dict:
    url = os.path.join(root, "train-durable")
    off = _train_run(a, os.path.join(root, "t-off"), [])
    on = _train_run(a, os.path.join(root, "t-on"), ["--durable-url", url, "--durable-every-versions",
                                                     str(a.every), "--durable-rate", a.durable_rate])
    from snapshotd.wire import durable_store as ds

    done = ds.complete_versions(ds.open_store(url), "bench-train")
    return {"without_flush": off, "with_flush": on, "flushed_versions": done,
            "step_time_ratio": on["median_step_s"] / off["median_step_s"]}


def main(argv=None) -> int:
    a = parse_args(argv)
    root = a.dir or tempfile.mkdtemp(prefix="bench-durable-")
    os.makedirs(root, exist_ok=True)
    try:
        fl = bench_flush(a, root)
        print(f"durable flush of {fl['bytes'] / MiB:.0f} MiB to {root} (median of {a.repeats}): "
              f"flush {fl['flush_s']:.3f} s ({fl['flush_mib_s']:.0f} MiB/s), plain write+fsync "
              f"{fl['plain_write_s']:.3f} s ({fl['plain_mib_s']:.0f} MiB/s): flush/plain = "
              f"{fl['flush_over_plain']:.2f}x; capture (copy out + verify) {fl['capture_s']:.3f} s "
              f"({fl['capture_mib_s']:.0f} MiB/s)")
        doc = {"bench": "durable", "dir": root, "flush": fl}
        if not a.skip_train:
            tr = bench_train(a, root)
            print(f"training step ({a.train_mib:g} MiB state, snapshot every step): median "
                  f"{tr['without_flush']['median_step_s'] * 1e3:.1f} ms without flushing, "
                  f"{tr['with_flush']['median_step_s'] * 1e3:.1f} ms flushing every {a.every} versions "
                  f"(rate {a.durable_rate}): {tr['step_time_ratio']:.2f}x; durable versions "
                  f"{tr['flushed_versions']}")
            doc["train"] = tr
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
