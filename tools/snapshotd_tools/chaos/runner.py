"""Runs scenarios against real processes and judges them (``snapshotd chaos``).

One session: one local cluster (N daemons, m parity) and one data-parallel training job
(one trainer per node, a snapshot every step) that runs for the whole session. Faults
are injected into the running job one after another (the matrix: each as soon as the
last one has recovered; the soak: at random times), and after each the recovery that an
operator or an elastic launcher would carry out is performed and the invariants
(``invariants.py``) are judged. The job runs in epochs of ``steps`` steps: at the end
of one, its last version must have committed, the job is dropped (its memory must come
back) and the next epoch starts from step 0 under a new job id.

Every state digest any rank reports, between faults too, is compared with the
failure-free reference (the same job without snapshots or faults, computed once and
cached in the work directory). Ranks are forked from a fork server that imported torch
once (``forkserver.py``), so restarting the job costs tenths of a second, not seconds.

Four shapes of fault:
- crash (kill_trainer, kill_daemon, kill_node, mid_snapshot, hang_trainer): the fault
  stops the job; the launcher kills the remaining ranks, lost daemons are restarted (a
  lost machine: wiped, then rebuilt from its group), and the job restarts from its last
  committed version and trains on past the step it had reached; with more than m
  nodes lost the restore must refuse, and the job starts a new epoch from scratch;
- transient (hang_daemon, slow_peer, partition, garbage, memory_pressure): the job runs
  through the fault; then a planned restart (a drill) must restore the newest committed
  version bit-exactly;
- corrupt: the job is stopped, a bit is flipped in a held block of its newest committed
  version; a restore must refuse it (checksum), the holder is replaced, and the restore
  is then bit-exact;
- pipeline_loss: the CheckFree rung, on a pipeline job and a cluster of its own
  (``pipeline.py``); the data-parallel job is paused meanwhile.

At the end the session is torn down and one more row, ``teardown``, checks that no
daemon, trainer or /dev/shm segment is left.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

from snapshotd_tools.chaos import faults
from snapshotd_tools.chaos.forkserver import ForkServer
from snapshotd_tools.chaos.invariants import Observation, check
from snapshotd_tools.chaos.report import Result
from snapshotd_tools.chaos.rig import JOB, Rig, Trainers
from snapshotd_tools.chaos.scenarios import Scenario, resolve_node, resolve_nodes
from snapshotd.wire.config import parse_size

PHASE_TIMEOUT_S = 120.0
REBUILD_TIMEOUT_S = 60.0
GLOO_TIMEOUT_S = 10.0  # longer than any transient fault, or the job would not run through it
# The daemons' scrub interval (their default is 600 s): short enough that a 'then: scrub'
# fault is found within a scenario, long enough that it rarely beats a restore to a block.
SCRUB_INTERVAL_S = 10.0
CRASH = {"kill_trainer", "kill_daemon", "kill_node", "mid_snapshot", "hang_trainer"}
TRANSIENT = {"hang_daemon", "slow_peer", "partition", "garbage", "memory_pressure"}


class Harness:
    def __init__(self, workdir: str, nodes: int = 4, parity: int = 2, steps: int = 80,
                 block_size: str = "16KiB", budget: str = "256MiB", say=print, keep: bool = False,
                 step_delay_s: float = 0.05):
        if nodes < 2 or not 1 <= parity < nodes:
            raise ValueError("need nodes >= 2 and 1 <= parity < nodes")
        if steps < 30:
            raise ValueError("need at least 30 steps per epoch")
        if step_delay_s < 0:
            raise ValueError("the step delay cannot be negative")
        self.workdir, self.n, self.m, self.steps = os.path.abspath(workdir), nodes, parity, steps
        self.block_size, self.bs, self.budget = block_size, parse_size(block_size), budget
        self.say, self.keep, self.delay = say, keep, step_delay_s
        self.ref: list[str] = []
        self.partition_mode = None
        self.fs: ForkServer | None = None
        self.rig: Rig | None = None
        self.g: Trainers | None = None  # the job's current launch
        self.launches: list[Trainers] = []
        self.epoch = 0
        self._taken: dict[int, int] = {}  # id(launch) -> digests already judged
        self.faults = 0
        self.broken = ""  # why the session could not be put back on its feet after an error
        os.makedirs(self.workdir, exist_ok=True)

    # -- the reference -------------------------------------------------------------
    def _forkserver(self) -> ForkServer:
        if self.fs is None:
            self.say("fork server: importing torch once for every rank of the session ...")
            self.fs = ForkServer(os.path.join(self.workdir, "forkserver.log"))
        return self.fs

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
        g = Trainers(d, "reference", self.n, self.steps, None, spawner=self._forkserver())
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

    # -- the session -----------------------------------------------------------------
    def open(self, netns: bool = False) -> None:
        """Boot the session's cluster and start the job's first epoch."""
        if not self.ref:
            self.reference()
        self._forkserver()
        d = os.path.join(self.workdir, "session")
        shutil.rmtree(d, ignore_errors=True)
        os.environ["SNAPSHOTD_SCRUB_INTERVAL_S"] = f"{SCRUB_INTERVAL_S:g}"  # for the daemons we start
        self.say(f"cluster: {self.n} daemons, m={self.m}{' in network namespaces' if netns else ''}; "
                 f"job: {self.n} ranks, epochs of {self.steps} steps, a snapshot every step")
        try:
            self.rig = Rig(d, self.n, self.m, self.block_size, self.budget, netns=netns)
        except BaseException:
            if os.path.exists(os.path.join(d, "cluster.json")):  # interrupted while booting
                from snapshotd_tools import localcluster as lc

                lc.down(d)
            raise
        self._launch("e0")

    def close(self, failed: bool = False) -> Result:
        """Tear everything down; the ``teardown`` row: nothing may be left behind."""
        res = Result("teardown", "-", params={"kind": "teardown"})
        obs = Observation("teardown", self.steps, self.ref)
        if self.g is not None:
            self.g.kill()
            self._drain(self.g)
        for g in self.launches:
            obs.leaks += g.leaked()
            g.kill()
        obs.digests += self._take_digests()
        if self.fs is not None:
            self.fs.close()
            self.fs = None
        if self.rig is not None:
            obs.leaks += self.rig.down()
            if not failed and not obs.leaks and not self.keep:
                shutil.rmtree(self.rig.d, ignore_errors=True)
            self.rig = None
        res.fault = "session torn down"
        res.recovery = f"{len(self.launches)} launches, {self.epoch + 1} epoch(s)"
        res.checks = [c for c in check(obs) if c.name in ("bit_identical", "no_leaks")]
        if not obs.digests:  # everything was judged by the faults already
            res.checks = [c for c in res.checks if c.name != "bit_identical"]
        return res

    def _launch(self, tag: str) -> Trainers:
        extra = ("--gloo-timeout-s", f"{GLOO_TIMEOUT_S:g}")
        if self.delay:
            extra += ("--step-delay-s", f"{self.delay:.3f}")
        g = Trainers(self.rig.d, f"{len(self.launches):04d}-{tag}", self.n, self.steps, self.rig.socks,
                     extra, job=self.rig.job, spawner=self.fs)
        self.launches.append(g)
        self.g = g
        return g

    @staticmethod
    def _drain(g: Trainers) -> None:
        while g.pump(0.05):
            pass

    def _take_digests(self) -> list:
        """The digests reported since the last call, over every launch: each is judged once."""
        out = []
        for g in self.launches:
            seen = self._taken.get(id(g), 0)
            out += [(g.tag, *x) for x in g.digests[seen:]]
            self._taken[id(g)] = len(g.digests)
        return out

    def _new_epoch(self, why: str) -> None:
        """Drop the job and start it again from step 0 under a new id."""
        if self.g is not None:
            self.g.kill()
            self._drain(self.g)
        self.rig.drop_job(self.rig.job)
        self.epoch += 1
        self.rig.job = f"{JOB}-{self.epoch}"
        self._launch(f"e{self.epoch}")
        self.say(f"    epoch {self.epoch}: job {self.rig.job} from step 0 ({why})")

    def _pump(self, timeout_s: float) -> None:
        """Keep the job going: fold its events, and roll over to the next epoch when it ends."""
        g = self.g
        g.pump(timeout_s)
        if len(g.ended) < self.n:
            if g.ended and any(rc != 0 for rc in g.ended.values()):
                self._job_failed(g)
            return
        if any(rc != 0 for rc in g.ended.values()) or min(g.last.values()) < self.steps:
            self._job_failed(g)
        # The epoch is done: its last version must commit on every node, then it is dropped.
        try:
            self._wait_whole(self.steps)
        finally:  # and the next one starts, whole or not (a timeout is reported as a failure)
            self._new_epoch(f"epoch {self.epoch} done")

    def _job_failed(self, g: Trainers) -> None:
        g.kill()
        self._drain(g)
        errs = g.error_lines()
        # Start it again from its last commit, so that the session goes on.
        self._launch("restarted")
        raise RuntimeError(f"the job failed outside any fault: {errs[:2]}")

    def _ready(self, after_start: int, margin: int, timeout_s: float = PHASE_TIMEOUT_S) -> None:
        """Wait until the job has trained ``after_start`` steps since its launch, has
        ``margin`` steps left in its epoch and the cluster's redundancy is whole."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._pump(0.05)
            g = self.g
            first = min(g.restored.values(), default=0)
            if min(g.last.values()) - first >= after_start and max(g.last.values()) <= self.steps - margin:
                if self.rig.whole(1):
                    return
        raise TimeoutError(f"the job was not ready for the next fault within {timeout_s:.0f} s "
                           f"(steps per rank {self.g.last})")

    # -- scenarios ---------------------------------------------------------------------
    def run(self, scenarios: list[Scenario]) -> list[Result]:
        """The matrix: every scenario in turn, on one cluster and one running job."""
        netns = self.partition_mode is not None and any(s.kind == "partition" for s in scenarios)
        out: list[Result] = []
        self.open(netns)
        try:
            for i, sc in enumerate(scenarios, 1):
                if self.broken:
                    self.say(f"stopping: {self.broken}; {len(scenarios) - i + 1} scenario(s) not run")
                    break
                self.say(f"[{i}/{len(scenarios)}] {sc.name}: {sc.kind} {sc.params}")
                out.append(self.inject(sc))
        finally:
            out.append(self._closed(out))
        return out

    def soak(self, events, duration_s: float, on_result=None) -> list[Result]:
        """Faults at the scheduled times (``scenarios.soak_schedule``) into the running job
        for ``duration_s``; a fault whose time comes while the last one is still being
        recovered from waits for it (the report says how late it ran)."""
        netns = self.partition_mode is not None
        out: list[Result] = []
        self.open(netns)
        t0 = time.monotonic()
        try:
            for i, ev in enumerate(events, 1):
                if self.broken:
                    self.say(f"soak: stopping: {self.broken}")
                    break
                if time.monotonic() - t0 >= duration_s:
                    self.say(f"soak: {duration_s:.0f} s are up; {len(events) - i + 1} scheduled "
                             "fault(s) not run")
                    break
                while time.monotonic() - t0 < ev.t_s:
                    try:
                        self._pump(min(0.2, ev.t_s - (time.monotonic() - t0)))
                    except Exception as exc:  # noqa: BLE001 - recorded as a failed row
                        out.append(self._between(exc, f"before-{ev.scenario.name}"))
                late = time.monotonic() - t0 - ev.t_s
                self.say(f"soak [{i}/{len(events)}] t={ev.t_s:.0f}s{f' (+{late:.0f}s late)' if late > 1 else ''} "
                         f"{ev.scenario.name}: {ev.scenario.kind} {ev.scenario.params}")
                r = self.inject(ev.scenario, after_start=2)
                r.params["t_s"], r.params["late_s"] = ev.t_s, round(max(0.0, late), 1)
                out.append(r)
                self.say(f"    {sum(x.ok for x in out)}/{len(out)} held so far")
                if on_result:
                    on_result(out)
        finally:
            out.append(self._closed(out))
        return out

    def _closed(self, results: list[Result]) -> Result:
        r = self.close(failed=any(not x.ok for x in results))
        self.say(f"teardown: {'nothing left behind' if r.ok else '; '.join(c.detail for c in r.failed())}")
        return r

    def _between(self, exc: Exception, name: str) -> Result:
        res = Result(name, "-", error=f"{type(exc).__name__}: {exc}", params={"kind": "between"})
        obs = Observation("between", self.steps, self.ref, digests=self._take_digests())
        res.checks = [c for c in check(obs) if c.name == "bit_identical"] if obs.digests else []
        self.say(f"    FAILED between faults: {res.error}")
        return res

    def inject(self, sc: Scenario, after_start: int | None = None) -> Result:
        """One fault into the running job, the recovery, and the verdict."""
        t0 = time.monotonic()
        self.faults += 1
        res = Result(sc.name, sc.kind, params={"kind": sc.kind, **sc.params, "at_step": sc.at_step})
        obs = Observation(sc.expect, self.steps, self.ref)
        launched = len(self.launches)
        try:
            seconds = float(sc.params.get("seconds", 0))
            margin = 12 + (int(seconds / max(self.delay, 0.05)) if sc.kind in TRANSIENT else 0)
            self._ready(min(sc.at_step if after_start is None else after_start, self.steps // 4),
                        min(margin, self.steps // 2))
            if sc.kind == "pipeline_loss":
                self._pipeline(sc, obs, res)
            elif sc.kind in CRASH:
                self._crash(sc, obs, res)
            elif sc.kind in TRANSIENT:
                self._transient(sc, obs, res)
            else:
                self._corrupt(sc, obs, res)
        except Exception as exc:  # the harness could not finish: a failure, never a pass
            res.error = f"{type(exc).__name__}: {exc}"
            try:
                self._salvage()
            except Exception as exc2:  # noqa: BLE001 - reported; the session stops
                self.broken = f"the session could not be recovered after {sc.name}: {exc2}"
                res.error += f"; {self.broken}"
        finally:
            for g in self.launches[max(0, launched - 1):]:
                if g is not self.g:
                    obs.leaks += g.leaked()
            obs.digests += self._take_digests()
        res.checks = check(obs)
        res.seconds = time.monotonic() - t0
        verdict = "held" if res.ok else "FAILED: " + "; ".join(f"{c.name}: {c.detail}" for c in res.failed())
        self.say(f"    -> {res.recovery}; {verdict} ({res.seconds:.1f} s)")
        return res

    def _salvage(self) -> None:
        """After a harness error, put the session back on its feet: everything continued,
        every daemon up, the job running again (from its last commit, or a new epoch)."""
        rig = self.rig
        for pid in list(rig.stopped):
            rig.cont(pid)
        if self.g is not None:
            self.g.kill()
            self._drain(self.g)
        for n in rig.nodes:
            if rig.stats(n) is None:
                rig.kill_daemon(n)
                rig.restart(n, wipe=True)
        try:
            self._wait_whole(1)
            self._launch("salvaged")
        except Exception:  # noqa: BLE001 - a fresh start
            self._new_epoch("the job could not be resumed after a harness error")

    def _committed_now(self, skip=(), job: str | None = None, rig: Rig | None = None) -> int:
        """The newest version any answering node reports committed, once it stops moving."""
        rig = rig or self.rig
        last = None
        for _ in range(20):
            now = max([rig.committed(n, job) for n in rig.nodes if n not in skip] + [0])
            if now == last:
                break
            last = now
            time.sleep(0.15)
        return last or 0

    def _wait_whole(self, version: int) -> float:
        t0 = time.monotonic()
        while not self.rig.whole(version):
            if time.monotonic() - t0 > REBUILD_TIMEOUT_S:
                raise TimeoutError(f"redundancy not whole again (v{version} on every node, nothing "
                                   f"degraded) {REBUILD_TIMEOUT_S:.0f} s after recovery")
            time.sleep(0.1)
        return time.monotonic() - t0

    def _detect_dead(self, dead: list[str], t_fault: float, limit_s: float = 6.0,
                     rig: Rig | None = None) -> str:
        rig = rig or self.rig
        observer = next((n for n in rig.nodes if n not in dead), None)
        if observer is None:
            return "-"
        while time.monotonic() - t_fault < limit_s:
            if all(rig.sees_dead(observer, x) for x in dead):
                return f"heartbeat: {observer} saw {','.join(dead)} down after {time.monotonic() - t_fault:.1f}s"
            time.sleep(0.1)
        return f"heartbeat: not within {limit_s:.0f}s"

    def _resume(self, tag: str, obs: Observation, floor: int) -> Trainers:
        """Launch the job again; it must restore, then train two steps past ``floor``."""
        g2 = self._launch(tag)
        g2.wait(lambda: len(g2.restored) == self.n or any(rc != 0 for rc in g2.ended.values()),
                PHASE_TIMEOUT_S, "restore")
        if len(g2.restored) == self.n:
            obs.final_step = min(self.steps, max(floor, max(g2.restored.values())) + 2)
            g2.wait(lambda: min(g2.last.values()) >= obs.final_step or len(g2.ended) == self.n
                    or any(rc != 0 for rc in g2.ended.values()), PHASE_TIMEOUT_S,
                    f"training on to step {obs.final_step}")
        obs.restore_points = dict(g2.restored)
        obs.resumed_to = dict(g2.last)
        obs.errors += g2.error_lines()
        return g2

    def _settle(self, obs: Observation, before: dict) -> None:
        """Redundancy whole again at the job's newest step; then memory and accounting."""
        if len(obs.restore_points) < self.n:
            raise RuntimeError(f"the job did not resume: {obs.errors[:2] or 'no error seen'}")
        self._wait_whole(obs.final_step)
        obs.memory = {n: (before[n], self.rig.memory(n)) for n in self.rig.nodes}
        obs.leaks += self.rig.accounting_leaks()

    # -- crash ------------------------------------------------------------------------
    def _crash(self, sc: Scenario, obs: Observation, res: Result) -> None:
        rig, g, p = self.rig, self.g, sc.params
        before = {n: rig.memory(n) for n in rig.nodes}
        self._drain(g)  # the steps reported meanwhile: the fault text quotes them
        lost: list[tuple[str, bool]] = []  # (node, wiped)
        detect = ""
        if sc.kind == "kill_trainer":
            node = resolve_node(p["node"], self.n)
            t_fault = time.monotonic()
            g.kill(rig.nodes.index(node))
            res.fault = f"SIGKILL trainer of {node} after step {g.last[rig.nodes.index(node)]}"
        elif sc.kind == "hang_trainer":
            node = resolve_node(p["node"], self.n)
            t_fault = time.monotonic()
            rig.stop(g.procs[rig.nodes.index(node)].pid)
            res.fault = f"SIGSTOP trainer of {node} after step {g.last[rig.nodes.index(node)]}"
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
            t_fault, res.fault = self._mid_snapshot(g, node, p["phase"])
            lost = [(node, True)]
        self.say(f"    fault: {res.fault}")
        dead = [x for x, _ in lost]
        if dead:
            detect = self._detect_dead(dead, t_fault)
        # The launcher: the other ranks fail (gloo) or hang; restart the whole job.
        grace = GLOO_TIMEOUT_S + 5 if sc.kind == "hang_trainer" else 3.0
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
        self._drain(g)
        obs.fault_step = max(g.last.values())
        obs.committed_at_fault = self._committed_now(skip=dead)
        self.say(f"    detected: {res.detected}; trainers stopped at step {obs.fault_step}, "
                 f"v{obs.committed_at_fault} committed")
        steps_recovery = []
        for node, wipe in lost:
            rig.restart(node, wipe)
            steps_recovery.append(f"{'replaced' if wipe else 'restarted'} {node}")
        if sc.expect == "resume" and lost:
            took = self._wait_whole(obs.committed_at_fault)
            self.say(f"    {', '.join(steps_recovery)}: redundancy whole after {took:.1f} s")
        g2 = self._resume("resumed", obs, obs.fault_step)
        self.say(f"    job restarted: restored steps {sorted(set(g2.restored.values())) or 'none'}")
        if sc.expect == "resume":
            how = "rebuilt from the group" if any(w for _, w in lost) else "re-adopted its shm" if lost else ""
            res.recovery = ", ".join(steps_recovery + ([how] if how else []) +
                                     [f"job restarted from v{min(g2.restored.values(), default=0)}"])
            res.recovery_s = round(g2.t_restored - t_fault, 2) if g2.t_restored else None
            res.lost_steps = obs.fault_step - min(g2.restored.values(), default=0)
            self._settle(obs, before)
        else:
            g2.wait_end(PHASE_TIMEOUT_S)
            obs.errors = g2.error_lines()
            res.recovery = ", ".join(steps_recovery + ["restore refused (FAILED_PRECONDITION)"])
            res.recovery_s = round(time.monotonic() - t_fault, 2)
            # The state is gone from memory: the job starts over (from a durable
            # checkpoint, where it has one; from scratch here).
            self._new_epoch("more than m nodes lost: the job starts over")
            obs.leaks += rig.accounting_leaks()

    def _mid_snapshot(self, g: Trainers, node: str, phase: str) -> tuple[float, str]:
        """Kill ``node`` (daemon + trainer) at a chosen point of the life of a version."""
        rig = self.rig
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
    def _transient(self, sc: Scenario, obs: Observation, res: Result) -> None:
        rig, g, p = self.rig, self.g, sc.params
        t_fault = time.monotonic()
        before = {n: rig.memory(n) for n in rig.nodes}
        self._drain(g)
        step_at_fault = min(g.last.values())
        detected: list[str] = []
        if sc.kind in ("hang_daemon", "slow_peer", "partition"):
            if sc.kind == "partition":
                nodes = resolve_nodes(p["nodes"], self.n, self.m, first=self.n - 1)
            else:
                nodes = [resolve_node(p["node"], self.n)]
            th = threading.Thread(target=self._freeze, args=(sc, nodes, res), daemon=True)
            th.start()
            seen = False
            while th.is_alive():
                g.pump(0.1)
                if not seen and sc.kind != "slow_peer" and self._sees_all_dead(nodes):
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
        # The job must run through it: two more steps (or the end of its epoch), no rank failed.
        self._drain(g)
        goal = min(self.steps, max(g.last.values()) + 2)
        g.wait(lambda: min(g.last.values()) >= goal or len(g.ended) == self.n
               or any(rc != 0 for rc in g.ended.values()), PHASE_TIMEOUT_S, f"step {goal}")
        detected.append(f"job at step {step_at_fault} when it hit")
        res.detected = "; ".join(detected)
        if any(rc != 0 for rc in g.ended.values()):
            obs.errors = g.error_lines()
            raise RuntimeError(f"the job did not run through the fault: {obs.errors[:2]}")
        # A drill: a planned restart must restore the newest committed version bit-exactly.
        g.kill()
        self._drain(g)
        obs.fault_step = max(g.last.values())
        obs.committed_at_fault = self._committed_now()
        self._wait_whole(obs.committed_at_fault)
        res.recovery_s = round(time.monotonic() - t_fault, 2)
        g2 = self._resume("drill", obs, obs.fault_step)
        res.lost_steps = obs.fault_step - min(g2.restored.values(), default=0)
        res.recovery = (f"ran through; restart drill restored v{min(g2.restored.values(), default=0)}"
                        if g2.restored else "ran through; restart drill FAILED")
        self._settle(obs, before)

    def _sees_all_dead(self, nodes: list[str]) -> bool:
        observer = next(n for n in self.rig.nodes if n not in nodes)
        return all(self.rig.sees_dead(observer, x) for x in nodes)

    def _freeze(self, sc: Scenario, nodes: list[str], res: Result) -> None:
        rig, p = self.rig, sc.params
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
    def _corrupt(self, sc: Scenario, obs: Observation, res: Result) -> None:
        rig, g = self.rig, self.g
        node = resolve_node(sc.params["node"], self.n)
        # Stop the job, so that the version the bit is flipped in stays the newest.
        g.kill()
        self._drain(g)
        obs.fault_step = max(g.last.values())
        obs.committed_at_fault = self._committed_now()
        self._wait_whole(obs.committed_at_fault)
        before = {n: rig.memory(n) for n in rig.nodes}
        t_fault = time.monotonic()
        replaced = []
        v = obs.committed_at_fault
        then = sc.params["then"]
        if sc.params["block"] == "data":
            res.fault = faults.flip_data_bit(rig, node, self.bs) + f" (v{v})"
        else:
            res.fault = faults.flip_parity_bits(rig, node, self.bs)
        if then == "rebuild":
            # Lose another node, whose rebuild reads the group's blocks (ours included).
            other = rig.nodes[(rig.nodes.index(node) + 1) % self.n]
            rig.kill_daemon(other)
            rig.restart(other, wipe=True)
            replaced.append(other)
            res.fault += f"; then {other} lost and replaced"
        elif then == "scrub":
            res.fault += "; nothing reads it"
        self.say(f"    fault: {res.fault}")
        if then == "scrub":
            self._wait_scrubbed(node, v, t_fault)
        probe = self._launch("probe")
        probe.wait(lambda: len(probe.restored) == self.n or any(rc != 0 for rc in probe.ended.values()),
                   PHASE_TIMEOUT_S, "restore")
        if len(probe.restored) == self.n:
            # Restored without complaint: bit_identical decides whether that was right.
            res.detected = self._corrupt_found(node, v) or "not detected: the restore did not need the block"
            obs.restore_points = dict(probe.restored)
            obs.final_step = min(self.steps, max(probe.restored.values()) + 2)
            probe.wait(lambda: min(probe.last.values()) >= obs.final_step or len(probe.ended) == self.n,
                       PHASE_TIMEOUT_S, f"training on to step {obs.final_step}")
            obs.resumed_to = dict(probe.last)
            reports = rig.corrupt_reports(version=v)
            fixed = [e for e in reports if e.get("repaired")]
            served = [e for e in reports if e.get("found_by") == "restore"]
            res.recovery = (f"{len(fixed)} block(s) repaired from the group; restored v{v}" if fixed else
                            f"the corrupt shard decoded from the group; restored v{v}" if served else
                            f"restored v{v} directly")
            res.recovery_s = round((probe.t_restored or time.monotonic()) - t_fault, 2)
        else:
            errs = probe.error_lines()  # before the launcher kills the rest (-9 is ours)
            probe.kill()
            self._drain(probe)
            why = [e for e in errs if "checksum" in e.lower() or "corrupt" in e.lower()]
            res.detected = (f"checksum: {why[0][:90]}" if why else
                            self._corrupt_found(node, v) or f"restore failed: {errs[:1]}")
            obs.errors = errs
            self.say(f"    detected: {res.detected}; replacing {node}")
            # The operator's answer to a block that fails its checksum: replace its holder.
            rig.kill_daemon(node)
            rig.restart(node, wipe=True)
            replaced.append(node)
            self._wait_whole(v)
            g2 = self._resume("resumed", obs, obs.fault_step)
            res.recovery = f"restore refused; {node} replaced, rebuilt from peers, restored v{v}"
            res.recovery_s = round((g2.t_restored or time.monotonic()) - t_fault, 2)
        res.lost_steps = obs.fault_step - min(obs.restore_points.values(), default=0)
        self._settle(obs, before)

    def _corrupt_found(self, node: str, v: int) -> str:
        """What the daemons reported of the corrupt blocks of ``node`` in version v."""
        found = [e for e in self.rig.corrupt_reports(version=v) if e.get("holder") == node]
        if not found:
            return ""
        kinds = sorted({e.get("kind", "?") for e in found})
        by = sorted({f"{e.get('reported_by')} ({e.get('found_by')})" for e in found})
        return (f"checksum: {len(found)} corrupt {'/'.join(kinds)} block report(s) on {node}, "
                f"by {', '.join(by)}")

    def _wait_scrubbed(self, node: str, v: int, t_fault: float) -> None:
        """Nothing reads the block: the scrubber must find it and repair it, and the
        redundancy be whole again."""
        limit = SCRUB_INTERVAL_S * 2 + 20
        while time.monotonic() - t_fault < limit:
            found = [e for e in self.rig.corrupt_reports(version=v) if e.get("holder") == node]
            if found and all(e.get("repaired") for e in found) and self.rig.whole(v):
                self.say(f"    scrubber: {len(found)} block(s) found and repaired after "
                         f"{time.monotonic() - t_fault:.1f} s")
                return
            time.sleep(0.25)
        raise TimeoutError(f"the scrubber did not find and repair the corrupt block(s) of {node} "
                           f"within {limit:.0f} s (reports: {self.rig.corrupt_reports(version=v)[:3]})")

    # -- the CheckFree rung ------------------------------------------------------------
    def _pipeline(self, sc: Scenario, obs: Observation, res: Result) -> None:
        """On a cluster of its own; the data-parallel job is paused meanwhile (stopped,
        then restarted from its last commit: that restore is judged with the next fault)."""
        from snapshotd_tools.chaos.pipeline import run_pipeline

        g = self.g
        g.kill()
        self._drain(g)
        d = os.path.join(self.workdir, f"pipeline-{self.faults:04d}")
        shutil.rmtree(d, ignore_errors=True)
        launches: list[Trainers] = []
        rig = None
        try:
            rig = Rig(d, self.n, sc.params["parity"], self.block_size, self.budget)
            run_pipeline(self, rig, sc, obs, res, launches)
        finally:
            for x in launches:
                obs.leaks += x.leaked()
                x.kill()
            if rig is not None:
                obs.leaks += rig.down()
                if not obs.leaks and not self.keep:
                    shutil.rmtree(d, ignore_errors=True)
            elif os.path.exists(os.path.join(d, "cluster.json")):
                from snapshotd_tools import localcluster as lc

                lc.down(d)
            self._launch("after-pipeline")


def meta(h: Harness) -> dict:
    import platform

    return {"nodes": h.n, "parity": h.m, "steps": h.steps, "step_delay_s": h.delay,
            "block_size": h.block_size, "budget": h.budget, "python": platform.python_version(),
            "epochs": h.epoch + 1, "launches": len(h.launches),
            "partition": "network namespaces" if h.partition_mode is not None else "SIGSTOP fallback",
            "unsafe_skip_verify": os.environ.get("SNAPSHOTD_UNSAFE_SKIP_VERIFY") == "1"}

