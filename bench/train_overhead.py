"""Training overhead: step time of the CPU training example with and without snapshots.

The model is the demo's TinyLM (``snapshotd_tools.demo.trainer``) in a bigger configuration
(vocab 4096, d_model 256, 2 layers, sequence 32, batch 8: about 2.7 M parameters, ~32 MB
of state with AdamW), trained on the demo's counting task with one torch thread, as
the demo trainer does. Per configuration the same seed and the same number of steps,
interleaved in rounds of 10 steps (rotating order); the time of a step includes its snapshot call (and,
with snapshots, the hand-off thread and the daemon competing for this machine's cores):

  never                     no snapshots;
  snapshotd every step      Snapshotter.save(step) after every optimizer step;
  snapshotd every 10 steps
  torch.save /dev/shm every step, every 10 steps
  DCP async_save every step, every 10 steps (to disk; one in flight at a time)

Every contender is timed the same way: the step includes its snapshot call, and the
work each leaves running in the background (snapshotd's hand-off thread and daemon,
DCP's writer thread) competes for the same cores during the following steps. Each saves
at least the model's and the optimizer's state dicts (snapshotd also the RNG states and
the data position, as a resumable snapshot must).

Mean step time is reported (the every-10 variants pay in one step of ten), with the
median and p95, and the overhead against "never" (mean step / mean step of "never" - 1,
for every row alike); and the time spent inside the snapshot calls per step (the part of
the overhead that the call itself blocks, which is less noisy on a shared machine than
differences of step times). ``comparison``: per interval, snapshotd's overhead against
the other contenders' at the same interval, in the same run.

Step times on a shared 2-core machine swing with its load. A second measurement counts
CPU seconds instead, which the load distorts far less: after the timed rounds, every
configuration runs ``--cpu-rounds`` more rounds of 10 steps, each round followed by a drain
(snapshotd's hand-off finished, DCP's write finished), and the round is charged the CPU
seconds (user + system) of this process over the round and the drain, plus the daemon's
for snapshotd (from /proc). Nothing of another configuration runs in the window, so the
CPU of every background thread lands on the configuration that caused it.
``cpu_overhead_pct``: CPU per step / CPU per step of "never" - 1; ``comparison`` gives both.

    python -m bench.train_overhead [--steps 40] [--warmup 10] [--small] [--json out.json]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings

import torch
from torch import nn

from bench import common as cm


BIG = (4096, 256, 2, 32)  # vocab, d_model, layers, sequence
SMALL = (64, 32, 2, 16)  # the demo's size


def _configs():
    return [("never", None, 0), ("snapshotd every step", "snapshotd", 1),
            ("snapshotd every 10 steps", "snapshotd", 10),
            ("torch.save /dev/shm every step", "torch.save", 1),
            ("torch.save /dev/shm every 10 steps", "torch.save", 10),
            ("DCP async_save every step", "dcp_async", 1),
            ("DCP async_save every 10 steps", "dcp_async", 10)]


def comparison(rows: list[dict]) -> list[dict]:
    """Per snapshot interval: snapshotd's overhead and every other contender's at the same
    interval (percent of the "never" step), and whether snapshotd costs the least."""
    out = []
    for every in sorted({r["every"] for r in rows if r["every"]}):
        same = [r for r in rows if r["every"] == every]
        ours = [r for r in same if r["config"].startswith("snapshotd")]
        others = [r for r in same if not r["config"].startswith("snapshotd")]
        if not ours or not others:
            continue
        row = {"every": every, "snapshotd_overhead_pct": ours[0]["overhead_pct"],
               "others": {r["config"]: r["overhead_pct"] for r in others},
               "snapshotd_cheapest": all(ours[0]["overhead_pct"] < r["overhead_pct"] for r in others)}
        if all("cpu_overhead_pct" in r for r in same):
            row.update({"snapshotd_cpu_overhead_pct": ours[0]["cpu_overhead_pct"],
                        "others_cpu": {r["config"]: r["cpu_overhead_pct"] for r in others},
                        "snapshotd_cheapest_cpu": all(ours[0]["cpu_overhead_pct"] < r["cpu_overhead_pct"]
                                                      for r in others)})
        out.append(row)
    return out


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` used so far; 0 without one."""
    if pid is None:
        return 0.0
    return cm.proc_cpu_seconds(pid)  # ns resolution: /proc/PID/stat's 10 ms ticks are too coarse


