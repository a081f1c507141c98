"""What the simulator is asked: interval sweeps, loss probabilities, and sizing advice.

* :func:`sweep` -- ETTR of a strategy over a list of intervals, every interval on the
  same fault trace (common random numbers, so differences are the intervals', not noise);
* :func:`best_interval` -- the interval of highest ETTR: a geometric grid, then a
  parabola through the points around the best one (in log interval);
* :func:`binomial_loss_probability` / :func:`mc_loss_probability` -- the probability that
  a window of ``window_s`` seconds (e.g. the time to rebuild) loses more than m nodes of
  some group, by formula for independent failures and by Monte-Carlo with the
  simulator's fault sampler and the real planners;
* :func:`recommend` -- group size, parity, snapshot and durable intervals for a job, and
  the ETTR of the alternatives, as ``snapshotd plan`` prints them.

Pure (numpy only for the parabola fit).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from snapshotd.wire.errors import InvalidRequestError

from .engine import SimResult, draw_trace, simulate
from .model import CheckFree, DiskCheckpoint, Job, Replication, Snapshotd, Strategy, costs, young_daly
from .profiles import FailureProfile
from .recover import Recoverability, domain_of


def geometric(lo: float, hi: float, points: int) -> list[float]:
    if not 0 < lo < hi or points < 2:
        raise InvalidRequestError("need 0 < lo < hi and points >= 2")
    r = (hi / lo) ** (1 / (points - 1))
    return [lo * r ** i for i in range(points)]


def sweep(job: Job, make: Callable[[float], Strategy], profile: FailureProfile, intervals: Sequence[float],
          horizon_s: float, seed: int = 0) -> list[tuple[float, SimResult]]:
    """[(interval, result)] of ``make(interval)`` for each interval, on one fault trace."""
    trace = draw_trace(job, profile, horizon_s, seed)
    rec = Recoverability(job, make(intervals[0]))
    return [(iv, simulate(job, make(iv), profile, trace, horizon_s, rec)) for iv in intervals]


def best_interval(job: Job, make: Callable[[float], Strategy], profile: FailureProfile, lo: float, hi: float,
                  horizon_s: float, seed: int = 0, points: int = 25) -> tuple[float, list[tuple[float, SimResult]]]:
    """(the interval of highest ETTR, the sweep it came from)."""
    res = sweep(job, make, profile, geometric(lo, hi, points), horizon_s, seed)
    ys = [r.ettr for _, r in res]
    i = max(range(len(ys)), key=ys.__getitem__)
    a, b = max(0, i - 3), min(len(ys), i + 4)
    if b - a < 3:
        return res[i][0], res
    x = np.log([iv for iv, _ in res[a:b]])
    c2, c1, _ = np.polyfit(x, ys[a:b], 2)
    if c2 >= 0:  # no maximum in the fit: keep the grid point
        return res[i][0], res
    best = math.exp(-c1 / (2 * c2))
    return min(max(best, res[max(0, i - 1)][0]), res[min(len(res) - 1, i + 1)][0]), res


def memory_loss_rate(job: Job, profile: FailureProfile) -> float:
    """Per node and second: the rate of faults that lose the node's memory, with every
    node failing independently (no lemons, a domain cause takes one node)."""
    pp = profile.process_prob()
    q = sum(s * (1 - pp[c.name]) for s, c in zip(profile.shares(), profile.causes))
    return q / profile.job_mtbf_s(job.gpus) / job.nodes


def binomial_loss_probability(nodes: int, n: int, m: int, p_node: float) -> float:
    """P(some group of n loses more than m of its nodes), each node lost independently
    with probability p_node, nodes / n groups."""
    if nodes % n or not 0 <= m < n or not 0 <= p_node <= 1:
        raise InvalidRequestError("need n dividing nodes, 0 <= m < n and 0 <= p_node <= 1")
    pg = sum(math.comb(n, i) * p_node ** i * (1 - p_node) ** (n - i) for i in range(m + 1, n + 1))
    return 1 - (1 - pg) ** (nodes // n)


def mc_loss_probability(job: Job, strategy: Strategy, profile: FailureProfile, window_s: float,
                        trials: int, seed: int = 0) -> tuple[int, int]:
    """(trials whose window lost a committed version, trials): each trial draws the
    independent faults of ``window_s`` seconds and asks the real planners."""
    rec = Recoverability(job, strategy)
    rng = random.Random(seed)
    losses = 0
    for _ in range(trials):
        gone = {x for f in draw_trace(job, profile, window_s, rng.getrandbits(63), independent=True)
                if f.kind != "process" for x in f.nodes}
        losses += not rec.ok(gone)
    return losses, trials


def loss_per_year(job: Job, profile: FailureProfile, strategy: Strategy, restart_s: float | None = None) -> float:
    """Expected committed versions lost from memory per year, independent node losses
    (domains spread so that a domain fault takes at most one node per group when the
    strategy survives one): a node loss, then m more of its group's other n - 1 members
    within the window until it is rebuilt (restart + rebuild). Too rare to see in a
    simulated trace; the formula is the same the Monte-Carlo test checks."""
    if isinstance(strategy, Snapshotd):
        n, m = strategy.group_size, strategy.parity
    elif isinstance(strategy, Replication):
        n, m = strategy.replicas + 1, strategy.replicas
    else:
        return 0.0
    c = costs(job, strategy)
    window = (profile.restart_s if restart_s is None else restart_s) + c.restore_peer_s
    lam = memory_loss_rate(job, profile)  # per node and second
    p = 1 - math.exp(-lam * window)
    tail = sum(math.comb(n - 1, i) * p ** i * (1 - p) ** (n - 1 - i) for i in range(m, n))
    return lam * job.nodes * 365 * 86400 * tail


@dataclass(frozen=True)
class Option:
    strategy: Strategy
    result: SimResult
    memory_bytes: float
    survives_domain: bool  # a whole failure domain lost: still recoverable from memory
    loss_per_year: float = 0.0  # committed versions lost from memory per year (loss_per_year())

    @property
    def goodput(self) -> float:
        return self.result.ettr


@dataclass(frozen=True)
class Recommendation:
    best: Option
    alternatives: tuple[Option, ...]  # the baselines: disk at Young-Daly, replication, m = 0 (, CheckFree)
    candidates: tuple[Option, ...]  # every snapshotd option tried
    job_mtbf_s: float
    disk_interval_s: float
    notes: tuple[str, ...]


def _divisors(nodes: int, sizes: Sequence[int]) -> list[int]:
    return [n for n in sizes if nodes % n == 0 and n <= nodes]


def snapshot_floor(job: Job, m: int, n: int, nic_share: float = 0.1) -> float:
    """The shortest snapshot interval: one step, and the parity traffic (m x state per
    node per snapshot) at most ``nic_share`` of the NIC's time."""
    return max(job.step_s, m * job.state_bytes_per_node / job.nic_bytes_per_s / nic_share)


