"""Overlapping faults of ``snapshotd chaos``: a second fault during the first one's recovery.

A scenario's ``overlap`` (``scenarios.parse_overlap``; the soak's ``--overlap P``) names
a recovery phase and a fault to inject in it:

- ``rebuild``: right after a lost machine's replacement has started (it is rebuilding
  from its group), another node is lost too (``kill_node``) or its daemon killed;
- ``restore``: once a rank of the relaunched job has begun its restore (its ``restoring``
  line), a daemon is killed (restarted at once, its shared memory kept);
- ``degraded_read``: the job is relaunched before the lost machine's replacement is
  started: every rank's restore needs the lost rank's slice, whose owner is down, so its
  daemon decodes it from the group's survivors (a degraded read). Once the overlap's
  rank is inside that restore and its daemon has logged the decode, its trainer is
  killed; then the replacement is started (the lost rank itself could not restore
  without its daemon: that launch is broken either way, and relaunched);
- ``commit``: after the job resumed, the moment a node logs the commit of a new version
  (the others may not have yet), a node is cut off (``partition``) for a few seconds.

A launch the second fault broke is handled as a launcher would: the ranks are killed,
the redundancy is waited for, and the job relaunched. The invariants are the same, judged
against the later of the two fault points. Each step records what actually happened (was
the replacement still rebuilding, had the restore finished), so a fault that landed too
late is reported as such, never dressed up. Driven by ``crash.py`` from the harness's
thread; only a partition runs on a helper thread.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from snapshotd_tools.chaos.scenarios import resolve_node
from snapshotd_tools.chaos.timeouts import PHASE_TIMEOUT_S

if TYPE_CHECKING:
    from snapshotd_tools.chaos.invariants import Observation
    from snapshotd_tools.chaos.report import Result
    from snapshotd_tools.chaos.rig import Trainers
    from snapshotd_tools.chaos.runner import Harness


class Overlap:
    """One overlap of one scenario: where it fires, on which node, and what it did."""

    def __init__(self, h: Harness, spec: dict | None, lost: list[str]):
        self.h, self.spec, self.lost = h, spec or {}, lost
        self.during = self.spec.get("during")
        self.kind = self.spec.get("kind")
        self.fired = ""
        self.thread: threading.Thread | None = None
        self.held: list[str] = []  # degraded_read: the replacements not started yet
        self.marks: dict[str, int] = {}  # degraded_read: log lines per node before it
        self.evidence = ""  # what the daemons logged of it
        self.node = self._target() if spec else None

    def _target(self) -> str:
        """The overlap's node; a machine already lost is skipped (the next one is taken),
        except for a trainer killed during a degraded read (any rank may be)."""
        n = self.h.n
        i = int(resolve_node(self.spec["node"], n)[1:])
        if self.kind == "kill_trainer" and self.during != "degraded_read":
            return f"n{i}"
        for k in range(n):
            x = f"n{(i + k) % n}"
            if x not in self.lost:
                return x
        raise RuntimeError("no node left for the overlapping fault")

    def at(self, phase: str) -> bool:
        return bool(self.spec) and self.during == phase and not self.fired

    def holds_back(self, node: str) -> bool:
        """degraded_read: the lost machine's replacement starts only after the overlap."""
        if self.at("degraded_read"):
            self.held.append(node)
            return True
        return False

    def fire(self, g: Trainers | None, context: str) -> str:
        """Inject the second fault now; returns (and keeps) what was done."""
        h, rig, x = self.h, self.h.rig, self.node
        i = rig.nodes.index(x)
        if self.kind == "kill_node":
            if g is not None:
                g.kill(i)
            rig.kill_daemon(x)
            rig.restart(x, wipe=True)
            self.lost.append(x)
            what = f"node {x} lost too (SIGKILL, wiped, replaced)"
        elif self.kind == "kill_daemon":
            pid = rig.kill_daemon(x)
            rig.restart(x, wipe=False)
            what = f"daemon {x} SIGKILLed (pid {pid}) and restarted"
        elif self.kind == "kill_trainer":
            if g is None:
                raise RuntimeError("overlap kill_trainer needs a running launch")
            g.kill(i)
            what = f"trainer of {x} SIGKILLed"
        else:
            secs = float(self.spec.get("seconds", 3.0))
            self.thread = threading.Thread(target=_cut, args=(h, x, secs), daemon=True)
            self.thread.start()
            how = "links down" if rig.net is not None and h.partition_mode is not None else "SIGSTOP fallback"
            what = f"{x} cut off for {secs:g}s ({how})"
        self.fired = f"during {self.during}: {what} ({context})"
        h.say(f"    overlap: {self.fired}")
        return self.fired

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def _cut(h: Harness, node: str, seconds: float) -> None:
    rig = h.rig
    if rig.net is not None and h.partition_mode is not None:
        h.partition_mode.cut(rig.net, [rig.nodes.index(node)], seconds)
        return
    pid = rig.pid(node)
    rig.stop(pid)
    try:
        time.sleep(seconds)
    finally:
        rig.cont(pid)


