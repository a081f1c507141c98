"""The durable tier: flush throughput against a plain write, and its effect on training.

1. **Flush vs plain write**, side by side, alternating, same bytes, same folder: the
   flusher's ``flush`` of one captured version (a Snapshotter-shaped shard of
   ``--size-mib``: parameters and AdamW moments in tensors of ``--tensor-mib``; DCP
   layout, torch.save per tensor, xxh3 of every file, fsync + rename, part, .metadata and
   index) against writing the same number of bytes to one file with write + fsync. The
   capture (the copy out of shared memory, verified) is timed on its own.
2. **Training step time** with and without flushing, side by side: two real daemons, one
   flushing every ``--every`` versions (``--durable-rate`` as given), one not; one process
   trains a small model (``--train-mib`` of parameters + AdamW moments) and snapshots every
   step with a ``Snapshotter`` on each daemon in alternating rounds of ``--round-steps``
   steps (``--rounds`` of each, the order flipping every round). Per mode: median step time
   (forward, backward, optimizer, ``save()``; and of ``save()`` alone, which includes waiting
   for the last hand-off to the daemon), and CPU seconds per step from /proc (the
   trainer process, all threads, plus its daemon; a loaded machine distorts these less
   than step times). After an "on" round the bench waits for its last flush to complete
   (reported as the flush tail) so no flush runs into an "off" round.

``python -m bench.bench_durable [--size-mib 256] [--json out.json]``; ``--quick`` for tiny
sizes; ``--skip-flush`` / ``--skip-train`` for one part. Times in seconds, 1 MiB = 2**20
bytes. The flush part holds the state twice (the shard and its capture): about 2.3x
``--size-mib`` of memory.
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
    p.add_argument("--batch", type=int, default=32, help="the training loop's batch")
    p.add_argument("--rounds", type=int, default=6, help="rounds of each mode (off, on), alternating")
    p.add_argument("--round-steps", type=int, default=20, help="training steps per round")
    p.add_argument("--every", type=int, default=10, help="flush every N versions in the training run")
    p.add_argument("--durable-rate", default="0", help="--durable-rate of the flushing daemon")
    p.add_argument("--compare-src", default=None, metavar="DIR", help="also train against a flushing "
                   "daemon run from the checkout DIR (e.g. the code before a change), side by side")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-flush", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.size_mib, a.tensor_mib, a.repeats = 2.0, 0.5, 1
        a.train_mib, a.rounds, a.round_steps, a.every = 1.0, 1, 4, 2
    if a.every < 2 or a.round_steps < a.every:
        p.error("--every must be >= 2 and --round-steps >= --every")
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
    """Median wall and CPU seconds (this process) of the flush and of the plain write, the
    order alternating; the capture once into fresh memory, once into the spare of the
    last one (what a job's next capture gets within ``spare_s``)."""
    from snapshotd.node import durable_dcp
    from snapshotd.node.durable import DurableConfig, DurableFlusher

    m, buf = _shard(int(a.size_mib * MiB), int(a.tensor_mib * MiB))
    store = _OneShard(m, buf)
    runs = {k: [] for k in ("flush", "plain", "flush_cpu", "plain_cpu", "capture", "capture_reused",
                            "capture_cpu", "capture_reused_cpu")}
    written = 0
    durable_dcp.warm_up()  # the flusher's writer thread does this when the daemon starts
    for rep in range(-1, a.repeats):  # -1: warms up (torch.save's first call, the folders)
        m.version = rep + 2
        url = os.path.join(root, f"flush-{rep}")
        f = DurableFlusher(store, DurableConfig(url=url, every_versions=1, keep=1), "bench")
        t0, c0 = time.perf_counter(), time.process_time()
        cap = f.capture("bench", m.version, 1)
        t1, c1 = time.perf_counter(), time.process_time()
        f.give_back(cap)
        cap = f.capture("bench", m.version, 1)
        t2, c2 = time.perf_counter(), time.process_time()
        took = {"capture": t1 - t0, "capture_reused": t2 - t1, "capture_cpu": c1 - c0,
                "capture_reused_cpu": c2 - c1}

        def flush():
            assert f.flush(cap) is True

        def plain():
            _plain_write(os.path.join(root, f"plain-{rep}.bin"), buf)

        for name, fn in ((("flush", flush), ("plain", plain)) if rep % 2 else (("plain", plain), ("flush", flush))):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            took[name], took[name + "_cpu"] = time.perf_counter() - w0, time.process_time() - c0
        written = f.stats["bytes"]
        if rep >= 0:
            for k, v in took.items():
                runs[k].append(v)
        shutil.rmtree(url, ignore_errors=True)
        os.unlink(os.path.join(root, f"plain-{rep}.bin"))
    n = int(buf.nbytes)
    md = {k: statistics.median(v) for k, v in runs.items()}
    return {"bytes": n, "file_bytes": written, "flush_s": md["flush"], "plain_write_s": md["plain"],
            "flush_cpu_s": md["flush_cpu"], "plain_cpu_s": md["plain_cpu"], "capture_s": md["capture"],
            "capture_reused_s": md["capture_reused"], "capture_cpu_s": md["capture_cpu"],
            "capture_reused_cpu_s": md["capture_reused_cpu"], "flush_mib_s": n / MiB / md["flush"],
            "plain_mib_s": n / MiB / md["plain"], "capture_mib_s": n / MiB / md["capture"],
            "flush_over_plain": md["flush"] / md["plain"], "runs": runs}


def _daemon(d: str, extra: list[str], src: str = REPO):
    """Start a daemon in folder ``d`` from the checkout ``src``: (process, socket, node id,
    ready file); see _ready."""
    os.makedirs(d, exist_ok=True)
    sock, ready = os.path.join(d, "d.sock"), os.path.join(d, "ready.json")
    node = "b" + uuid.uuid4().hex[:8]
    with open(os.path.join(d, "daemon.log"), "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "snapshotd.node", "serve", "--node-id", node,
                              "--state-dir", os.path.join(d, "state"), "--socket", sock,
                              "--memory-budget-bytes", "2GiB", "--ready-file", ready, *extra],
                             stdout=log, stderr=subprocess.STDOUT, cwd=src)
    return p, sock, node, ready


