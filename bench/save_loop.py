"""CPU per save, trainer and daemon apart: the demo GPT's state saved in a loop (issue 16).

One trainer process, one daemon (a one-node cluster, m=0), the demo's nanoGPT-style model
(n_embd 64, 2 layers: 1.26 MB of parameters + AdamW moments); after 19 warm-up saves,
``save(step); wait()`` ``--saves`` times. Printed as one JSON line: wall time per save,
this process's CPU per save (training and hand-off threads), the daemon's CPU per save
(/proc/PID/task/*/schedstat), and the median time ``save()`` blocked; then the same CPU
per OS thread: the trainer's training thread, its hand-off thread and ZeroMQ's I/O
thread, the daemon's busiest thread and ZeroMQ's I/O thread there.

    python -m bench.save_loop [--saves 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saves", type=int, default=2000)
    a = p.parse_args(argv)
    import torch

    import threading

    from bench.common import proc_cpu_seconds, thread_cpu_delta, thread_cpu_seconds
    from snapshotd_client import Snapshotter
    from snapshotd_tools import localcluster as lc
    from snapshotd_tools.demo.gpt_trainer import GPT, GPTConfig

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench-save-loop-")
    d = os.path.join(work, "c")
    try:
        info = lc.up(d, 1, 0, block_size="1MiB", budget="1GiB")
        sock, dpid = info["nodes"]["n0"]["socket"], info["nodes"]["n0"]["pid"]
        model = GPT(GPTConfig(n_embd=64, n_layer=2, n_head=2, block_size=16, vocab_size=64))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        x, y = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        best = 1.0
        snap = Snapshotter(model, opt, job_id="saveloop", socket_path=sock, rank=0, world_size=1,
                           on_daemon_unavailable="raise",
                           state={"batch": lambda: (x, y), "best_val_loss": lambda: best})
        for s in range(1, 20):
            snap.save(s)
        snap.wait()
        me = os.getpid()
        ho = next(t.native_id for t in threading.enumerate() if t.name == "snapshotd-handoff")
        th0, dth0 = thread_cpu_seconds(me), thread_cpu_seconds(dpid)
        c0, t0, d0 = time.process_time(), time.perf_counter(), proc_cpu_seconds(dpid)
        blocked = []
        for s in range(20, 20 + a.saves):
            b0 = time.perf_counter()
            snap.save(s)
            blocked.append(time.perf_counter() - b0)
            snap.wait()
        n = a.saves
        out = {"saves": n, "per_save_wall_ms": (time.perf_counter() - t0) / n * 1e3,
               "trainer_cpu_ms": (time.process_time() - c0) / n * 1e3,
               "daemon_cpu_ms": (proc_cpu_seconds(dpid) - d0) / n * 1e3,
               "blocking_median_ms": statistics.median(blocked) * 1e3}
        th, dth = thread_cpu_delta(th0, thread_cpu_seconds(me)), thread_cpu_delta(dth0, thread_cpu_seconds(dpid))
        ms = lambda sec: round(sec / n * 1e3, 3)  # noqa: E731
        zmq_io = lambda d: sum(c for name, c in d.values() if name.startswith("ZMQbg/IO"))  # noqa: E731
        out["trainer_threads_ms"] = {"training": ms(th.get(me, ("", 0.0))[1]),
                                     "handoff": ms(th.get(ho, ("", 0.0))[1]), "zmq_io": ms(zmq_io(th))}
        out["daemon_threads_ms"] = {"busiest": ms(max((c for _, c in dth.values()), default=0.0)),
                                    "zmq_io": ms(zmq_io(dth))}
        snap.close()
        print(json.dumps(out), flush=True)
    finally:
        if os.path.exists(os.path.join(d, "cluster.json")):
            lc.down(d)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