def durable_interval(job: Job, storage_share: float = 0.25, floor_s: float = 3600.0) -> float:
    """The durable copy's interval: at least an hour, and its background write at most
    ``storage_share`` of the storage's time."""
    return max(floor_s, job.state_bytes_per_node / job.disk_bytes_per_s / storage_share)


def recommend(job: Job, profile: FailureProfile, horizon_s: float = 60 * 86400, seed: int = 0,
              group_sizes: Sequence[int] = (4, 6, 8), parities: Sequence[int] = (0, 1, 2, 3),
              pipeline_stages: int = 0, max_loss_per_year: float = 0.01) -> Recommendation:
    """Try snapshotd's (n, m) and snapshot intervals on one fault trace; pick the best
    that fits the memory (``job.memory_bytes_per_node``, 0: no limit), preferring options
    that survive a whole failure domain and lose at most ``max_loss_per_year`` committed
    versions a year (:func:`loss_per_year`); among those within 0.05 % of the best
    goodput, the least memory. The alternatives run on the same trace."""
    trace = draw_trace(job, profile, horizon_s, seed)
    mtbf = profile.job_mtbf_s(job.gpus)
    dur = durable_interval(job)
    notes = []
    cands = []
    domain0 = set(range(min(job.nodes, job.nodes_per_domain)))
    for n in _divisors(job.nodes, group_sizes):
        for m in (x for x in parities if x < n):
            lo = snapshot_floor(job, m, n)
            rec = Recoverability(job, Snapshotd(n, m, lo, dur))
            best = None
            for iv in (lo, 2 * lo, 4 * lo, 8 * lo):
                s = Snapshotd(n, m, iv, dur)
                opt = Option(s, simulate(job, s, profile, trace, horizon_s, rec), costs(job, s).memory_bytes,
                             rec.ok(domain0), loss_per_year(job, profile, s))
                if best is None or opt.goodput > best.goodput:
                    best = opt
            cands.append(best)
    if not cands:
        raise InvalidRequestError(f"no group size of {list(group_sizes)} divides {job.nodes} nodes")
    fits = [o for o in cands if not job.memory_bytes_per_node or o.memory_bytes <= job.memory_bytes_per_node]
    if not fits:
        notes.append("no snapshotd option fits the memory budget; showing the smallest")
        fits = [min(cands, key=lambda o: o.memory_bytes)]
    safe = [o for o in fits if o.survives_domain] or fits
    if safe is fits and not any(o.survives_domain for o in fits):
        notes.append("no option that fits survives the loss of a whole failure domain")
    safe = [o for o in safe if o.loss_per_year <= max_loss_per_year] or safe
    top = max(o.goodput for o in safe)
    # within 0.05 % of the best goodput: take the least memory, then the smaller m
    best = min((o for o in safe if o.goodput >= top - 5e-4),
               key=lambda o: (o.memory_bytes, o.strategy.parity, -o.goodput))
    disk_c = costs(job, DiskCheckpoint(job.step_s)).stall_s
    disk_iv = young_daly(disk_c, mtbf)
    alts = [DiskCheckpoint(disk_iv), Replication(1, best.strategy.interval_s, dur)]
    zero = [o for o in cands if o.strategy.parity == 0 and o.strategy.group_size == best.strategy.group_size]
    if pipeline_stages:
        alts.append(CheckFree(pipeline_stages, dur))
    alt_opts = []
    for s in alts:
        try:
            c = costs(job, s)
        except InvalidRequestError as exc:
            notes.append(f"{s.name}: {exc}")
            continue
        rec = Recoverability(job, s)
        alt_opts.append(Option(s, simulate(job, s, profile, trace, horizon_s, rec), c.memory_bytes,
                               rec.ok(domain0), loss_per_year(job, profile, s)))
    alt_opts += zero
    return Recommendation(best, tuple(alt_opts), tuple(cands), mtbf, disk_iv, tuple(notes))


def domain_members(job: Job, n: int) -> int:
    """The most members one group has in one failure domain (the m that survives a domain)."""
    rec = Recoverability(job, Snapshotd(n, 0, job.step_s, job.step_s))
    seen: dict[tuple[int, int], int] = {}
    for node, (g, _) in enumerate(rec.groups_of()):
        key = (g, domain_of(job, node))
        seen[key] = seen.get(key, 0) + 1
    return max(seen.values())