def _ready(d, timeout_s: float = 120.0) -> None:
    p, ready = d[0], d[3]
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(ready):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            log = os.path.join(os.path.dirname(ready), "daemon.log")
            raise RuntimeError(f"daemon did not start: {open(log).read()[-2000:]}")
        time.sleep(0.05)


def _stop(p, node: str) -> None:
    from snapshotd.wire import shm

    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for name in shm.list_segments(f"snapshotd.{node}."):
        shm.unlink(name)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` used so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drain(store, job: str, version: int, timeout_s: float) -> float:
    """Wait until ``version`` of ``job`` or a newer one is complete on the durable tier (a
    due version whose slot was reused before its capture is passed over for the next
    one); seconds waited."""
    from snapshotd.wire import durable_store as ds

    t0 = time.monotonic()
    while max(ds.complete_versions(store, job), default=0) < version:
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"durable v{version} of {job} not complete after {timeout_s:g} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def bench_train(a, root: str) -> dict:
    """Alternating rounds of ``--round-steps`` training steps, each step snapshotted, into a
    daemon without the durable tier ("off") and one flushing every ``--every`` versions
    ("on"); the same process, model and optimizer. Per step: wall time and this process's
    CPU (every thread: the Snapshotter's hand-off too); per round: the daemon's CPU from
    /proc, for "on" until the round's last due version is complete on disk (the drain:
    so no flush runs into an "off" round; its time is reported, not counted as steps).
    Versions run so the round's flushes start a quarter and three quarters in.
    ``--compare-src DIR``: a third mode, "on-src", flushing from a daemon run from the
    checkout DIR (the code before a change), the three modes' order rotating each round."""
    from snapshotd.wire import durable_store as ds
    from snapshotd_client import Snapshotter

    n = a.every
    urls = {m: os.path.join(root, f"train-durable-{m}") for m in ("on", "on-src")}
    flags = ["--durable-every-versions", str(n), "--durable-rate", a.durable_rate]
    modes = [("off", [], REPO), ("on", ["--durable-url", urls["on"], *flags], REPO)]
    if a.compare_src:
        modes.append(("on-src", ["--durable-url", urls["on-src"], *flags], os.path.abspath(a.compare_src)))
    daemons = {}
    try:
        for mode, extra, src in modes:
            daemons[mode] = _daemon(os.path.join(root, f"t-{mode}"), extra, src)  # all start at once
        for d in daemons.values():
            _ready(d)
        stores = {m: ds.open_store(u) for m, u in urls.items() if m in daemons}
        torch.manual_seed(0)
        width = max(8, int((a.train_mib * MiB / 24) ** 0.5))  # 2 w x w layers, float32, + 2 AdamW moments
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(a.batch, width)
        snaps = {m: Snapshotter(model, opt, job_id=f"bench-{m}", socket_path=daemons[m][1]) for m in daemons}
        version = dict.fromkeys(daemons, 0)
        res = {m: {"step_s": [], "cpu_s": [], "save_s": [], "daemon_cpu_s": 0.0, "steps": 0, "drain_s": []}
               for m in daemons}

        def steps(mode: str, count: int, rec) -> None:
            for _ in range(count):
                version[mode] += 1
                t0, c0 = time.perf_counter(), time.process_time()
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                snaps[mode].save(version[mode])
                if rec is not None:
                    rec["step_s"].append(time.perf_counter() - t0)
                    rec["cpu_s"].append(time.process_time() - c0)
                    rec["save_s"].append(snaps[mode].last_blocking_s)  # incl. waiting for the last hand-off
            snaps[mode].wait(120)

        def last_due(mode: str) -> int:
            return version[mode] // n * n

        order = list(daemons)
        for mode in order:  # warm-up: one flush, and the rounds' flushes land mid-round
            steps(mode, n + n // 2, None)
            if mode in stores:
                _drain(stores[mode], f"bench-{mode}", last_due(mode), 300)
        for r in range(a.rounds):
            for mode in order[r % len(order):] + order[:r % len(order)]:
                rec = res[mode]
                pid = daemons[mode][0].pid
                d0 = cpu_s(pid)
                steps(mode, a.round_steps, rec)
                if mode in stores:
                    rec["drain_s"].append(_drain(stores[mode], f"bench-{mode}", last_due(mode), 300))
                rec["daemon_cpu_s"] += cpu_s(pid) - d0
                rec["steps"] += a.round_steps
        for s in snaps.values():
            s.close()
    finally:
        for p, _, node, _ in daemons.values():
            _stop(p, node)
    out = {}
    for mode, rec in res.items():
        k = rec["steps"]
        out[mode] = {"steps": k, "median_step_s": statistics.median(rec["step_s"]),
                     "median_save_s": statistics.median(rec["save_s"]), "mean_save_s": statistics.fmean(rec["save_s"]),
                     "mean_step_s": statistics.fmean(rec["step_s"]),
                     "trainer_cpu_per_step_s": sum(rec["cpu_s"]) / k,
                     "daemon_cpu_per_step_s": rec["daemon_cpu_s"] / k,
                     "cpu_per_step_s": (sum(rec["cpu_s"]) + rec["daemon_cpu_s"]) / k,
                     "drain_s": rec["drain_s"]}
    out["flushed_versions"] = ds.complete_versions(stores["on"], "bench-on")
    out["state_bytes"] = sum(t.numel() * 4 for t in model.parameters()) * 3
    out["step_time_ratio"] = out["on"]["median_step_s"] / out["off"]["median_step_s"]
    out["cpu_ratio"] = out["on"]["cpu_per_step_s"] / out["off"]["cpu_per_step_s"]
    return out


def train_report(a, tr: dict) -> str:
    lines = [f"training: {tr['state_bytes'] / MiB:.0f} MiB state (params + AdamW), a snapshot every step, "
             f"{a.rounds} rounds x {a.round_steps} steps per mode, alternating; flushing every {a.every} "
             f"versions, rate {a.durable_rate}",
             f"{'mode':8s} {'median step ms':>15s} {'save() ms':>10s} {'CPU/step ms':>12s} {'trainer':>8s} "
             f"{'daemon':>7s} {'flush tail s':>13s}"]
    for mode in ("off", "on", "on-src"):
        if mode in tr:
            r = tr[mode]
            tail = f"{statistics.median(r['drain_s']):13.2f}" if r["drain_s"] else f"{'-':>13s}"
            lines.append(f"{mode:8s} {r['median_step_s'] * 1e3:15.1f} {r['median_save_s'] * 1e3:10.1f} "
                         f"{r['cpu_per_step_s'] * 1e3:12.1f} "
                         f"{r['trainer_cpu_per_step_s'] * 1e3:8.1f} {r['daemon_cpu_per_step_s'] * 1e3:7.1f} {tail}")
    lines.append(f"on/off: step time {tr['step_time_ratio']:.2f}x, CPU per step {tr['cpu_ratio']:.2f}x; "
                 f"durable versions kept {tr['flushed_versions']}")
    return "\n".join(lines)


def _machine() -> dict:
    try:
        sys.path.insert(0, REPO)
        from bench.common import machine

        return machine()
    except Exception:  # loaded by path (the smoke test) without the bench package
        return {}


def main(argv=None) -> int:
    a = parse_args(argv)
    root = a.dir or tempfile.mkdtemp(prefix="bench-durable-")
    os.makedirs(root, exist_ok=True)
    doc = {"bench": "durable", "dir": root, "machine": _machine(), "loadavg_start": os.getloadavg()[0]}
    try:
        if not a.skip_flush:
            fl = doc["flush"] = bench_flush(a, root)
            print(f"durable flush of {fl['bytes'] / MiB:.0f} MiB to {root} (median of {a.repeats}, "
                  f"alternating): flush {fl['flush_s']:.3f} s ({fl['flush_mib_s']:.0f} MiB/s, CPU "
                  f"{fl['flush_cpu_s']:.3f} s), plain write+fsync {fl['plain_write_s']:.3f} s "
                  f"({fl['plain_mib_s']:.0f} MiB/s, CPU {fl['plain_cpu_s']:.3f} s): flush/plain = "
                  f"{fl['flush_over_plain']:.2f}x; capture (copy out + verify) {fl['capture_s']:.3f} s "
                  f"(CPU {fl['capture_cpu_s']:.3f} s) into fresh memory, {fl['capture_reused_s']:.3f} s (CPU "
                  f"{fl['capture_reused_cpu_s']:.3f} s) into the last capture's", flush=True)
        if not a.skip_train:
            tr = doc["train"] = bench_train(a, root)
            print(train_report(a, tr), flush=True)
        doc["loadavg_end"] = os.getloadavg()[0]
        print(f"load average {doc['loadavg_start']:.1f} -> {doc['loadavg_end']:.1f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
