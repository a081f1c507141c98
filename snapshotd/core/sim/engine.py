"""The discrete-event failure simulator: a seeded fault trace, played against a strategy.

:func:`draw_trace` draws the faults of a job from a :class:`~.profiles.FailureProfile`
(``random.Random(seed)``, nothing else): a Poisson process at the job's interruption rate,
each fault on a node picked by its rate (lemon nodes fail ``lemon_factor`` times as often
until they struck ``lemon_strikes`` times and were swapped out), its cause by the
profile's shares, its scope (process restart, node lost, every node of the domain lost)
from the cause; fail-slow episodes arrive as a second Poisson process. The trace does not
depend on the strategy, so strategies (and intervals) are compared on the same faults.

:func:`simulate` plays a trace against one strategy. Training runs in segments between
faults; within a segment it computes ``interval_s``, stalls ``stall_s`` for a save, and so
on; save j of the segment is recoverable from memory ``commit_s`` after its stall ends
(parity or replicas sent, commit decided), and every ``durable_every``-th save is on disk
``durable_write_s`` after that. A fault at time t:

* the progress since the newest version the job can restore is lost: the newest
  committed save if the lost nodes' state can be rebuilt (``Recoverability.ok``, the
  real planners) -- for a process restart nothing is lost from memory -- else the newest
  durable copy (a *memory loss*: a committed version was lost);
* the job is down for the profile's ``restart_s`` plus the restore: from local memory,
  rebuilt from peers, or read from disk;
* a fault while the job is still down for the previous one adds its lost nodes to those
  not yet rebuilt (overlapping faults: a group may now have lost more than m).

A fail-slow episode costs ``slow_detect_s * (1 - 1/slow_factor)`` of progress (the job
runs at the slow node's pace until it is detected and excluded); nothing is lost.

ETTR (effective training time ratio) = progress kept at the end / wall time. Pure:
``random.Random(seed)`` is the only source of randomness.
"""

from __future__ import annotations

import math
import random
from bisect import bisect
from dataclasses import dataclass
from itertools import accumulate

from snapshotd.wire.errors import InvalidRequestError

from .model import CheckFree, DiskCheckpoint, Job, Strategy, costs
from .profiles import FailureProfile
from .recover import Recoverability


@dataclass(frozen=True)
class Fault:
    t: float  # seconds since the start
    kind: str  # "process" | "node" | "domain" | "slow"
    nodes: tuple[int, ...]
    cause: str


def draw_trace(job: Job, profile: FailureProfile, horizon_s: float, seed: int,
               independent: bool = False) -> list[Fault]:
    """The faults of ``job`` over ``horizon_s`` seconds. ``independent``: no lemons, no
    fail-slow, no domain faults (a domain cause takes its one node): every node fails
    alone at the same rate."""
    if not horizon_s > 0:
        raise InvalidRequestError(f"horizon_s must be > 0, got {horizon_s!r}")
    rng = random.Random(seed)
    N, npd = job.nodes, job.nodes_per_domain
    lam_job = 1.0 / profile.job_mtbf_s(job.gpus)
    f = 1.0 if independent else profile.lemon_factor
    lemons = [] if independent else sorted(rng.sample(range(N), round(profile.lemon_fraction * N)))
    lemon_set = set(lemons)
    lam0 = lam_job / (N - len(lemons) + len(lemons) * f)  # a healthy node's rate
    slow_rate = 0.0 if independent else profile.fail_slow_share * lam_job
    cum = list(accumulate(profile.shares()))
    pp = profile.process_prob()
    strikes: dict[int, int] = {}
    out: list[Fault] = []
    t = 0.0
    while True:
        fail_rate = lam0 * (N - len(lemons) + len(lemons) * f)
        t += rng.expovariate(fail_rate + slow_rate)
        if t >= horizon_s:
            return out
        if rng.random() * (fail_rate + slow_rate) < slow_rate:
            out.append(Fault(t, "slow", (rng.randrange(N),), "fail-slow"))
            continue
        if lemons and rng.random() * (N - len(lemons) + len(lemons) * f) < len(lemons) * f:
            node = rng.choice(lemons)
        else:
            node = rng.randrange(N)
            while node in lemon_set:
                node = rng.randrange(N)
        cause = profile.causes[min(bisect(cum, rng.random() * cum[-1]), len(cum) - 1)]
        if cause.scope == "domain" and not independent:
            d = node // npd
            out.append(Fault(t, "domain", tuple(range(d * npd, min(N, (d + 1) * npd))), cause.name))
        elif rng.random() < pp[cause.name]:
            out.append(Fault(t, "process", (node,), cause.name))
        else:
            out.append(Fault(t, "node", (node,), cause.name))
        if node in lemon_set:
            strikes[node] = strikes.get(node, 0) + 1
            if strikes[node] >= profile.lemon_strikes:  # excluded: a healthy spare takes its place
                lemons.remove(node)
                lemon_set.discard(node)


