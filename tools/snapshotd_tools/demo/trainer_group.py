"""The demo's trainer processes: a group of dp_trainer ranks and the printing of their steps.

``TrainerGroup`` starts ``world`` ``snapshotd_tools.demo.dp_trainer`` processes (gloo,
one master port) and funnels their stdout JSON events onto one queue, one reader
thread per rank (``read_json_events``, also the chaos rig's reader); ``StepPrinter``
prints a line per step once every rank has reported it; ``drain`` and
``run_until_kill`` consume the events of one phase of the demo.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from snapshotd_tools.demo.console import say, tail
from snapshotd_tools.localcluster import free_port, require_main_thread, tied

JOB = "dp"


def read_json_events(events: queue.Queue, rank: int, p: subprocess.Popen) -> None:
    """A rank's stdout JSON lines onto ``events`` as (rank, event), then (rank, None) at
    the end of its output. Runs on a reader thread of its own, one per rank."""
    for line in p.stdout:
        if line.startswith("{"):
            try:
                events.put((rank, json.loads(line)))
            except ValueError:
                pass
    p.stdout.close()
    events.put((rank, None))  # end of output


class TrainerGroup:
    """``world`` dp_trainer processes; their stdout JSON events arrive on one queue."""

    def __init__(self, d: str, phase: str, world: int, steps: int, sockets: list[str] | None,
                 shard_replicated: bool | None, out: str | None, registry: list):
        require_main_thread("the demo's trainers")
        self.world, self.phase = world, phase
        self.events: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.logs = [os.path.join(d, f"trainer-{phase}-r{r}.log") for r in range(world)]
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if "GLOO_SOCKET_IFNAME" not in env and os.path.exists("/sys/class/net/lo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"
        for r in range(world):
            cmd = [sys.executable, "-m", "snapshotd_tools.demo.dp_trainer", "--rank", str(r),
                   "--world-size", str(world), "--master-port", str(port), "--steps", str(steps),
                   "--job", JOB]
            cmd += ["--socket", sockets[r]] if sockets else ["--no-snapshot"]
            if shard_replicated is False:
                cmd.append("--no-shard-replicated")
            if out and r == 0:
                cmd += ["--out", out]
            with open(self.logs[r], "ab") as log:  # a rank dies with the demo, however it dies
                p = subprocess.Popen(tied(cmd, signal.SIGKILL), stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=env)
            self.procs.append(p)
            registry.append(p)
            threading.Thread(target=self._read, args=(r, p), daemon=True).start()

    def _read(self, rank: int, p: subprocess.Popen) -> None:
        read_json_events(self.events, rank, p)

    def next(self, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.phase}: trainers did not finish in time; see {self.logs[0]}")
        try:
            return self.events.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(f"{self.phase}: trainers did not finish in time; see {self.logs[0]}")

    def check_exit(self, rank: int) -> None:
        rc = self.procs[rank].wait(30)
        if rc != 0:
            raise RuntimeError(f"{self.phase}: rank {rank} exited with {rc}: "
                               f"{tail(self.logs[rank], 3)} (log: {self.logs[rank]})")

    def kill(self, rank: int) -> None:
        p = self.procs[rank]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


class StepPrinter:
    """One line per step, once every rank has reported it (the mean loss is the same on all)."""

    def __init__(self, world: int, every: int = 1):
        self.world, self.every = world, every
        self.seen: dict[int, dict[int, dict]] = {}
        self.losses: dict[int, float] = {}
        self.blocking: list[float] = []
        self.snapshot_bytes: dict[int, int] = {}

    def add(self, rank: int, ev: dict) -> None:
        s = ev["step"]
        self.losses[s] = ev["loss"]
        if "blocking_ms" in ev:
            self.blocking.append(ev["blocking_ms"])

        if ev.get("snapshot_bytes"):
            self.snapshot_bytes[rank] = ev["snapshot_bytes"]
        got = self.seen.setdefault(s, {})
        got[rank] = ev
        if len(got) == self.world:
            self.flush(s)

    def flush(self, s: int) -> None:
        got = self.seen.pop(s, None)
        if not got or (s % self.every and len(got) == self.world):
            return
        ev = next(iter(got.values()))
        bl = [f"{got[r]['blocking_ms']:5.2f}" if "blocking_ms" in got.get(r, {}) else "    -"
              for r in range(self.world)]
        extra = f"  blocking ms per rank: {' '.join(bl)}" if any("blocking_ms" in e for e in got.values()) else ""
        missing = "" if len(got) == self.world else \
            f"  (reported by rank {', '.join(map(str, sorted(got)))} only)"
        say(f"    step {s:3d}  loss {ev['loss']:.4f}{extra}{missing}")
        slow = sorted(r for r, e in got.items() if e.get("blocking_ms", 0) > 1000)
        if slow:
            say(f"             rank {', '.join(map(str, slow))}: save waited for older uncommitted versions "
                 f"to free a staging slot (--inflight-wait-s), then gave up the oldest")

    def flush_all(self) -> None:
        for s in sorted(self.seen):
            self.flush(s)


def stop_trainers(registry: list) -> None:
    for p in registry:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in registry:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def drain(g: TrainerGroup, pr: StepPrinter, deadline: float, restored: dict | None = None,
           digests: dict | None = None) -> None:
    ended = set()
    while len(ended) < g.world:
        r, ev = g.next(deadline)
        if ev is None:
            ended.add(r)
            g.check_exit(r)
        elif ev.get("event") == "step":
            pr.add(r, ev)
        elif ev.get("event") == "restored" and restored is not None:
            restored[r] = ev["step"]
            say(f"    rank {r} restored step {ev['step']} (its data stream at batch {ev['position']}"
                 f"{', its 1/%d slice' % g.world if ev.get('shard_replicated') else ''})")
        elif ev.get("event") == "done" and digests is not None:
            digests[r] = ev["digest"]
    pr.flush_all()


def run_until_kill(g: TrainerGroup, pr: StepPrinter, victim: int, kill_at: int, deadline: float) -> int:
    while True:
        r, ev = g.next(deadline)
        if ev is None:
            g.check_exit(r)
            raise RuntimeError(f"rank {r} finished before the failure was injected")
        if ev.get("event") == "restored":
            if ev["step"]:
                raise RuntimeError(f"rank {r} restored step {ev['step']} at the start of a fresh run")
            if r == 0:
                say("    every rank: nothing to restore, starting at step 0")
        elif ev.get("event") == "step":
            pr.add(r, ev)
            if r == victim and ev["step"] >= kill_at:
                return ev["step"]
