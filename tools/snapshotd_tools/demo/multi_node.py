"""``snapshotd demo``: a 4-node erasure-coded cluster, a data-parallel job, a node lost.

1) starts a local cluster of N daemons (``snapshotd cluster up``), m parity blocks per stripe;
2) trains the reference: N data-parallel trainers (gloo), no snapshots;
3) trains the same job with a snapshot every step, rank r into node r's daemon;
4) SIGKILLs node 2 (its daemon and its trainer) mid-run, then the other trainers
   (as an elastic launcher would), and reads the last committed version from the survivors;
5) wipes node 2 (state directory and shared memory: the node is gone) and starts a
   replacement, which rebuilds its data and parity from the survivors;
6) restarts all trainers: each restores the last committed step and finishes;
7) checks rank 0's final parameters and optimizer state are bit-identical to (2),
   prints a summary (blocking time, bytes per node, parity overhead, rebuild time,
   lost steps) and plots both loss curves into DIR/loss.png.

The cluster is always stopped and its shared memory freed, on errors and Ctrl-C too.
Its daemons and the trainers are tied to the demo's process (``localcluster.up(...,
tie_to_parent=True)``): if the demo is SIGKILLed, the kernel stops them too.
This module is the script of those steps; the trainer processes are in
``trainer_group.py``, the closing figures and plot in ``summary.py``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
import traceback

from snapshotd_tools import localcluster as lc
from snapshotd_tools.demo.console import indent, mb, say, tail
from snapshotd_tools.demo.summary import committed_version, plot_losses, print_summary
from snapshotd_tools.demo.trainer_group import (  # noqa: F401 (StepPrinter, TrainerGroup: kept importable from here)
    JOB,
    StepPrinter,
    TrainerGroup,
    drain,
    run_until_kill,
    stop_trainers,
)
from snapshotd.wire import shm

BLOCK_SIZE = "16KiB"  # small blocks: the tiny state still spans several stripes
PHASE_TIMEOUT_S = 180.0


def _cluster_nodes(d: str) -> dict:
    with open(os.path.join(d, "cluster.json")) as f:
        return json.load(f)["nodes"]


def _latest_committed(sock: str) -> int:
    from snapshotd.wire.errors import SnapshotdError
    from snapshotd_client.transport import DaemonClient

    cl = DaemonClient.for_socket(sock, timeout_s=5)
    try:
        return int(cl.list_versions(JOB).latest_committed_version)
    except SnapshotdError:
        return -1
    finally:
        cl.close()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _sweep(d: str, node_ids: list[str]) -> None:
    """Last resort when ``cluster.json`` is gone or incomplete: stop daemons by their ready files."""
    for n in node_ids:
        try:
            with open(os.path.join(d, f"{n}.ready")) as f:
                pid = int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "snapshotd.node" in cmd and os.path.join(d, f"{n}.sock") in cmd:
            lc.stop_pid(pid)


def run_multi_node_demo(workdir: str | None = None, steps: int = 30, kill_at: int = 12,
                        nodes: int = 4, parity: int = 2, shard_replicated: bool | None = None) -> int:
    """Run the demo; 0 when the resumed run ends bit-identical to the reference, else 1.

    ``shard_replicated``: None = when the client supports it; False = full state per rank.
    """
    if not 1 <= kill_at < steps:
        raise ValueError(f"--kill-at must be in [1, {steps - 1}] (got {kill_at})")
    if nodes < 2 or not 1 <= parity < nodes:
        raise ValueError("need --nodes >= 2 and 1 <= --parity < --nodes")
    from snapshotd_tools.demo.dp_trainer import shard_replicated_supported

    supported = shard_replicated_supported()
    sharded = supported and shard_replicated is not False
    victim_rank = min(2, nodes - 1)
    victim = f"n{victim_rank}"
    k = nodes - parity
    d = os.path.abspath(workdir or tempfile.mkdtemp(prefix="snapshotd-demo-"))
    os.makedirs(d, exist_ok=True)
    node_ids = [f"n{i}" for i in range(nodes)]
    registry: list[subprocess.Popen] = []
    cluster_started = False
    t_start = time.monotonic()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        say(f"work directory {d} (daemon and trainer logs, loss.png)")
        say(f"1/7 starting a local cluster: {nodes} nodes, k={k} data + m={parity} parity blocks "
             f"per stripe (survives the loss of any {parity} nodes), block size {BLOCK_SIZE}")
        cluster_started = True
        info = lc.up(d, nodes, parity, block_size=BLOCK_SIZE, tie_to_parent=True)  # they die with us
        for n, v in info["nodes"].items():
            say(f"    {n}: daemon pid {v['pid']}, socket {v['socket']}")
        socks = [info["nodes"][n]["socket"] for n in node_ids]

        # -- 2: the reference -----------------------------------------------------------
        say(f"2/7 reference run: {nodes} data-parallel trainers (torch.distributed gloo, "
             f"gradients all-reduced), {steps} steps, no snapshots")
        ref_path = os.path.join(d, "reference.json")
        t0 = time.monotonic()
        g = TrainerGroup(d, "reference", nodes, steps, None, None, ref_path, registry)
        pr = StepPrinter(nodes, every=max(1, steps // 5))
        drain(g, pr, time.monotonic() + PHASE_TIMEOUT_S)
        with open(ref_path) as f:
            ref = json.load(f)
        say(f"    done in {time.monotonic() - t0:.1f} s; final digest {ref['digest'][:16]}; "
             f"model + optimizer state {ref['state_bytes'] / 1e3:.1f} kB per replica")

        # -- 3: with snapshots, until node 2 dies ------------------------------------------
        how = ("shard_replicated=True: each rank stores only its 1/%d slice of the replicated "
               "model + optimizer state, plus its own RNG and data state" % nodes) if sharded else \
              ("full state per rank (shard_replicated %s)" %
               ("turned off" if supported else "not supported by this snapshotd_client yet"))
        say(f"3/7 failure run: same job, snapshot every step, rank r -> daemon n<r>; {how}")
        run_pr = StepPrinter(nodes)
        g = TrainerGroup(d, "failure", nodes, steps, socks, shard_replicated, None, registry)
        kill_step = run_until_kill(g, run_pr, victim_rank, kill_at, time.monotonic() + PHASE_TIMEOUT_S)

        # -- 4: node 2 dies -----------------------------------------------------------------
        vpid = _cluster_nodes(d)[victim]["pid"]
        t_kill = time.monotonic()
        g.kill(victim_rank)
        try:
            os.kill(vpid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap(vpid)
        say(f"4/7 rank {victim_rank} reported step {kill_step}: SIGKILL node {victim} -- its daemon "
             f"(pid {vpid}) and its trainer (pid {g.procs[victim_rank].pid})")
        # The survivors are stuck in (or fail out of) the next all_reduce; give them a moment
        # to notice, then kill them as an elastic launcher would restart the whole job.
        grace = time.monotonic() + 3.0
        alive = {r for r in range(nodes) if r != victim_rank}
        while alive and time.monotonic() < grace:
            try:
                r, ev = g.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if ev is None:
                alive.discard(r)
            elif ev.get("event") == "step":
                run_pr.add(r, ev)
        run_pr.flush_all()
        for r in range(nodes):
            if r == victim_rank:
                continue
            p = g.procs[r]
            if p.poll() is not None:
                why = tail(g.logs[r]) or f"exit code {p.returncode}"
                say(f"    rank {r} failed on its own {time.monotonic() - t_kill:.1f} s later: {why[:110]}")
            else:
                g.kill(r)
                say(f"    rank {r} still blocked in gloo: SIGKILLed (the launcher restarts the job)")
        survivors = [n for n in node_ids if n != victim]
        committed = {}
        for _ in range(20):  # let a commit already under way settle
            now = {n: _latest_committed(socks[int(n[1:])]) for n in survivors}
            if now == committed:
                break
            committed = now
            time.sleep(0.15)
        last = max(committed.values())
        say("    last committed version on the survivors: " +
             ", ".join(f"{n} v{v}" for n, v in committed.items()) + f" -> step {last}")

        # -- 5: the node is gone; a replacement rebuilds it ----------------------------------
        segs = shm.list_segments(lc.shm_prefix(d, victim))
        seg_bytes = lc.wipe_node(d, victim)
        say(f"5/7 node {victim} is gone: wiped its state directory and its {len(segs)} "
             f"shared-memory segments ({mb(seg_bytes)}); starting a replacement {victim}")
        t_rb = time.monotonic()
        proc = lc.restart_node(d, victim)
        say(f"    replacement daemon {victim} up (pid {proc.pid}) after {time.monotonic() - t_rb:.1f} s; "
             f"it catches up from the survivors on its own")
        shown = None
        rebuilt_s = None
        row = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = lc.collect_status(d)
            row = next((x for x in rows if x.get("node_id") == victim), {})
            key = (committed_version(row), json.dumps(row.get("cluster", {}).get("degraded", {}), sort_keys=True))
            done = row.get("alive") and committed_version(row) >= last
            if key != shown or done:
                say(f"    $ snapshotd status --dir {d}   (t+{time.monotonic() - t_rb:.1f} s)")
                indent(lc.format_status(rows))
                shown = key
            if done:
                rebuilt_s = time.monotonic() - t_rb
                break
            time.sleep(0.25)
        lr = row.get("cluster", {}).get("last_rebuild") or {}
        if rebuilt_s is None:
            say(f"    WARNING: {victim} did not show v{last} within 60 s; the trainers' restore "
                 f"will ask it to rebuild")
        else:
            extra = (f"; the daemon rebuilt {mb(lr.get('bytes', 0))} (fetched "
                     f"{mb(lr.get('fetched_bytes', 0))}) in {lr.get('seconds', 0):.2f} s") if lr else ""
            say(f"    {victim} holds v{last} again {rebuilt_s:.1f} s after its replacement started{extra}")

        # -- 6: restart the job ------------------------------------------------------------------
        say(f"6/7 restarting all {nodes} trainers: each restores from its node's daemon and finishes")
        out_path = os.path.join(d, "resumed.json")
        g = TrainerGroup(d, "resumed", nodes, steps, socks, shard_replicated, out_path, registry)
        res_pr = StepPrinter(nodes)
        restored = {}
        final_digests = {}
        drain(g, res_pr, time.monotonic() + PHASE_TIMEOUT_S, restored, final_digests)
        with open(out_path) as f:
            got = json.load(f)
        restored_step = got["start"]

        # -- 7: compare and summarise -----------------------------------------------------------
        # Data-parallel replicas end identical: every rank's model + optimizer state must
        # equal the reference's, not just rank 0's.
        same = {r: x == ref["digest"] for r, x in sorted(final_digests.items())}
        ok = got["digest"] == ref["digest"] and len(same) == nodes and all(same.values())
        say(f"7/7 compare every rank's final parameters + optimizer state with the reference run")
        if not ok:
            missing = sorted(set(range(nodes)) - set(same))
            say("    MISMATCH per rank: " + ", ".join(
                f"r{r} {final_digests[r][:12]} {'ok' if v else 'DIFFERS'}" for r, v in same.items())
                + (f"; no final digest from ranks {missing}" if missing else ""))
        say(f"    {'BIT-IDENTICAL' if ok else 'MISMATCH'}: {sum(same.values())} of {nodes} ranks "
            f"({got['digest'][:16]} vs {ref['digest'][:16]})")

        rows = lc.collect_status(d)
        print_summary(d, rows, ref, run_pr, res_pr, nodes, parity, k, sharded, rebuilt_s, lr,
                      kill_step, restored_step, last, victim, time.monotonic() - t_start,
                      BLOCK_SIZE)
        png = plot_losses(os.path.join(d, "loss.png"), ref["losses"], run_pr.losses, res_pr.losses,
                          kill_step, restored_step, victim)
        say(f"    loss curves: {png}" if png else "    (matplotlib not installed: no loss plot)")
        return 0 if ok else 1
    except KeyboardInterrupt:
        say("interrupted: stopping the trainers and the cluster")
        raise
    except Exception as exc:
        traceback.print_exc()
        say(f"FAILED: {type(exc).__name__}: {exc}")
        say(f"    logs are in {d}")
        return 1
    finally:
        stop_trainers(registry)
        if cluster_started:
            try:
                if os.path.exists(os.path.join(d, "cluster.json")):
                    lc.down(d)
            finally:
                _sweep(d, node_ids)
                if os.path.exists(os.path.join(d, "instance")) or not hasattr(lc, "shm_prefix"):
                    for n in node_ids:
                        for name in shm.list_segments(lc.shm_prefix(d, n)):
                            shm.unlink(name)
            say(f"cluster stopped, shared memory freed ({time.monotonic() - t_start:.1f} s in all)")
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
