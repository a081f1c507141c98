"""``snapshotd demo``: a local daemon, a real training run killed and resumed.

1) trains the reference run without snapshots;
2) starts a daemon, trains with a snapshot every step, SIGKILLs the trainer mid-run;
3) SIGKILLs the daemon too and restarts it (it re-adopts its shared memory);
4) restarts the trainer, which restores the last committed snapshot and finishes;
5) checks the final parameters and optimizer state are bit-identical to (1).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from snapshotd.wire import shm
from snapshotd_tools import localcluster as lc


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def start_daemon(workdir: str, node_id: str, budget: str = "2GiB",
                 tie_to_parent: bool = False) -> tuple[subprocess.Popen, str]:
    """A daemon for ``node_id``; with ``tie_to_parent`` it gets SIGTERM when this process
    dies (``localcluster.tied``; call from the main thread)."""
    if tie_to_parent:
        lc.require_main_thread(f"starting daemon {node_id}")
    ready = os.path.join(workdir, f"{node_id}.ready")
    sock = os.path.join(workdir, f"{node_id}.sock")
    if os.path.exists(ready):
        os.unlink(ready)
    log = open(os.path.join(workdir, f"{node_id}.log"), "ab")
    argv = [sys.executable, "-m", "snapshotd.node", "serve", "--node-id", node_id,
            "--state-dir", os.path.join(workdir, node_id), "--socket", sock,
            "--memory-budget-bytes", budget, "--ready-file", ready]
    p = subprocess.Popen(lc.tied(argv, signal.SIGTERM) if tie_to_parent else argv,
                         stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not os.path.exists(ready):
        if p.poll() is not None or time.monotonic() - t0 > 60:
            raise RuntimeError(f"daemon failed to start; see {workdir}/{node_id}.log")
        time.sleep(0.02)
    return p, sock


def trainer_cmd(steps: int, job: str, sock: str | None, out: str | None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "snapshotd_tools.demo.trainer", "--steps", str(steps), "--job", job]
    cmd += ["--socket", sock] if sock else ["--no-snapshot"]
    cmd += ["--out", out] if out else []
    return cmd + list(extra)


def run_until_killed(cmd: list[str], kill_after_step: int) -> list[dict]:
    """Run a trainer, SIGKILL it as soon as it reports ``kill_after_step``."""
    p = subprocess.Popen(lc.tied(cmd, signal.SIGKILL), stdout=subprocess.PIPE, text=True)  # waited for
    events = []
    for line in p.stdout:
        ev = json.loads(line)
        events.append(ev)
        if ev.get("event") == "step" and ev["step"] >= kill_after_step:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    p.stdout.close()
    return events


def run_to_end(cmd: list[str]) -> list[dict]:
    out = subprocess.run(lc.tied(cmd, signal.SIGKILL), stdout=subprocess.PIPE, text=True,
                         check=True).stdout  # waited for
    return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


def run_demo(workdir: str | None = None, steps: int = 40, kill_at: int = 17) -> int:
    from snapshotd_client.transport import DaemonClient

    workdir = workdir or tempfile.mkdtemp(prefix="snapshotd-demo-")
    os.makedirs(workdir, exist_ok=True)
    node = "demo" + uuid.uuid4().hex[:6]
    job = "tinylm"
    _say(f"work directory {workdir}")
    _say(f"1/5 reference run: {steps} steps, no snapshots")
    ref = os.path.join(workdir, "reference.json")
    run_to_end(trainer_cmd(steps, job, None, ref))
    daemon, sock = start_daemon(workdir, node, tie_to_parent=True)
    try:
        _say(f"2/5 daemon {node} up (pid {daemon.pid}); training with a snapshot every step")
        events = run_until_killed(trainer_cmd(steps, job, sock, None), kill_at)
        blocking = [e["blocking_ms"] for e in events if "blocking_ms" in e]
        cl = DaemonClient.for_socket(sock, timeout_s=10)
        committed = cl.list_versions(job).latest_committed_version
        _say(f"    SIGKILLed the trainer after step {events[-1]['step']}; "
             f"last committed snapshot: step {committed}")
        _say("3/5 SIGKILL the daemon as well, then restart it")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        cl.close()
        daemon, sock = start_daemon(workdir, node, tie_to_parent=True)
        cl = DaemonClient.for_socket(sock, timeout_s=10)
        readopted = cl.list_versions(job).latest_committed_version
        _say(f"    restarted daemon (pid {daemon.pid}) re-adopted step {readopted} from shared memory")
        _say("4/5 restarting the trainer: restore and finish")
        out = os.path.join(workdir, "resumed.json")
        ev2 = run_to_end(trainer_cmd(steps, job, sock, out))
        restored = next(e["step"] for e in ev2 if e.get("event") == "restored")
        blocking += [e["blocking_ms"] for e in ev2 if "blocking_ms" in e]
        stats = cl.stats()
        held = next((j.bytes_held for j in stats.jobs if j.job_id == job), 0)
        with open(ref) as f:
            want = json.load(f)["digest"]
        with open(out) as f:
            got = json.load(f)["digest"]
        ok = want == got
        _say("5/5 compare with the reference run")
        _say(f"    restored step {restored}, lost steps {events[-1]['step'] - restored}, "
             f"blocking per snapshot: median {statistics.median(blocking):.2f} ms "
             f"(max {max(blocking):.2f} ms), shared memory held {held / 1e6:.2f} MB")
        _say(f"    final parameters + optimizer state: {'BIT-IDENTICAL' if ok else 'MISMATCH'} "
             f"({got[:16]} vs {want[:16]})")
        cl.drop_job(job)
        cl.close()
        return 0 if ok else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        for name in shm.list_segments(f"snapshotd.{node}."):
            shm.unlink(name)
