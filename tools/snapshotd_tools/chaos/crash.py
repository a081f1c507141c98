"""Crash faults of ``snapshotd chaos``: kill_trainer, hang_trainer, kill_daemon, kill_node, mid_snapshot.

The fault stops the job; then what a launcher and an operator would do: the remaining
ranks are killed, lost daemons restarted (a lost machine: wiped, then rebuilt from its
group), and the job restarts from its last committed version and trains on past the
step it had reached. With more than m nodes lost the restore must refuse, and the job
starts a new epoch from scratch. Driven by the Harness (``runner.py``), through its
public session operations, from the harness's thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from snapshotd_tools.chaos.invariants import Observation
from snapshotd_tools.chaos.overlap import Overlap, after_restart, during_commit, resume_through
from snapshotd_tools.chaos.report import Result
from snapshotd_tools.chaos.scenarios import Scenario, resolve_node, resolve_nodes
from snapshotd_tools.chaos.timeouts import GLOO_TIMEOUT_S, PHASE_TIMEOUT_S

if TYPE_CHECKING:
    from snapshotd_tools.chaos.rig import Trainers
    from snapshotd_tools.chaos.runner import Harness


def run_crash(h: Harness, sc: Scenario, obs: Observation, res: Result) -> None:
    """A crash fault, the launcher's restart and the restore; with more than m nodes
    lost the restore must refuse and the job starts a new epoch."""
    rig, g, p = h.rig, h.g, sc.params
    before = {n: rig.memory(n) for n in rig.nodes}
    h.drain(g)  # the steps reported meanwhile: the fault text quotes them
    lost: list[tuple[str, bool]] = []  # (node, wiped)
    detect = ""
    if sc.kind == "kill_trainer":
        node = resolve_node(p["node"], h.n)
        t_fault = time.monotonic()
        g.kill(rig.nodes.index(node))
        res.fault = f"SIGKILL trainer of {node} after step {g.last[rig.nodes.index(node)]}"
    elif sc.kind == "hang_trainer":
        node = resolve_node(p["node"], h.n)
        t_fault = time.monotonic()
        rig.stop(g.procs[rig.nodes.index(node)].pid)
        res.fault = f"SIGSTOP trainer of {node} after step {g.last[rig.nodes.index(node)]}"
    elif sc.kind == "kill_daemon":
        node = resolve_node(p["node"], h.n)
        t_fault = time.monotonic()
        pid = rig.kill_daemon(node)
        lost = [(node, False)]
        res.fault = f"SIGKILL daemon {node} (pid {pid}); its shm stays"
    elif sc.kind == "kill_node":
        nodes = resolve_nodes(p["nodes"], h.n, h.m)
        t_fault = time.monotonic()
        for x in nodes:
            g.kill(rig.nodes.index(x))
            rig.kill_daemon(x)
        lost = [(x, True) for x in nodes]
        res.fault = f"SIGKILL node{'s' if len(nodes) > 1 else ''} {','.join(nodes)} (daemon+trainer), wiped"
    else:  # mid_snapshot
        node = resolve_node(p["node"], h.n)
        t_fault, res.fault = _mid_snapshot(h, g, node, p["phase"])
        lost = [(node, True)]
    h.say(f"    fault: {res.fault}")
    dead = [x for x, _ in lost]
    if dead:
        detect = h.detect_dead(dead, t_fault)
    # The launcher: the other ranks fail (gloo) or hang; restart the whole job.
    grace = GLOO_TIMEOUT_S + 5 if sc.kind == "hang_trainer" else 3.0
    culprit = {rig.nodes.index(x) for x in dead}
    if sc.kind in ("kill_trainer", "hang_trainer"):
        culprit.add(rig.nodes.index(resolve_node(p["node"], h.n)))
    t_end = time.monotonic() + grace
    while time.monotonic() < t_end and not any(
            rc != 0 for r, rc in g.ended.items() if r not in culprit):
        g.pump(0.1)
    failed = sorted(r for r, rc in g.ended.items() if rc != 0 and r not in culprit)
    trainer_note = (f"rank {failed[0]} failed after {time.monotonic() - t_fault:.1f}s"
                    if failed else "no rank failed by itself: launcher")
    res.detected = "; ".join(x for x in (detect, trainer_note) if x)
    g.kill()
    h.drain(g)
    obs.fault_step = max(g.last.values())
    obs.committed_at_fault = h.trainer_committed()
    obs.daemon_committed = h.committed_now(skip=dead)
    h.say(f"    detected: {res.detected}; trainers stopped at step {obs.fault_step}, "
             f"v{obs.committed_at_fault} committed (trainers' record; daemons: v{obs.daemon_committed})")
    ov = Overlap(h, sc.overlap, dead)
    steps_recovery = []
    for node, wipe in lost:
        if not (wipe and ov.holds_back(node)):  # degraded_read: started after the overlap
            rig.restart(node, wipe)
        steps_recovery.append(f"{'replaced' if wipe else 'restarted'} {node}")
    floor_v = max(obs.committed_at_fault, obs.daemon_committed)
    after_restart(ov, floor_v)
    if sc.expect == "resume" and lost and not ov.at("degraded_read"):
        took = h.wait_whole(floor_v)
        h.say(f"    {', '.join(steps_recovery)}: redundancy whole after {took:.1f} s")
    g2 = resume_through(ov, obs, obs.fault_step)
    h.say(f"    job restarted: restored steps {sorted(set(g2.restored.values())) or 'none'}")
    if sc.expect == "resume" and len(g2.restored) == h.n:
        during_commit(ov, g2)
    if ov.spec:
        res.overlap = (ov.fired + ov.evidence) if ov.fired else \
            f"NOT injected: the recovery never reached '{ov.during}'"
        if not ov.fired:
            obs.notes.append(res.overlap)
            raise RuntimeError(f"overlap {ov.during}: {res.overlap}")
    if sc.expect == "resume":
        how = "rebuilt from the group" if any(w for _, w in lost) else "re-adopted its shm" if lost else ""
        res.recovery = ", ".join(steps_recovery + ([how] if how else []) +
                                 [f"job restarted from v{min(g2.restored.values(), default=0)}"])
        res.recovery_s = round(g2.t_restored - t_fault, 2) if g2.t_restored else None
        res.lost_steps = obs.fault_step - min(g2.restored.values(), default=0)
        h.settle(obs, before)
    else:
        g2.wait_end(PHASE_TIMEOUT_S)
        obs.errors = g2.error_lines()
        res.recovery = ", ".join(steps_recovery + ["restore refused (FAILED_PRECONDITION)"])
        res.recovery_s = round(time.monotonic() - t_fault, 2)
        # The state is gone from memory: the job starts over (from a durable
        # checkpoint, where it has one; from scratch here).
        h.new_epoch("more than m nodes lost: the job starts over")
        # The new epoch must commit, and the daemons' memory come back.
        h.await_commit(obs, h.g.t_launch, 0)
        h.wait_whole(1)
        obs.memory = {n: (before[n], rig.memory(n)) for n in rig.nodes}
        obs.leaks += rig.accounting_leaks()

def _mid_snapshot(h: Harness, g: Trainers, node: str, phase: str) -> tuple[float, str]:
    """Kill ``node`` (daemon + trainer) at a chosen point of the life of a version."""
    rig = h.rig
    i = rig.nodes.index(node)
    if phase == "after_exchange":
        # Right after this daemon logged a new commit: its parity exchange and its
        # vote are done; the other nodes may not have committed that version yet.
        seen = len(rig.log_tail(node, 100_000))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = rig.log_tail(node, 100_000)
            hit = [x for x in lines[seen:] if f"job {rig.job}: version" in x and "committed" in x]
            if hit:
                break
            g.pump(0.005)
        else:
            raise TimeoutError(f"{node} logged no commit within 30 s")
        t = time.monotonic()
        g.kill(i)
        rig.kill_daemon(node)
        v = hit[-1].split("version ")[1].split()[0]
        return t, f"SIGKILL node {node} right after it committed v{v}, wiped"
    start = g.last[0]
    if phase == "before_exchange":
        # The daemon is frozen: its rank's next versions are handed over but never
        # adopted or announced, so no parity exchange starts for them.
        frozen = rig.pid(node)
        what = f"{node}'s daemon frozen at step {start}"
    else:
        # A parity holder is frozen: every other node announces and sends its
        # contributions, but the versions cannot seal and commit.
        frozen = rig.pid(rig.nodes[(i + 1) % h.n])
        what = f"{rig.nodes[(i + 1) % h.n]} frozen at step {start}, exchange in flight"
    rig.stop(frozen)
    try:
        # The frozen daemon soon stalls its own rank's saves, and so the job: give it
        # a few seconds to hand over (and tear) the next versions.
        g.wait(lambda: g.last[0] >= start + 2 or len(g.ended) > 0, 4, "two more steps")
    except TimeoutError:
        pass
    t = time.monotonic()
    g.kill(i)
    rig.kill_daemon(node)
    if frozen in rig.stopped:
        rig.cont(frozen)
    return t, f"SIGKILL node {node} ({what}; versions to {g.last[0]} torn), wiped"