@dataclass(frozen=True)
class SimResult:
    strategy: str
    horizon_s: float
    ettr: float  # progress kept / wall time
    faults: int  # interruptions (fail-slow episodes not counted)
    lost_work_s: float  # progress lost to rollbacks (and CheckFree's extra steps)
    downtime_s: float  # restarts and restores
    stall_s: float  # time spent stalled in saves
    slow_s: float  # progress lost to fail-slow nodes
    memory_losses: int  # faults after which the job fell back to its durable copy
    planner_calls: int

    @property
    def lost_per_fault_s(self) -> float:
        return self.lost_work_s / self.faults if self.faults else 0.0

    @property
    def p_memory_loss_per_fault(self) -> float:
        return self.memory_losses / self.faults if self.faults else 0.0


def _compute(e: float, iv: float, cyc: float) -> float:
    """Compute done in e seconds of a segment (saves stall between intervals)."""
    if e <= 0:
        return 0.0
    full = math.floor(e / cyc)
    return full * iv + min(iv, e - full * cyc)


def _saves(e: float, cyc: float) -> int:
    """How many saves of a segment are complete e seconds after it started."""
    return max(0, math.floor(e / cyc)) if e > 0 else 0


def simulate(job: Job, strategy: Strategy, profile: FailureProfile, trace: list[Fault],
             horizon_s: float, rec: Recoverability | None = None) -> SimResult:
    """Play ``trace`` against ``strategy``; see the module docstring."""
    c = costs(job, strategy)
    rec = rec or Recoverability(job, strategy)
    iv, cyc = c.interval_s, c.interval_s + c.stall_s
    every = c.durable_every or 1 << 62  # 0: no durable copies
    disk, checkfree = isinstance(strategy, DiskCheckpoint), isinstance(strategy, CheckFree)
    slow_cost = profile.slow_detect_s * (1 - 1 / profile.slow_factor)
    p0 = durable = 0.0  # progress of the version the segment started from / of the newest durable copy
    seg = 0.0  # the segment's training starts (the previous restore is done)
    pending: set[int] = set()  # nodes lost and not yet rebuilt (until ``seg``)
    lost = down = stalled = slow = 0.0
    faults = losses = 0
    for f in trace:
        if f.t >= horizon_s:
            break
        if f.kind == "slow":
            slow += slow_cost
            continue
        faults += 1
        gone = set() if f.kind == "process" else set(f.nodes)
        if f.t >= seg:
            e = f.t - seg
            full = int(e // cyc)  # saves done (their stall over)
            now = p0 + full * iv + min(iv, e - full * cyc)
            stalled += full * c.stall_s
            x = e - c.commit_s
            committed = p0 + (int(x // cyc) * iv if x > 0 else 0.0)
            x -= c.durable_write_s
            if x > 0:
                kd = int(x // cyc) // every * every
                if p0 + kd * iv > durable:
                    durable = p0 + kd * iv
            pending = gone
            if disk:
                back, restore = committed, c.restore_disk_s
            elif checkfree:  # every fault loses its stages' GPU state; neighbours rebuild it
                if rec.ok(f.nodes):
                    back, restore = now, c.restore_peer_s
                    lost += strategy.penalty_steps * job.step_s
                else:
                    back, restore = committed, c.restore_disk_s
            elif rec.ok(gone):
                back, restore = committed, (c.restore_local_s if not gone else c.restore_peer_s)
            else:
                back, restore, losses = durable, c.restore_disk_s, losses + 1
            lost += now - back
            p0 = back
        else:  # the job is still down for the previous fault: its rebuild is not done
            pending |= gone
            restore = c.restore_disk_s if (disk or checkfree) else c.restore_peer_s
            if gone and not disk and not checkfree and p0 > durable and not rec.ok(pending):
                lost += p0 - durable
                p0, restore, losses = durable, c.restore_disk_s, losses + 1
        new_seg = max(seg, f.t + profile.restart_s + restore)
        down += new_seg - max(seg, f.t)
        seg = new_seg
    e = horizon_s - seg
    final = p0 + _compute(e, iv, cyc) - slow
    stalled += _saves(e, cyc) * c.stall_s
    return SimResult(strategy.name, horizon_s, max(0.0, final) / horizon_s, faults, lost, down, stalled, slow,
                     losses, rec.planner_calls)


def run(job: Job, strategy: Strategy, profile: FailureProfile, horizon_s: float, seed: int = 0) -> SimResult:
    """Draw a trace with ``seed`` and simulate ``strategy`` on it."""
    return simulate(job, strategy, profile, draw_trace(job, profile, horizon_s, seed), horizon_s)