class _Run:
    """One configuration: its own model, optimizer, data and snapshot method."""

    def __init__(self, name, kind, every, big, socket, workdir, job):
        from snapshotd_tools.demo.trainer import DataStream, TinyLM

        self.name, self.kind, self.every, self.workdir, self.job = name, kind, every, workdir, job
        self.vocab, d_model, layers, seq = BIG if big else SMALL
        torch.manual_seed(1234)
        self.model = TinyLM(vocab=self.vocab, d_model=d_model, layers=layers, seq=seq)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
        self.data = DataStream(1235, batch=8, seq=seq, vocab=self.vocab)
        self.loss_fn = nn.CrossEntropyLoss()
        self.snap, self.fut, self.step, self.times, self.snap_call_s = None, None, 0, [], 0.0
        self.cpu_s, self.cpu_steps = 0.0, 0
        if kind == "snapshotd":
            from snapshotd_client import Snapshotter

            self.snap = Snapshotter(self.model, self.opt, extra_state={"data": self.data}, job_id=job,
                                    socket_path=socket, rank=0, world_size=1,
                                    on_daemon_unavailable="raise")

    def run_steps(self, n: int, timed: bool) -> None:
        model, opt = self.model, self.opt
        for _ in range(n):
            t0 = time.perf_counter()
            x, y = self.data.next()
            loss = self.loss_fn(model(x).reshape(-1, self.vocab), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss.item()
            self.step += 1
            if self.every and self.step % self.every == 0:
                ts = time.perf_counter()
                self._snapshot()
                if timed:
                    self.snap_call_s += time.perf_counter() - ts
            if timed:
                self.times.append(time.perf_counter() - t0)

    def _snapshot(self) -> None:
        sd = None
        if self.kind == "snapshotd":
            self.snap.save(self.step)
            return
        sd = {"model": self.model.state_dict(), "optim": self.opt.state_dict()}
        if self.kind == "torch.save":
            torch.save(sd, os.path.join("/dev/shm", f"{self.job}.pt"))
        elif self.kind == "dcp_async":
            import torch.distributed.checkpoint as dcp

            if self.fut is not None:
                self.fut.result()  # one in flight, as a training loop would do
            self.fut = dcp.async_save(sd, checkpoint_id=os.path.join(self.workdir, f"{self.job}-{self.step}"))

    def drain(self) -> None:
        """Wait for the work the last snapshot left running in the background."""
        if self.fut is not None:
            self.fut.result()
        if self.snap is not None:
            self.snap.wait()

    def close(self) -> None:
        if self.fut is not None:
            self.fut.result()
        if self.snap is not None:
            self.snap.close()


def run(steps: int, warmup: int, big: bool, daemon_socket: str, daemon_pid: int | None = None,
        cpu_rounds: int = 0) -> dict:
    """Every configuration, interleaved in rounds of 10 steps in a rotating order (so that
    a change in the machine's load hits them all alike); ``daemon_socket``: a running
    snapshotd daemon (``daemon_pid``: its pid, whose CPU is charged to snapshotd's rows);
    then ``cpu_rounds`` drained rounds per configuration counting CPU seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="bench-suite-train-", dir="/tmp")
    job = "train" + os.urandom(3).hex()
    runs: list[_Run] = []
    rounds = max(1, -(-steps // 10))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, (name, kind, every) in enumerate(_configs()):
                runs.append(_Run(name, kind, every, big, daemon_socket, workdir, f"{job}{i}"))
            for r in runs:
                r.run_steps(warmup, timed=False)
            for rnd in range(rounds):
                k = rnd % len(runs)  # rotate the order: no configuration always goes first
                for r in runs[k:] + runs[:k]:
                    # start each round at a multiple of 10: one every-10 snapshot per round
                    r.run_steps(10 - r.step % 10 if r.step % 10 else 10, timed=True)
            for r in runs:
                r.drain()
            for rnd in range(cpu_rounds):
                k = rnd % len(runs)
                for r in runs[k:] + runs[:k]:
                    n = 10 - r.step % 10 if r.step % 10 else 10
                    d0, c0 = cpu_seconds(daemon_pid if r.kind == "snapshotd" else None), time.process_time()
                    r.run_steps(n, timed=False)
                    r.drain()
                    r.cpu_s += time.process_time() - c0
                    r.cpu_s += cpu_seconds(daemon_pid if r.kind == "snapshotd" else None) - d0
                    r.cpu_steps += n
            for r in runs:
                r.close()
        nbytes = cm.state_nbytes(runs[0].model, runs[0].opt)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(workdir, ignore_errors=True)
        for f in os.listdir("/dev/shm"):
            if f.startswith(job):
                os.unlink(os.path.join("/dev/shm", f))
    rows = []
    for r in runs:
        ts = sorted(r.times)
        rows.append({"config": r.name, "every": r.every, "steps": len(r.times),
                     "mean_step_s": sum(ts) / len(ts), "median_step_s": cm.med(ts),
                     "p95_step_s": ts[min(len(ts) - 1, int(0.95 * len(ts)))], "state_bytes": nbytes,
                     "snapshot_call_s_per_step": r.snap_call_s / len(ts)})
        if r.cpu_steps:
            rows[-1].update({"cpu_steps": r.cpu_steps, "cpu_s_per_step": r.cpu_s / r.cpu_steps})
    base = rows[0]["mean_step_s"]
    for r in rows:
        r["overhead_pct"] = (r["mean_step_s"] / base - 1) * 100
        if "cpu_s_per_step" in r:
            r["cpu_overhead_pct"] = (r["cpu_s_per_step"] / rows[0]["cpu_s_per_step"] - 1) * 100
    v, d, l_, s_ = BIG if big else SMALL
    return {"model": f"TinyLM vocab {v}, d_model {d}, {l_} layers, seq {s_}, batch 8",
            "torch_threads": 1, "rows": rows, "comparison": comparison(rows)}


def main(argv=None) -> int:
    import argparse
    import json

    from bench import compare_snapshot as cs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--small", action="store_true", help="the demo's tiny TinyLM instead of the big one")
    p.add_argument("--cpu-rounds", type=int, default=6,
                   help="drained rounds of 10 steps per configuration counting CPU seconds (default 6)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.cpu_rounds < 0:
        p.error("--steps must be >= 1, --warmup and --cpu-rounds >= 0")
    work = tempfile.mkdtemp(prefix="bench-train-")
    daemon = cs.SingleDaemon(work, 1 << 30)
    try:
        res = run(a.steps, a.warmup, not a.small, daemon.socket, daemon.proc.pid, a.cpu_rounds)
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    for r in res["rows"]:
        print(f"{r['config']:<36} {r['mean_step_s'] * 1e3:8.2f} ms/step mean, {r['median_step_s'] * 1e3:8.2f} "
              f"median ({r['overhead_pct']:+.1f}%), in snapshot calls {r['snapshot_call_s_per_step'] * 1e3:.2f} ms/step"
              + (f"; CPU {r['cpu_s_per_step'] * 1e3:.2f} ms/step ({r['cpu_overhead_pct']:+.1f}%)"
                 if "cpu_s_per_step" in r else ""))
    for c in res["comparison"]:
        print(f"every {c['every']}: snapshotd {c['snapshotd_overhead_pct']:+.1f}% vs "
              + ", ".join(f"{k} {v:+.1f}%" for k, v in c["others"].items())
              + (" (snapshotd cheapest)" if c["snapshotd_cheapest"] else " (snapshotd NOT cheapest)"))
        if "snapshotd_cpu_overhead_pct" in c:
            print(f"every {c['every']}, CPU: snapshotd {c['snapshotd_cpu_overhead_pct']:+.1f}% vs "
                  + ", ".join(f"{k} {v:+.1f}%" for k, v in c["others_cpu"].items())
                  + (" (snapshotd cheapest)" if c["snapshotd_cheapest_cpu"] else " (snapshotd NOT cheapest)"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
