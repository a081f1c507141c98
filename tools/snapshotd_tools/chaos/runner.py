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
- transient (hang_daemon, slow_peer, partition, garbage, memory_pressure, stall_server): the job runs
  through the fault; then a planned restart (a drill) must restore the newest committed
  version bit-exactly;
- corrupt: the job is stopped, a bit is flipped in a held block of its newest committed
  version; a restore must refuse it (checksum), the holder is replaced, and the restore
  is then bit-exact;
- pipeline_loss: the CheckFree rung, on a pipeline job and a cluster of its own
  (``pipeline.py``); the data-parallel job is paused meanwhile.

This module holds the session (``Harness``: open, the matrix, the soak, one fault's
verdict, teardown); each shape of fault is carried out by its own module (``crash.py``,
``transient.py``, ``corrupt.py``, ``pipeline.py``), the reference by ``reference.py``.

At the end the session is torn down and one more row, ``teardown``, checks that no
daemon, trainer or /dev/shm segment is left.
"""

from __future__ import annotations

import os
import shutil
import time

from snapshotd_tools.chaos.corrupt import run_corrupt
from snapshotd_tools.chaos.crash import run_crash
from snapshotd_tools.chaos.forkserver import ForkServer
from snapshotd_tools.chaos.invariants import COMMIT_BOUND_S, MAX_LOST_STEPS, Observation, check
from snapshotd_tools.chaos.pipeline import run_pipeline_scenario
from snapshotd_tools.chaos.reference import load_or_compute_reference
from snapshotd_tools.chaos.report import Result
from snapshotd_tools.chaos.rig import JOB, Rig, Trainers
from snapshotd_tools.chaos.scenarios import Scenario
from snapshotd_tools.chaos.stall import arm_sessions
from snapshotd_tools.chaos.timeouts import (  # noqa: F401 (kept importable from here)
    GLOO_TIMEOUT_S,
    PHASE_TIMEOUT_S,
    REBUILD_TIMEOUT_S,
    SCRUB_INTERVAL_S,
)
from snapshotd_tools.chaos.transient import run_transient
from snapshotd.wire.config import parse_size

MEM_SAMPLE_S = 5.0  # the memory curve: one sample of every daemon this often
CRASH = {"kill_trainer", "kill_daemon", "kill_node", "mid_snapshot", "hang_trainer"}
TRANSIENT = {"hang_daemon", "slow_peer", "partition", "garbage", "memory_pressure", "stall_server"}


class Harness:
    """One chaos session: its cluster (``rig``), its job's launches and epochs, and the
    verdict of each fault. The fault modules (``crash``, ``transient``, ``corrupt``,
    ``pipeline``) drive it through its public operations: ``launch``, ``drain``,
    ``new_epoch``, ``resume``, ``settle``, ``wait_whole``, ``committed_now``,
    ``detect_dead``. One thread drives a Harness."""

    def __init__(self, workdir: str, nodes: int = 4, parity: int = 2, steps: int = 80,
                 block_size: str = "16KiB", budget: str = "256MiB", say=print, keep: bool = False,
                 step_delay_s: float = 0.05, commit_bound_s: float = COMMIT_BOUND_S,
                 max_lost_steps: int = MAX_LOST_STEPS):
        if nodes < 2 or not 1 <= parity < nodes:
            raise ValueError("need nodes >= 2 and 1 <= parity < nodes")
        if steps < 30:
            raise ValueError("need at least 30 steps per epoch")
        if step_delay_s < 0:
            raise ValueError("the step delay cannot be negative")
        if commit_bound_s <= 0 or max_lost_steps < 0:
            raise ValueError("the commit bound must be positive and the lost-steps bound >= 0")
        self.commit_bound_s, self.max_lost = commit_bound_s, max_lost_steps
        # Daemon memory: each node's level when the first fault was about to hit (the
        # session bound), and a sample every MEM_SAMPLE_S over the whole session.
        self.mem_base: dict[str, int] = {}
        self.curve: list = []  # [t_s, {node: [rss MiB, shm MiB]}]
        self._t_open = self._next_sample = 0.0
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
        self.ref = load_or_compute_reference(self.workdir, self.n, self.steps, self._forkserver, self.say)
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
        arm_sessions(d)  # and their peer serving threads can be stalled at run time (stall.py)
        self.say(f"cluster: {self.n} daemons, m={self.m}{' in network namespaces' if netns else ''}; "
                 f"job: {self.n} ranks, epochs of {self.steps} steps, a snapshot every step")
        try:
            self.rig = Rig(d, self.n, self.m, self.block_size, self.budget, netns=netns)
        except BaseException:
            if os.path.exists(os.path.join(d, "cluster.json")):  # interrupted while booting
                from snapshotd_tools import localcluster as lc

                lc.down(d)
            raise
        self._t_open = time.monotonic()
        self.launch("e0")

    def close(self, failed: bool = False) -> Result:
        """Tear everything down; the ``teardown`` row: nothing may be left behind."""
        res = Result("teardown", "-", params={"kind": "teardown"})
        obs = Observation("teardown", self.steps, self.ref)
        if self.g is not None:
            self.g.kill()
            self.drain(self.g)
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

    def launch(self, tag: str) -> Trainers:
        extra = ("--gloo-timeout-s", f"{GLOO_TIMEOUT_S:g}")
        if self.delay:
            extra += ("--step-delay-s", f"{self.delay:.3f}")
        g = Trainers(self.rig.d, f"{len(self.launches):04d}-{tag}", self.n, self.steps, self.rig.socks,
                     extra, job=self.rig.job, spawner=self.fs)
        self.launches.append(g)
        self.g = g
        return g

    @staticmethod
    def drain(g: Trainers, running_s: float = 0.5) -> None:
        """Fold the events already sent. A launch still running never falls quiet (steps
        and hand-off records keep coming): for it, stop after ``running_s``."""
        t_end = time.monotonic() + running_s
        while g.pump(0.05):
            if time.monotonic() > t_end and any(p.poll() is None for p in g.procs):
                return

    def _take_digests(self) -> list:
        """The digests reported since the last call, over every launch: each is judged once."""
        out = []
        for g in self.launches:
            seen = self._taken.get(id(g), 0)
            out += [(g.tag, *x) for x in g.digests[seen:]]
            self._taken[id(g)] = len(g.digests)
        return out

    def new_epoch(self, why: str) -> None:
        """Drop the job and start it again from step 0 under a new id."""
        if self.g is not None:
            self.g.kill()
            self.drain(self.g)
        self.rig.drop_job(self.rig.job)
        self.epoch += 1
        self.rig.job = f"{JOB}-{self.epoch}"
        self.launch(f"e{self.epoch}")
        self.say(f"    epoch {self.epoch}: job {self.rig.job} from step 0 ({why})")

    def sample_memory(self) -> None:
        """One point of the session's memory curve: each daemon's RSS and held shm."""
        self._next_sample = time.monotonic() + MEM_SAMPLE_S
        self.curve.append([round(time.monotonic() - self._t_open, 1),
                           {n: [round(self.rig.rss(n) / 2**20, 1), round(self.rig.shm_bytes(n) / 2**20, 1)]
                            for n in self.rig.nodes}])

    def _pump(self, timeout_s: float) -> None:
        """Keep the job going: fold its events, and roll over to the next epoch when it ends."""
        g = self.g
        g.pump(timeout_s)
        if time.monotonic() >= self._next_sample:
            self.sample_memory()
        if len(g.ended) < self.n:
            if g.ended and any(rc != 0 for rc in g.ended.values()):
                self._job_failed(g)
            return
        if any(rc != 0 for rc in g.ended.values()) or min(g.last.values()) < self.steps:
            self._job_failed(g)
        # The epoch is done: its last version must commit on every node, then it is dropped.
        try:
            self.wait_whole(self.steps)
        finally:  # and the next one starts, whole or not (a timeout is reported as a failure)
            self.new_epoch(f"epoch {self.epoch} done")

    def _job_failed(self, g: Trainers) -> None:
        g.kill()
        self.drain(g)
        errs = g.error_lines()
        # Start it again from its last commit, so that the session goes on.
        self.launch("restarted")
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
                    if not self.mem_base:  # the session's baseline: before the first fault
                        self.mem_base = {n: self.rig.memory(n) for n in self.rig.nodes}
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
        if sc.overlap:
            res.params["overlap"] = dict(sc.overlap)
        obs = Observation(sc.expect, self.steps, self.ref, max_lost=self.max_lost,
                          commit_bound_s=self.commit_bound_s)
        launched = len(self.launches)
        try:
            seconds = float(sc.params.get("seconds", 0))
            margin = 12 + (int(seconds / max(self.delay, 0.05)) if sc.kind in TRANSIENT else 0)
            self._ready(min(sc.at_step if after_start is None else after_start, self.steps // 4),
                        min(margin, self.steps // 2))
            if sc.kind == "pipeline_loss":
                run_pipeline_scenario(self, sc, obs, res)
            elif sc.kind in CRASH:
                run_crash(self, sc, obs, res)
            elif sc.kind in TRANSIENT:
                run_transient(self, sc, obs, res)
            else:
                run_corrupt(self, sc, obs, res)
            # The session bound: against each node's level before the first fault.
            now = ({n: self.rig.memory(n) for n in self.rig.nodes} if sc.kind == "pipeline_loss"
                   else {n: a for n, (_, a) in obs.memory.items()})
            obs.session_memory = {n: (self.mem_base[n], v) for n, v in now.items() if n in self.mem_base}
            self.sample_memory()
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
            self.drain(self.g)
        for n in rig.nodes:
            if rig.stats(n) is None:
                rig.kill_daemon(n)
                rig.restart(n, wipe=True)
        try:
            self.wait_whole(1)
            self.launch("salvaged")
        except Exception:  # noqa: BLE001 - a fresh start
            self.new_epoch("the job could not be resumed after a harness error")

    def committed_now(self, skip=(), job: str | None = None, rig: Rig | None = None) -> int:
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

    def wait_whole(self, version: int) -> float:
        t0 = time.monotonic()
        while not self.rig.whole(version):
            if time.monotonic() - t0 > REBUILD_TIMEOUT_S:
                raise TimeoutError(f"redundancy not whole again (v{version} on every node, nothing "
                                   f"degraded) {REBUILD_TIMEOUT_S:.0f} s after recovery")
            time.sleep(0.1)
        return time.monotonic() - t0

    def detect_dead(self, dead: list[str], t_fault: float, limit_s: float = 6.0,
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

    def trainer_committed(self) -> int:
        """The newest version the current job's trainers were told had committed."""
        return max([g.committed for g in self.launches if g.job == self.rig.job] + [0])

    def await_commit(self, obs: Observation, t_clear: float, floor: int) -> None:
        """``commit_after_fault``: the time from ``t_clear`` (time.time()) to the first
        trainer record of a version newer than ``floor``, waiting up to the bound."""
        obs.commit_expected = True
        deadline = time.monotonic() + obs.commit_bound_s + 1
        job = self.rig.job  # a job resumed at its last step: its next epoch's first commit counts
        while True:
            seen = [t for g in self.launches if g.job == job or g.t_launch >= t_clear
                    for t, _, v in g.commits if t >= t_clear and v > (floor if g.job == job else 0)]
            if seen:
                obs.commit_after_s = round(max(0.0, min(seen) - t_clear), 2)
                return
            if time.monotonic() > deadline:
                return
            self._pump(0.1)

    def resume(self, tag: str, obs: Observation, floor: int, on_restoring=None) -> Trainers:
        """Launch the job again; it must restore, then train two steps past ``floor``.
        ``on_restoring(launch)`` is called once a rank has begun its restore."""
        g2 = self.launch(tag)
        obs.t_clear = g2.t_launch
        if on_restoring is not None:
            g2.wait(lambda: g2.restoring or g2.restored or g2.ended, PHASE_TIMEOUT_S, "a restore to begin")
            on_restoring(g2)
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

    def settle(self, obs: Observation, before: dict) -> None:
        """Redundancy whole again at the job's newest step; then memory and accounting."""
        if len(obs.restore_points) < self.n:
            raise RuntimeError(f"the job did not resume: {obs.errors[:2] or 'no error seen'}")
        self.wait_whole(obs.final_step)
        self.await_commit(obs, obs.t_clear, max(obs.restore_points.values()))
        obs.memory = {n: (before[n], self.rig.memory(n)) for n in self.rig.nodes}
        obs.leaks += self.rig.accounting_leaks()


def meta(h: Harness) -> dict:
    import platform

    return {"nodes": h.n, "parity": h.m, "steps": h.steps, "step_delay_s": h.delay,
            "block_size": h.block_size, "budget": h.budget, "python": platform.python_version(),
            "epochs": h.epoch + 1, "launches": len(h.launches),
            "partition": "network namespaces" if h.partition_mode is not None else "SIGSTOP fallback",
            "commit_bound_s": h.commit_bound_s, "max_lost_steps": h.max_lost,
            "memory_curve": h.curve,
            "unsafe_skip_verify": os.environ.get("SNAPSHOTD_UNSAFE_SKIP_VERIFY") == "1"}
