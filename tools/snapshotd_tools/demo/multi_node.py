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
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from snapshotd_tools import localcluster as lc
from snapshotd.wire import shm

JOB = "dp"
BLOCK_SIZE = "16KiB"  # small blocks: the tiny state still spans several stripes
PHASE_TIMEOUT_S = 180.0


def _say(msg: str = "") -> None:
    print(f"[demo] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _tail(path: str, n: int = 1) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [x.strip() for x in f.read().splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class TrainerGroup:
    """``world`` dp_trainer processes; their stdout JSON events arrive on one queue."""

    def __init__(self, d: str, phase: str, world: int, steps: int, sockets: list[str] | None,
                 shard_replicated: bool | None, out: str | None, registry: list):
        self.world, self.phase = world, phase
        self.events: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.logs = [os.path.join(d, f"trainer-{phase}-r{r}.log") for r in range(world)]
        port = _free_port()
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
            with open(self.logs[r], "ab") as log:
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            self.procs.append(p)
            registry.append(p)
            threading.Thread(target=self._read, args=(r, p), daemon=True).start()

    def _read(self, rank: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            if line.startswith("{"):
                try:
                    self.events.put((rank, json.loads(line)))
                except ValueError:
                    pass
        p.stdout.close()
        self.events.put((rank, None))  # end of output

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
                               f"{_tail(self.logs[rank], 3)} (log: {self.logs[rank]})")

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
        _say(f"    step {s:3d}  loss {ev['loss']:.4f}{extra}{missing}")
        slow = sorted(r for r, e in got.items() if e.get("blocking_ms", 0) > 1000)
        if slow:
            _say(f"             rank {', '.join(map(str, slow))}: save waited for older uncommitted versions "
                 f"to free a staging slot (--inflight-wait-s), then gave up the oldest")

    def flush_all(self) -> None:
        for s in sorted(self.seen):
            self.flush(s)


def _stop_trainers(registry: list) -> None:
    for p in registry:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in registry:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _cluster_nodes(d: str) -> dict:
    with open(os.path.join(d, "cluster.json")) as f:
        return json.load(f)["nodes"]


def _committed(row: dict) -> int:
    for j in row.get("jobs", []):
        if j.get("job_id") == JOB:
            return int(j.get("latest_committed_version", 0))
    return 0


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


def _indent(text: str) -> None:
    for line in text.splitlines():
        _say(f"      {line}")


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
            lc._stop_pid(pid)


def _plot(path: str, ref: list[float], before: dict[int, float], after: dict[int, float],
          kill_step: int, restored: int, lost_node: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(range(1, len(ref) + 1), ref, color="0.55", lw=4, alpha=0.6, label="reference (no failure)")
    xs = sorted(before)
    ax.plot(xs, [before[s] for s in xs], "o-", color="tab:blue", ms=3, lw=1.2,
            label="failure run, until the failure")
    xs = sorted(after)
    if xs:
        ys = [after[s] for s in xs]
        if restored in before:  # join the curve at the restored step
            xs, ys = [restored] + xs, [before[restored]] + ys
        ax.plot(xs, ys, "o-", color="tab:green", ms=3, lw=1.2,
                label="failure run, resumed from the snapshot")
    ax.axvline(kill_step, color="tab:red", ls="--", lw=1)
    ax.annotate(f"node {lost_node} SIGKILLed\n(after step {kill_step})", (kill_step, 0.97),
                xycoords=("data", "axes fraction"), ha="right", va="top", color="tab:red",
                fontsize=8, xytext=(-4, 0), textcoords="offset points")
    ax.axvline(restored, color="tab:green", ls=":", lw=1)
    ax.annotate(f"restored step {restored}", (restored, 0.03), xycoords=("data", "axes fraction"),
                ha="left", va="bottom", color="tab:green", fontsize=8, xytext=(4, 0),
                textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss over ranks")
    ax.set_title("snapshotd demo: data-parallel training, a node lost and rebuilt")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
        _say(f"work directory {d} (daemon and trainer logs, loss.png)")
        _say(f"1/7 starting a local cluster: {nodes} nodes, k={k} data + m={parity} parity blocks "
             f"per stripe (survives the loss of any {parity} nodes), block size {BLOCK_SIZE}")
        cluster_started = True
        info = lc.up(d, nodes, parity, block_size=BLOCK_SIZE)
        for n, v in info["nodes"].items():
            _say(f"    {n}: daemon pid {v['pid']}, socket {v['socket']}")
        socks = [info["nodes"][n]["socket"] for n in node_ids]

        # -- 2: the reference -----------------------------------------------------------
        _say(f"2/7 reference run: {nodes} data-parallel trainers (torch.distributed gloo, "
             f"gradients all-reduced), {steps} steps, no snapshots")
        ref_path = os.path.join(d, "reference.json")
        t0 = time.monotonic()
        g = TrainerGroup(d, "reference", nodes, steps, None, None, ref_path, registry)
        pr = StepPrinter(nodes, every=max(1, steps // 5))
        _drain(g, pr, time.monotonic() + PHASE_TIMEOUT_S)
        with open(ref_path) as f:
            ref = json.load(f)
        _say(f"    done in {time.monotonic() - t0:.1f} s; final digest {ref['digest'][:16]}; "
             f"model + optimizer state {ref['state_bytes'] / 1e3:.1f} kB per replica")

        # -- 3: with snapshots, until node 2 dies ------------------------------------------
        how = ("shard_replicated=True: each rank stores only its 1/%d slice of the replicated "
               "model + optimizer state, plus its own RNG and data state" % nodes) if sharded else \
              ("full state per rank (shard_replicated %s)" %
               ("turned off" if supported else "not supported by this snapshotd_client yet"))
        _say(f"3/7 failure run: same job, snapshot every step, rank r -> daemon n<r>; {how}")
        run_pr = StepPrinter(nodes)
        g = TrainerGroup(d, "failure", nodes, steps, socks, shard_replicated, None, registry)
        kill_step = _run_until_kill(g, run_pr, victim_rank, kill_at, time.monotonic() + PHASE_TIMEOUT_S)

        # -- 4: node 2 dies -----------------------------------------------------------------
        vpid = _cluster_nodes(d)[victim]["pid"]
        t_kill = time.monotonic()
        g.kill(victim_rank)
        try:
            os.kill(vpid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _reap(vpid)
        _say(f"4/7 rank {victim_rank} reported step {kill_step}: SIGKILL node {victim} -- its daemon "
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
                why = _tail(g.logs[r]) or f"exit code {p.returncode}"
                _say(f"    rank {r} failed on its own {time.monotonic() - t_kill:.1f} s later: {why[:110]}")
            else:
                g.kill(r)
                _say(f"    rank {r} still blocked in gloo: SIGKILLed (the launcher restarts the job)")
        survivors = [n for n in node_ids if n != victim]
        committed = {}
        for _ in range(20):  # let a commit already under way settle
            now = {n: _latest_committed(socks[int(n[1:])]) for n in survivors}
            if now == committed:
                break
            committed = now
            time.sleep(0.15)
        last = max(committed.values())
        _say("    last committed version on the survivors: " +
             ", ".join(f"{n} v{v}" for n, v in committed.items()) + f" -> step {last}")

        # -- 5: the node is gone; a replacement rebuilds it ----------------------------------
        segs = shm.list_segments(lc.shm_prefix(d, victim))
        seg_bytes = lc.wipe_node(d, victim)
        _say(f"5/7 node {victim} is gone: wiped its state directory and its {len(segs)} "
             f"shared-memory segments ({_mb(seg_bytes)}); starting a replacement {victim}")
        t_rb = time.monotonic()
        proc = lc.restart_node(d, victim)
        _say(f"    replacement daemon {victim} up (pid {proc.pid}) after {time.monotonic() - t_rb:.1f} s; "
             f"it catches up from the survivors on its own")
        shown = None
        rebuilt_s = None
        row = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = lc.collect_status(d)
            row = next((x for x in rows if x.get("node_id") == victim), {})
            key = (_committed(row), json.dumps(row.get("cluster", {}).get("degraded", {}), sort_keys=True))
            done = row.get("alive") and _committed(row) >= last
            if key != shown or done:
                _say(f"    $ snapshotd status --dir {d}   (t+{time.monotonic() - t_rb:.1f} s)")
                _indent(lc.format_status(rows))
                shown = key
            if done:
                rebuilt_s = time.monotonic() - t_rb
                break
            time.sleep(0.25)
        lr = row.get("cluster", {}).get("last_rebuild") or {}
        if rebuilt_s is None:
            _say(f"    WARNING: {victim} did not show v{last} within 60 s; the trainers' restore "
                 f"will ask it to rebuild")
        else:
            extra = (f"; the daemon rebuilt {_mb(lr.get('bytes', 0))} (fetched "
                     f"{_mb(lr.get('fetched_bytes', 0))}) in {lr.get('seconds', 0):.2f} s") if lr else ""
            _say(f"    {victim} holds v{last} again {rebuilt_s:.1f} s after its replacement started{extra}")

        # -- 6: restart the job ------------------------------------------------------------------
        _say(f"6/7 restarting all {nodes} trainers: each restores from its node's daemon and finishes")
        out_path = os.path.join(d, "resumed.json")
        g = TrainerGroup(d, "resumed", nodes, steps, socks, shard_replicated, out_path, registry)
        res_pr = StepPrinter(nodes)
        restored = {}
        final_digests = {}
        _drain(g, res_pr, time.monotonic() + PHASE_TIMEOUT_S, restored, final_digests)
        with open(out_path) as f:
            got = json.load(f)
        restored_step = got["start"]

        # -- 7: compare and summarise -----------------------------------------------------------
        ok = got["digest"] == ref["digest"]
        _say("7/7 compare rank 0's final parameters + optimizer state with the reference run")
        if len(set(final_digests.values())) > 1:
            _say("    note: the ranks' final digests differ: " +
                 ", ".join(f"r{r} {x[:12]}" for r, x in sorted(final_digests.items())))
        _say(f"    {'BIT-IDENTICAL' if ok else 'MISMATCH'} ({got['digest'][:16]} vs {ref['digest'][:16]})")

        rows = lc.collect_status(d)
        _summary(d, rows, ref, run_pr, res_pr, nodes, parity, k, sharded, rebuilt_s, lr,
                 kill_step, restored_step, last, victim, time.monotonic() - t_start)
        png = _plot(os.path.join(d, "loss.png"), ref["losses"], run_pr.losses, res_pr.losses,
                    kill_step, restored_step, victim)
        _say(f"    loss curves: {png}" if png else "    (matplotlib not installed: no loss plot)")
        return 0 if ok else 1
    except KeyboardInterrupt:
        _say("interrupted: stopping the trainers and the cluster")
        raise
    except Exception as exc:
        traceback.print_exc()
        _say(f"FAILED: {type(exc).__name__}: {exc}")
        _say(f"    logs are in {d}")
        return 1
    finally:
        _stop_trainers(registry)
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
            _say(f"cluster stopped, shared memory freed ({time.monotonic() - t_start:.1f} s in all)")
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _drain(g: TrainerGroup, pr: StepPrinter, deadline: float, restored: dict | None = None,
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
            _say(f"    rank {r} restored step {ev['step']} (its data stream at batch {ev['position']}"
                 f"{', its 1/%d slice' % g.world if ev.get('shard_replicated') else ''})")
        elif ev.get("event") == "done" and digests is not None:
            digests[r] = ev["digest"]
    pr.flush_all()


def _run_until_kill(g: TrainerGroup, pr: StepPrinter, victim: int, kill_at: int, deadline: float) -> int:
    while True:
        r, ev = g.next(deadline)
        if ev is None:
            g.check_exit(r)
            raise RuntimeError(f"rank {r} finished before the failure was injected")
        if ev.get("event") == "restored":
            if ev["step"]:
                raise RuntimeError(f"rank {r} restored step {ev['step']} at the start of a fresh run")
            if r == 0:
                _say("    every rank: nothing to restore, starting at step 0")
        elif ev.get("event") == "step":
            pr.add(r, ev)
            if r == victim and ev["step"] >= kill_at:
                return ev["step"]


def _summary(d, rows, ref, run_pr, res_pr, nodes, parity, k, sharded, rebuilt_s, lr,
             kill_step, restored_step, last, victim, elapsed) -> None:
    import numpy as np

    blocking = run_pr.blocking + res_pr.blocking
    state = ref["state_bytes"]
    _say("summary")
    if blocking:
        _say(f"    blocking per snapshot: median {np.median(blocking):.2f} ms, "
             f"p95 {np.percentile(blocking, 95):.2f} ms ({len(blocking)} snapshots over {nodes} ranks)")
    snap_bytes = {**run_pr.snapshot_bytes, **res_pr.snapshot_bytes}
    if snap_bytes:
        _say("    snapshot payload per rank: " +
             ", ".join(f"r{r} {b / 1e3:.1f} kB" for r, b in sorted(snap_bytes.items())) +
             f" (model + optimizer state: {state / 1e3:.1f} kB)")
    from snapshotd.wire.config import parse_size

    bs = parse_size(BLOCK_SIZE)
    tot_data = tot_par = tot_res = data_blocks = par_blocks = 0
    _say(f"    bytes per node at v{max(_committed(r) for r in rows)}:   {'data MB':>9} {'parity MB':>9} "
         f"{'reserved MB':>11}")
    for r in rows:
        if not r.get("alive"):
            _say(f"      {r['node_id']:6} unreachable")
            continue
        data = int(r.get("bytes_committed", 0))
        par = sum(r.get("cluster", {}).get("parity_bytes", {}).values())
        res = int(r.get("bytes_reserved", 0))
        tot_data, tot_par, tot_res = tot_data + data, tot_par + par, tot_res + res
        data_blocks += -(-data // bs)  # one rank per node: its payload, cut into blocks
        par_blocks += par // bs
        _say(f"      {r['node_id']:20} {data / 1e6:9.2f} {par / 1e6:9.2f} {res / 1e6:11.2f}")
    _say(f"      {'total':20} {tot_data / 1e6:9.2f} {tot_par / 1e6:9.2f} {tot_res / 1e6:11.2f}"
         f"   (data: committed payload; reserved: + staging slots)")
    if tot_data:
        _say(f"    parity overhead: {tot_par / tot_data:.2f} x the data bytes (ideal m/k = {parity}/{k} = "
             f"{parity / k:.2f}); in {BLOCK_SIZE} blocks: {par_blocks} parity for {data_blocks} data = "
             f"{par_blocks / max(1, data_blocks):.2f} x")
        if abs(par_blocks / max(1, data_blocks) - parity / k) > 0.1 * parity / k:
            _say(f"      (a tiny state: each node's data fits in {-(-data_blocks // nodes)} block(s), parity is "
                 f"kept in whole blocks and stripes rotate over the nodes; it is exactly m/k when "
                 f"every node holds a multiple of k = {k} blocks)")
    ideal = state * (1 + parity / k)
    _say(f"    cluster-wide held: {_mb(tot_data + tot_par)} (data + parity) = {(tot_data + tot_par) / ideal:.2f} x "
         f"the (1 + m/k) x state ideal of {_mb(ideal)}; the data alone is {tot_data / max(1, state):.2f} x "
         f"the state " + ("(one sliced copy + each rank's RNG and data-stream state)" if sharded else
                          f"(every rank stores the full replicated state: {nodes} copies)"))
    if rebuilt_s is not None:
        _say(f"    rebuild of {victim}: {rebuilt_s:.1f} s from replacement start to v{last} held"
             + (f" ({lr.get('seconds', 0):.2f} s of actual rebuild)" if lr else ""))
    _say(f"    lost steps: {kill_step - restored_step} (killed after step {kill_step}, "
         f"restored step {restored_step}); demo time so far {elapsed:.1f} s")
