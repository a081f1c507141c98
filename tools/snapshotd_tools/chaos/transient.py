"""Transient faults of ``snapshotd chaos``: hang_daemon, slow_peer, partition, garbage,
memory_pressure, stall_server.

The job must run through the fault (two more steps, no rank failed); then a planned
restart (a drill) must restore the newest committed version bit-exactly. hang_daemon,
slow_peer and partition are applied by a helper thread (``_freeze``) while the
harness's thread keeps folding the job's events; everything else runs on the
harness's thread, through the Harness's public session operations (stall_server:
``stall.py``, which also judges that the version in flight commits after the stall).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from snapshotd_tools.chaos import faults
from snapshotd_tools.chaos.invariants import Observation
from snapshotd_tools.chaos.report import Result
from snapshotd_tools.chaos.scenarios import Scenario, resolve_node, resolve_nodes
from snapshotd_tools.chaos.stall import stall_serving_thread
from snapshotd_tools.chaos.timeouts import PHASE_TIMEOUT_S

if TYPE_CHECKING:
    from snapshotd_tools.chaos.runner import Harness


def run_transient(h: Harness, sc: Scenario, obs: Observation, res: Result) -> None:
    """A transient fault the job must run through, then a restart drill that must restore
    the newest committed version bit-exactly."""
    rig, g, p = h.rig, h.g, sc.params
    t_fault = time.monotonic()
    before = {n: rig.memory(n) for n in rig.nodes}
    h.drain(g)
    step_at_fault = min(g.last.values())
    detected: list[str] = []
    if sc.kind in ("hang_daemon", "slow_peer", "partition"):
        if sc.kind == "partition":
            nodes = resolve_nodes(p["nodes"], h.n, h.m, first=h.n - 1)
        else:
            nodes = [resolve_node(p["node"], h.n)]
        th = threading.Thread(target=_freeze, args=(h, sc, nodes, res), daemon=True)
        th.start()
        seen = False
        while th.is_alive():
            g.pump(0.1)
            if not seen and sc.kind != "slow_peer" and _sees_all_dead(h, nodes):
                detected.append(f"heartbeat: {','.join(nodes)} down after {time.monotonic() - t_fault:.1f}s")
                seen = True
        th.join()
        if sc.kind == "slow_peer":
            detected.append("none needed: each stall is shorter than the heartbeat timeout")
    elif sc.kind == "garbage":
        node = resolve_node(p["node"], h.n)
        pid = rig.pid(node)
        res.fault, seen = (faults.garbage_grpc if p["plane"] == "grpc" else faults.garbage_zmq)(rig, node)
        alive = rig.stats(node) is not None and rig.pid(node) == pid
        obs.garbage = dict(seen, plane=p["plane"], alive=alive)  # judged by garbage_refused
        codes = sorted(set(seen["answers"].values()))
        detected.append(f"answered {'/'.join(codes) or 'nothing'}; daemon "
                        f"{'still serving' if alive else 'DOWN'}")
    elif sc.kind == "stall_server":
        res.fault = stall_serving_thread(h, resolve_node(p["node"], h.n), p["seconds"], p["mode"],
                                         obs, detected)
    else:  # memory_pressure
        node = resolve_node(p["node"], h.n)
        res.fault = faults.push_over_budget(rig, node)
        detected.append("RESOURCE_EXHAUSTED" if "refused" in res.fault else "not refused")
    h.say(f"    fault: {res.fault}; detected: {'; '.join(detected) or '-'}")
    # The job must run through it: two more steps (or the end of its epoch), no rank failed.
    h.drain(g)
    goal = min(h.steps, max(g.last.values()) + 2)
    g.wait(lambda: min(g.last.values()) >= goal or len(g.ended) == h.n
           or any(rc != 0 for rc in g.ended.values()), PHASE_TIMEOUT_S, f"step {goal}")
    detected.append(f"job at step {step_at_fault} when it hit")
    res.detected = "; ".join(detected)
    if any(rc != 0 for rc in g.ended.values()):
        obs.errors = g.error_lines()
        raise RuntimeError(f"the job did not run through the fault: {obs.errors[:2]}")
    # A drill: a planned restart must restore the newest committed version bit-exactly.
    g.kill()
    h.drain(g)
    obs.fault_step = max(g.last.values())
    obs.committed_at_fault = h.trainer_committed()
    obs.daemon_committed = h.committed_now()
    h.wait_whole(max(obs.committed_at_fault, obs.daemon_committed))
    res.recovery_s = round(time.monotonic() - t_fault, 2)
    g2 = h.resume("drill", obs, obs.fault_step)
    res.lost_steps = obs.fault_step - min(g2.restored.values(), default=0)
    res.recovery = (f"ran through; restart drill restored v{min(g2.restored.values(), default=0)}"
                    if g2.restored else "ran through; restart drill FAILED")
    h.settle(obs, before)

def _sees_all_dead(h: Harness, nodes: list[str]) -> bool:
    observer = next(n for n in h.rig.nodes if n not in nodes)
    return all(h.rig.sees_dead(observer, x) for x in nodes)

def _freeze(h: Harness, sc: Scenario, nodes: list[str], res: Result) -> None:
    rig, p = h.rig, sc.params
    pids = [rig.pid(n) for n in nodes]
    if sc.kind == "slow_peer":
        res.fault = (f"{nodes[0]}'s daemon slowed for {p['seconds']}s "
                     f"(SIGSTOP {p['stop_ms']}ms / SIGCONT {p['run_ms']}ms)")
        t_end = time.monotonic() + p["seconds"]
        while time.monotonic() < t_end:
            rig.stop(pids[0])
            time.sleep(p["stop_ms"] / 1000)
            rig.cont(pids[0])
            time.sleep(p["run_ms"] / 1000)
        return
    if sc.kind == "partition" and rig.net is not None:
        res.fault = (f"{','.join(nodes)} cut off for {p['seconds']}s (links down; daemons in "
                     "network namespaces)")
        h.partition_mode.cut(rig.net, [rig.nodes.index(n) for n in nodes], p["seconds"])
        return
    how = "SIGSTOP (fallback: no network namespaces)" if sc.kind == "partition" else "SIGSTOP"
    res.fault = f"{','.join(nodes)} {'cut off' if sc.kind == 'partition' else 'hung'} for {p['seconds']}s ({how})"
    for pid in pids:
        rig.stop(pid)
    time.sleep(p["seconds"])
    for pid in pids:
        rig.cont(pid)