def after_restart(ov: Overlap, version: int) -> None:
    """The replacements were started: fire an overlap ``during: rebuild``, or hold the
    replacements back for one ``during: degraded_read``."""
    rig = ov.h.rig
    if ov.at("rebuild"):
        rebuilding = not rig.whole(version)
        ov.fire(None, f"the replacement {'still rebuilding' if rebuilding else 'ALREADY whole'} "
                      f"when it hit")
    elif ov.at("degraded_read"):
        ov.marks = {n: len(rig.log_tail(n, 10**7)) for n in rig.nodes}
        ov.h.say(f"    replacement(s) of {','.join(ov.held)} held back: the job restores first")


def _degraded_kill(ov: Overlap, g: Trainers) -> None:
    """Wait for the overlap's rank to be inside its (degraded) restore, kill its trainer,
    then start the held-back replacement."""
    h = ov.h
    r = h.rig.nodes.index(ov.node)
    g.wait(lambda: r in g.restoring or r in g.restored or r in g.ended, PHASE_TIMEOUT_S,
           f"rank {r}'s restore to begin")
    # The daemon of that rank says it is decoding a slice from the group: kill now.
    deadline = time.monotonic() + 15
    decoding = []
    while not decoding and time.monotonic() < deadline and r not in g.restored and r not in g.ended:
        decoding = [x for x in h.rig.log_tail(ov.node, 10**7)[ov.marks.get(ov.node, 0):]
                    if "is down: decod" in x or "decoding it from its group" in x]
        g.pump(0.02)
    inside = r in g.restoring and r not in g.restored
    try:
        ov.fire(g, f"rank {r} {'inside its restore' if inside else 'ALREADY past its restore'}, "
                   f"{ov.node} {'had decoded the lost slice from the group' if decoding else 'NOT seen decoding'}")
    finally:
        for x in ov.held:
            h.rig.restart(x, wipe=True)
        ov.held = []


def resume_through(ov: Overlap, obs: Observation, floor: int) -> Trainers:
    """Relaunch the job (``Harness.resume``), firing an overlap during its restore; if the
    second fault broke that launch, the launcher's answer: kill it, wait for the
    redundancy, relaunch."""
    h = ov.h
    hook = None
    if ov.at("degraded_read"):
        def hook(g: Trainers) -> None:
            _degraded_kill(ov, g)
    elif ov.at("restore"):
        def hook(g: Trainers) -> None:
            done = len(g.restored)
            whole = h.rig.whole(max(obs.committed_at_fault, 1))
            ov.fire(g, f"{len(g.restoring)} rank(s) restoring, {done} done; redundancy "
                       f"{'whole' if whole else 'NOT whole (degraded read)'}")
    g2 = h.resume("resumed", obs, floor, on_restoring=hook)
    if ov.marks:  # the daemons' own word that the reads were degraded
        lines = [x for n in h.rig.nodes for x in h.rig.log_tail(n, 10**7)[ov.marks.get(n, 0):]
                 if "is down: decod" in x or "decoding it from its group" in x]
        ov.evidence = (f"; {len(lines)} degraded read(s) logged by the daemons" if lines else
                       "; NO degraded read logged by the daemons")
        if not lines:  # the scenario did not test what it names: a failure, not a pass
            raise RuntimeError(f"overlap degraded_read: no degraded read happened ({ov.fired})")
    broken = len(g2.restored) < h.n or any(rc != 0 for rc in g2.ended.values())
    if ov.fired and broken:
        g2.kill()
        h.drain(g2)
        ov.join()
        # The second fault is the fault now: judge against the later point.
        obs.fault_step = max(obs.fault_step, max(g2.last.values()))
        obs.committed_at_fault = max(obs.committed_at_fault, h.trainer_committed())
        took = h.wait_whole(max(obs.committed_at_fault, 1))
        h.say(f"    the overlap broke that launch; redundancy whole after {took:.1f} s; relaunching")
        obs.notes.append(f"launch broken by the overlap: {g2.error_lines()[:1]}")
        g2 = h.resume("relaunched", obs, obs.fault_step)
    return g2


def during_commit(ov: Overlap, g: Trainers) -> None:
    """After the job resumed: the moment a node logs a new commit, cut another off; the
    job must run through it (two more steps, no rank failed)."""
    if not ov.at("commit"):
        return
    h, rig = ov.h, ov.h.rig
    watch = next(n for n in rig.nodes if n != ov.node)
    seen = len(rig.log_tail(watch, 100_000))
    deadline = time.monotonic() + 30
    hit = []
    while time.monotonic() < deadline and not hit:
        hit = [x for x in rig.log_tail(watch, 100_000)[seen:] if f"job {rig.job}: version" in x
               and "committed" in x]
        g.pump(0.005)
    if not hit:
        raise TimeoutError(f"{watch} logged no commit within 30 s of the job resuming")
    v = hit[-1].split("version ")[1].split()[0]
    ov.fire(g, f"{watch} had just committed v{v}")
    while ov.thread is not None and ov.thread.is_alive():
        g.pump(0.1)
    ov.join()
    goal = min(h.steps, max(g.last.values()) + 2)
    g.wait(lambda: min(g.last.values()) >= goal or len(g.ended) == h.n
           or any(rc != 0 for rc in g.ended.values()), PHASE_TIMEOUT_S, f"step {goal}")
    if any(rc != 0 for rc in g.ended.values()):
        obs_err = g.error_lines()
        raise RuntimeError(f"the job did not run through the partition during a commit: {obs_err[:2]}")
