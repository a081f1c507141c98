"""Runs scenarios against real processes and judges them (``snapshotd chaos``).

For each scenario: a fresh local cluster (N daemons, m parity; booting one takes about
2 s, and a fresh one makes the leak check exact: after ``down`` nothing of it may
remain), the data-parallel job (one trainer per node, a snapshot every step), the fault,
the recovery an operator or an elastic launcher would carry out, and the invariants
(``invariants.py``). The reference is the same job run once without snapshots and
without faults; its per-step state digests are cached in the work directory.

Three shapes of scenario:
- crash (kill_trainer, kill_daemon, kill_node, mid_snapshot, hang_trainer): the fault
  stops the job; the launcher kills the remaining trainers, lost daemons are restarted
  (a lost machine: wiped, then rebuilt from its group), and the job restarts from its
  last committed version and runs to the end;
- transient (hang_daemon, slow_peer, partition, garbage, memory_pressure): the job runs
  through the fault; afterwards the last version must commit and restore bit-exactly;
- corrupt: after the job finished, a bit is flipped in a held block; a restore must
  refuse it (checksum), the holder is replaced, and the restore is then bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

from snapshotd.chaos import faults
from snapshotd.chaos.invariants import Observation, check
from snapshotd.chaos.report import Result
from snapshotd.chaos.rig import JOB, Rig, Trainers
from snapshotd.chaos.scenarios import Scenario, resolve_node, resolve_nodes
from snapshotd.config import parse_size

PHASE_TIMEOUT_S = 120.0
REBUILD_TIMEOUT_S = 60.0
CRASH = {"kill_trainer", "kill_daemon", "kill_node", "mid_snapshot", "hang_trainer"}
TRANSIENT = {"hang_daemon", "slow_peer", "partition", "garbage", "memory_pressure"}


class Harness:
    def __init__(self, workdir: str, nodes: int = 4, parity: int = 2, steps: int = 14,
                 block_size: str = "16KiB", budget: str = "256MiB", say=print, keep: bool = False):
        if nodes < 2 or not 1 <= parity < nodes:
            raise ValueError("need nodes >= 2 and 1 <= parity < nodes")
        if steps < 8:
            raise ValueError("need at least 8 steps")
        self.workdir, self.n, self.m, self.steps = os.path.abspath(workdir), nodes, parity, steps
        self.block_size, self.bs, self.budget = block_size, parse_size(block_size), budget
        self.say, self.keep = say, keep
        self.ref: list[str] = []
        self.partition_mode = None
        os.makedirs(self.workdir, exist_ok=True)

    # -- the reference -------------------------------------------------------------
    def reference(self) -> list[str]:
        """State digest per step (index 0 = initial) of the job run without failures or
        snapshots; computed once per (nodes, steps) and cached in the work directory."""
        path = os.path.join(self.workdir, f"reference-w{self.n}-s{self.steps}.json")
        if os.path.exists(path):
            with open(path) as f:
                self.ref = json.load(f)["digests"]
            self.say(f"reference: {len(self.ref) - 1} steps, cached in {path}")
            return self.ref
        self.say(f"reference: {self.n} data-parallel trainers, {self.steps} steps, no snapshots ...")
        t0 = time.monotonic()
        d = os.path.join(self.workdir, "reference")
        os.makedirs(d, exist_ok=True)
        g = Trainers(d, "reference", self.n, self.steps, None)
        try:
            g.wait_end(PHASE_TIMEOUT_S)
        finally:
            g.kill()
        if any(g.ended.values()):
            raise RuntimeError(f"reference run failed: {g.error_lines()}")
        by_step: dict[int, set] = {}
        for rank, step, digest, _ in g.digests:
            by_step.setdefault(step, set()).add(digest)
        bad = {s: v for s, v in by_step.items() if len(v) != 1}
        if bad or sorted(by_step) != list(range(self.steps + 1)):
            raise RuntimeError(f"reference run: replicas disagree or steps missing ({sorted(bad)})")
        self.ref = [by_step[s].pop() for s in range(self.steps + 1)]
        with open(path, "w") as f:
            json.dump({"world": self.n, "steps": self.steps, "digests": self.ref}, f)
        self.say(f"reference: done in {time.monotonic() - t0:.1f} s")
        return self.ref

    # -- scenarios ---------------------------------------------------------------------
    def run(self, scenarios: list[Scenario]) -> list[Result]:
        if not self.ref:
            self.reference()
        out = []
        for i, sc in enumerate(scenarios, 1):
            self.say(f"[{i}/{len(scenarios)}] {sc.name}: {sc.kind} {sc.params} at step {sc.at_step}")
            r = self.run_one(sc, i)
            out.append(r)
            verdict = "held" if r.ok else "FAILED: " + "; ".join(f"{c.name}: {c.detail}" for c in r.failed())
            self.say(f"    -> {r.recovery}; {verdict} ({r.seconds:.1f} s)")
        return out

    def run_one(self, sc: Scenario, index: int = 1) -> Result:
        if sc.at_step > self.steps - 3:
            raise ValueError(f"scenario {sc.name}: at_step {sc.at_step} leaves too few of {self.steps} steps")
        t0 = time.monotonic()
        d = os.path.join(self.workdir, f"{index:03d}-{sc.name}")
        shutil.rmtree(d, ignore_errors=True)
        res = Result(sc.name, sc.kind, params={"kind": sc.kind, **sc.params, "at_step": sc.at_step})
        obs = Observation(sc.expect, self.steps, self.ref)
        launches: list[Trainers] = []
        rig = None
        try:
            m = sc.params["parity"] if sc.kind == "pipeline_loss" else self.m
            rig = Rig(d, self.n, m, self.block_size, self.budget,
                      netns=sc.kind == "partition" and self.partition_mode is not None)
            if sc.kind == "pipeline_loss":
                from snapshotd.chaos.pipeline import run_pipeline

                run_pipeline(self, rig, sc, obs, res, launches)
            elif sc.kind in CRASH:
                self._crash(rig, sc, obs, res, launches)
            elif sc.kind in TRANSIENT:
                self._transient(rig, sc, obs, res, launches)
            else:
                self._corrupt(rig, sc, obs, res, launches)
        except Exception as exc:  # the harness could not finish: a failure, never a pass
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            for g in launches:
                obs.leaks += g.leaked()
                g.kill()
                obs.digests += [(g.tag, *x) for x in g.digests]
            if rig is not None:
                obs.leaks += rig.down()
            elif os.path.exists(os.path.join(d, "cluster.json")):  # interrupted while booting
                from snapshotd import localcluster as lc

                lc.down(d)
        res.checks = check(obs)
        res.seconds = time.monotonic() - t0
        if res.ok and not self.keep:
            shutil.rmtree(d, ignore_errors=True)
        return res

    def _launch(self, rig: Rig, launches: list, tag: str, steps: int | None = None,
                step_delay_s: float = 0.0) -> Trainers:
        extra = ("--step-delay-s", f"{step_delay_s:.3f}") if step_delay_s else ()
        g = Trainers(rig.d, tag, self.n, steps or self.steps, rig.socks, extra)
        launches.append(g)
        return g

    def _committed_now(self, rig: Rig, skip=(), job: str = JOB) -> int:
        """The newest version any answering node reports committed, once it stops moving."""
        last = None
        for _ in range(20):
            now = max([rig.committed(n, job) for n in rig.nodes if n not in skip] + [0])
            if now == last:
                break
            last = now
            time.sleep(0.15)
        return last or 0

    def _wait_whole(self, rig: Rig, version: int) -> float:
        t0 = time.monotonic()
        while not rig.whole(version):
            if time.monotonic() - t0 > REBUILD_TIMEOUT_S:
                raise TimeoutError(f"redundancy not whole again (v{version} on every node, nothing "
                                   f"degraded) {REBUILD_TIMEOUT_S:.0f} s after recovery")
            time.sleep(0.2)
        return time.monotonic() - t0

    def _detect_dead(self, rig: Rig, dead: list[str], t_fault: float, limit_s: float = 6.0) -> str:
        observer = next((n for n in rig.nodes if n not in dead), None)
        if observer is None:
            return "-"
        while time.monotonic() - t_fault < limit_s:
            if all(rig.sees_dead(observer, x) for x in dead):
                return f"heartbeat: {observer} saw {','.join(dead)} down after {time.monotonic() - t_fault:.1f}s"
            time.sleep(0.1)
        return f"heartbeat: not within {limit_s:.0f}s"

    # -- crash ------------------------------------------------------------------------
    def _crash(self, rig: Rig, sc: Scenario, obs: Observation, res: Result, launches: list) -> None:
        p = sc.params
        g = self._launch(rig, launches, "run")
        g.wait(lambda: g.last[0] >= sc.at_step, PHASE_TIMEOUT_S, f"step {sc.at_step}")
        before = {n: rig.memory(n) for n in rig.nodes}
        lost: list[tuple[str, bool]] = []  # (node, wiped)
        detect = ""
        if sc.kind == "kill_trainer":
            node = resolve_node(p["node"], self.n)
            t_fault = time.monotonic()
            g.kill(rig.nodes.index(node))
            res.fault = f"SIGKILL trainer of {node} after step {g.last[0]}"
        elif sc.kind == "hang_trainer":
            node = resolve_node(p["node"], self.n)
            t_fault = time.monotonic()
            rig.stop(g.procs[rig.nodes.index(node)].pid)
            res.fault = f"SIGSTOP trainer of {node} after step {g.last[0]}"
        elif sc.kind == "kill_daemon":
            node = resolve_node(p["node"], self.n)
            t_fault = time.monotonic()
            pid = rig.kill_daemon(node)
            lost = [(node, False)]
            res.fault = f"SIGKILL daemon {node} (pid {pid}); its shm stays"
        elif sc.kind == "kill_node":
            nodes = resolve_nodes(p["nodes"], self.n, self.m)
            t_fault = time.monotonic()
            for x in nodes:
                g.kill(rig.nodes.index(x))
                rig.kill_daemon(x)
            lost = [(x, True) for x in nodes]
            res.fault = f"SIGKILL node{'s' if len(nodes) > 1 else ''} {','.join(nodes)} (daemon+trainer), wiped"
        else:  # mid_snapshot
            node = resolve_node(p["node"], self.n)
            t_fault, res.fault = self._mid_snapshot(rig, g, node, p["phase"])
            lost = [(node, True)]
        self.say(f"    fault: {res.fault}")
        dead = [x for x, _ in lost]
        if dead:
            detect = self._detect_dead(rig, dead, t_fault)
        # The launcher: the other ranks fail (gloo) or hang; restart the whole job.
        grace = 25.0 if sc.kind == "hang_trainer" else 3.0
        culprit = {rig.nodes.index(x) for x in dead}
        if sc.kind in ("kill_trainer", "hang_trainer"):
            culprit.add(rig.nodes.index(resolve_node(p["node"], self.n)))
        t_end = time.monotonic() + grace
        while time.monotonic() < t_end and not any(
                rc != 0 for r, rc in g.ended.items() if r not in culprit):
            g.pump(0.1)
        failed = sorted(r for r, rc in g.ended.items() if rc != 0 and r not in culprit)
        trainer_note = (f"rank {failed[0]} failed after {time.monotonic() - t_fault:.1f}s"
                        if failed else "no rank failed by itself: launcher")
        res.detected = "; ".join(x for x in (detect, trainer_note) if x)
        g.kill()
        while g.pump(0.05):
            pass
        obs.fault_step = max(g.last.values())
        obs.committed_at_fault = self._committed_now(rig, skip=dead)
        self.say(f"    detected: {res.detected}; trainers stopped at step {obs.fault_step}, "
                 f"v{obs.committed_at_fault} committed")
        steps_recovery = []
        for node, wipe in lost:
            rig.restart(node, wipe)
            steps_recovery.append(f"{'replaced' if wipe else 'restarted'} {node}")
        if sc.expect == "resume" and lost:
            took = self._wait_whole(rig, obs.committed_at_fault)
            self.say(f"    {', '.join(steps_recovery)}: redundancy whole after {took:.1f} s")
        g2 = self._launch(rig, launches, "resumed")
        g2.wait(lambda: len(g2.restored) == self.n or len(g2.ended) > 0, PHASE_TIMEOUT_S, "restore")
        self.say(f"    job restarted: restored steps {sorted(set(g2.restored.values())) or 'none'}")
        g2.wait_end(PHASE_TIMEOUT_S)
        obs.restore_points = dict(g2.restored)
        obs.resumed_to = dict(g2.last)
        obs.errors = g2.error_lines()
        if sc.expect == "resume":
            how = "rebuilt from the group" if any(w for _, w in lost) else "re-adopted its shm" if lost else ""
            res.recovery = ", ".join(steps_recovery + ([how] if how else []) +
                                     [f"job restarted from v{min(g2.restored.values(), default=0)}"])
            res.recovery_s = round(g2.t_restored - t_fault, 2) if g2.t_restored else None
            res.lost_steps = obs.fault_step - min(g2.restored.values(), default=0)
            self._wait_whole(rig, self.steps)
            obs.memory = {n: (before[n], rig.memory(n)) for n in rig.nodes}
            obs.leaks += rig.accounting_leaks()
        else:
            res.recovery = ", ".join(steps_recovery + ["restore refused (FAILED_PRECONDITION)"])
            res.recovery_s = round(time.monotonic() - t_fault, 2)

    def _mid_snapshot(self, rig: Rig, g: Trainers, node: str, phase: str) -> tuple[float, str]:
        """Kill ``node`` (daemon + trainer) at a chosen point of the life of a version."""
        i = rig.nodes.index(node)
        if phase == "after_exchange":
            # Right after this daemon logged a new commit: its parity exchange and its
            # vote are done; the other nodes may not have committed that version yet.
            seen = len(rig.log_tail(node, 10_000))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                lines = rig.log_tail(node, 10_000)
                hit = [x for x in lines[seen:] if f"job {JOB}: version" in x and "committed" in x]
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
            frozen = rig.pid(rig.nodes[(i + 1) % self.n])
            what = f"{rig.nodes[(i + 1) % self.n]} frozen at step {start}, exchange in flight"
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

    # -- transient ---------------------------------------------------------------------
    def _transient(self, rig: Rig, sc: Scenario, obs: Observation, res: Result, launches: list) -> None:
        p = sc.params
        # Slow the job down so that it is still running when the fault ends.
        delay = (float(p.get("seconds", 1.0)) + 2) / (self.steps - sc.at_step)
        g = self._launch(rig, launches, "run", step_delay_s=delay)
        g.wait(lambda: g.last[0] >= sc.at_step, PHASE_TIMEOUT_S, f"step {sc.at_step}")
        t_fault = time.monotonic()
        before = {n: rig.memory(n) for n in rig.nodes}
        obs.committed_at_fault = max(rig.committed(n) for n in rig.nodes)
        while g.pump(0):  # the steps reported meanwhile
            pass
        step_at_fault = g.last[0]
        detected: list[str] = []
        if sc.kind in ("hang_daemon", "slow_peer", "partition"):
            if sc.kind == "partition":
                nodes = resolve_nodes(p["nodes"], self.n, self.m, first=self.n - 1)
            else:
                nodes = [resolve_node(p["node"], self.n)]
            stop = threading.Event()
            th = threading.Thread(target=self._freeze, args=(rig, sc, nodes, stop, res), daemon=True)
            th.start()
            seen = False
            while th.is_alive():
                g.pump(0.1)
                if not seen and sc.kind != "slow_peer" and self._sees_all_dead(rig, nodes):
                    detected.append(f"heartbeat: {','.join(nodes)} down after {time.monotonic() - t_fault:.1f}s")
                    seen = True
            th.join()
            if sc.kind == "slow_peer":
                detected.append("none needed: each stall is shorter than the heartbeat timeout")
        elif sc.kind == "garbage":
            node = resolve_node(p["node"], self.n)
            pid = rig.pid(node)
            res.fault = (faults.garbage_grpc if p["plane"] == "grpc" else faults.garbage_zmq)(rig, node)
            alive = rig.stats(node) is not None and rig.pid(node) == pid
            detected.append("refused; daemon still serving" if alive else "daemon DOWN")
            if not alive:
                obs.leaks.append(f"{node}'s daemon died of garbage input")
        else:  # memory_pressure
            node = resolve_node(p["node"], self.n)
            res.fault = faults.push_over_budget(rig, node)
            detected.append("RESOURCE_EXHAUSTED" if "refused" in res.fault else "not refused")
        self.say(f"    fault: {res.fault}; detected: {'; '.join(detected) or '-'}")
        g.wait_end(PHASE_TIMEOUT_S)
        if g.last[0] >= self.steps and step_at_fault >= self.steps:
            raise RuntimeError("the job had finished before the fault: nothing was tested")
        detected.append(f"job at step {step_at_fault} when it hit")
        res.detected = "; ".join(detected) or "-"
        obs.fault_step = self.steps
        if any(g.ended.values()):
            obs.errors = g.error_lines()
            raise RuntimeError(f"the job did not run through the fault: {obs.errors[:2]}")
        # Nothing was lost: the last version commits, and restores bit-exactly.
        self._wait_whole(rig, self.steps)
        res.recovery_s = round(time.monotonic() - t_fault, 2)
        probe = self._launch(rig, launches, "probe")
        probe.wait_end(PHASE_TIMEOUT_S)
        obs.restore_points, obs.resumed_to = dict(probe.restored), dict(probe.last)
        obs.errors = probe.error_lines()
        res.lost_steps = 0
        res.recovery = f"ran through; v{self.steps} committed and restored"
        obs.memory = {n: (before[n], rig.memory(n)) for n in rig.nodes}
        obs.leaks += rig.accounting_leaks()

    def _sees_all_dead(self, rig: Rig, nodes: list[str]) -> bool:
        observer = next(n for n in rig.nodes if n not in nodes)
        return all(rig.sees_dead(observer, x) for x in nodes)

    def _freeze(self, rig: Rig, sc: Scenario, nodes: list[str], stop, res: Result) -> None:
        p = sc.params
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
            self.partition_mode.cut(rig.net, [rig.nodes.index(n) for n in nodes], p["seconds"])
            return
        how = "SIGSTOP (fallback: no network namespaces)" if sc.kind == "partition" else "SIGSTOP"
        res.fault = f"{','.join(nodes)} {'cut off' if sc.kind == 'partition' else 'hung'} for {p['seconds']}s ({how})"
        for pid in pids:
            rig.stop(pid)
        time.sleep(p["seconds"])
        for pid in pids:
            rig.cont(pid)

    # -- corruption --------------------------------------------------------------------
    def _corrupt(self, rig: Rig, sc: Scenario, obs: Observation, res: Result, launches: list) -> None:
        node = resolve_node(sc.params["node"], self.n)
        g = self._launch(rig, launches, "run")
        g.wait_end(PHASE_TIMEOUT_S)
        if any(g.ended.values()):
            raise RuntimeError(f"the job failed before the fault: {g.error_lines()[:2]}")
        self._wait_whole(rig, self.steps)
        before = {n: rig.memory(n) for n in rig.nodes}
        obs.committed_at_fault = obs.fault_step = self.steps
        t_fault = time.monotonic()
        replaced = []
        if sc.params["block"] == "data":
            res.fault = faults.flip_data_bit(rig, node, self.bs)
        else:
            res.fault = faults.flip_parity_bits(rig, node, self.bs)
            # The parity matters only to a rebuild: lose another node, whose rebuild
            # reads the group's parity (ours included).
            other = rig.nodes[(rig.nodes.index(node) + 1) % self.n]
            for x in (other,):
                rig.kill_daemon(x)
                rig.restart(x, wipe=True)
                replaced.append(x)
            res.fault += f"; then {other} lost and replaced"
        self.say(f"    fault: {res.fault}; restoring v{self.steps}")
        probe = self._launch(rig, launches, "probe")
        probe.wait_end(PHASE_TIMEOUT_S)
        errs = probe.error_lines()
        if not any(probe.ended.values()):
            # Restored without complaint: bit_identical decides whether that was right.
            res.detected = "not detected: the restore did not need the corrupt block"
            obs.restore_points, obs.resumed_to = dict(probe.restored), dict(probe.last)
            res.recovery = "restored directly"
        else:
            why = [e for e in errs if "checksum" in e.lower() or "corrupt" in e.lower()]
            res.detected = f"checksum: {why[0][:90]}" if why else f"restore failed: {errs[:1]}"
            obs.errors = errs
            self.say(f"    detected: {res.detected}; replacing {node}")
            # The operator's answer to a block that fails its checksum: replace its holder.
            rig.kill_daemon(node)
            rig.restart(node, wipe=True)
            replaced.append(node)
            self._wait_whole(rig, self.steps)
            probe2 = self._launch(rig, launches, "probe2")
            probe2.wait_end(PHASE_TIMEOUT_S)
            obs.restore_points, obs.resumed_to = dict(probe2.restored), dict(probe2.last)
            obs.errors += probe2.error_lines()
            res.recovery = f"restore refused; {node} replaced, rebuilt from peers, restored v{self.steps}"
            res.recovery_s = round((probe2.t_restored or time.monotonic()) - t_fault, 2)
        res.lost_steps = self.steps - min(obs.restore_points.values(), default=0)
        self._wait_whole(rig, self.steps)
        obs.memory = {n: (before[n], rig.memory(n)) for n in rig.nodes}
        obs.leaks += rig.accounting_leaks()


def meta(h: Harness) -> dict:
    import platform

    return {"nodes": h.n, "parity": h.m, "steps": h.steps, "block_size": h.block_size,
            "budget": h.budget, "python": platform.python_version(),
            "partition": "network namespaces" if h.partition_mode is not None else "SIGSTOP fallback",
            "unsafe_skip_verify": os.environ.get("SNAPSHOTD_UNSAFE_SKIP_VERIFY") == "1"}
