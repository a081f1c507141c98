"""The failure simulator (snapshotd.core.sim) against what is known in closed form or
reported: Young-Daly's interval, the binomial loss probability, Llama 3's > 90 % ETTR;
and its parts: profiles, traces, costs, recoverability through the real planners."""

from __future__ import annotations

import math

import pytest

from snapshotd.core.sim.analysis import (
    best_interval,
    binomial_loss_probability,
    domain_members,
    mc_loss_probability,
    memory_loss_rate,
)
from snapshotd.core.sim.engine import draw_trace, run, simulate
from snapshotd.core.sim.model import CheckFree, DiskCheckpoint, Job, Replication, Snapshotd, costs, young_daly
from snapshotd.core.sim.profiles import custom, fault_kinds, llama3, profile, rsc
from snapshotd.core.sim.recover import Recoverability
from snapshotd.wire.errors import InvalidRequestError

DAY = 86400.0


def test_best_disk_interval_is_young_daly():
    """C = 60 s, job MTBF 3 h: the simulated optimum is within 10 % of sqrt(2 C MTBF)
    (Daly's higher-order terms put the true optimum ~3 % below it)."""
    p = custom(3 * 512, restart_s=300)
    job = Job(nodes=64, state_bytes_per_node=60e9, disk_bytes_per_s=1e9, step_s=1)
    mtbf = p.job_mtbf_s(job.gpus)
    assert mtbf == pytest.approx(3 * 3600)
    c = costs(job, DiskCheckpoint(100)).stall_s
    assert c == pytest.approx(60)
    yd = young_daly(c, mtbf)
    best, res = best_interval(job, DiskCheckpoint, p, yd / 3, yd * 3, horizon_s=12000 * mtbf, seed=0, points=17)
    assert res[0][1].faults > 11000
    assert abs(best - yd) / yd < 0.10, (best, yd)
    ettrs = [r.ettr for _, r in res]
    assert ettrs[0] < max(ettrs) > ettrs[-1]  # a real optimum inside the range


@pytest.mark.parametrize("n,m,p_node", [(8, 1, 0.04), (4, 1, 0.04), (8, 0, 0.01), (8, 2, 0.12)])
def test_mc_loss_probability_matches_binomial(n, m, p_node):
    """Independent failures: the Monte-Carlo loss probability of a window (the simulator's
    fault sampler + the real recovery planner) brackets the binomial formula. The window
    is sized so that each node is lost in it with probability ``p_node``."""
    p = custom(3 * 512)
    job = Job(nodes=64, state_bytes_per_node=1e9)
    window = -math.log(1 - p_node) / memory_loss_rate(job, p)
    losses, trials = mc_loss_probability(job, Snapshotd(n, m, 60, 3600), p, window, trials=3000, seed=7)
    want = binomial_loss_probability(64, n, m, p_node)
    est = losses / trials
    z = 3.29  # 99.9 % Wilson interval
    centre = (est + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(est * (1 - est) / trials + z * z / (4 * trials * trials))
    assert centre - half <= want <= centre + half, (est, want, losses)
    assert 0.01 < want < 0.99  # the check has teeth: neither certain nor impossible


def test_llama3_ettr_is_near_the_reported_90_percent():
    """Llama 3 405B on 16,384 H100 (2,048 nodes), 54 days: disk checkpoints at the
    Young-Daly interval land near the reported > 90 % effective training time."""
    p = llama3()
    job = Job(nodes=2048, state_bytes_per_node=405e9 * 16 / 2048, step_s=10)
    mtbf = p.job_mtbf_s(job.gpus)
    assert mtbf / 3600 == pytest.approx(54 * 24 / 419)
    yd = young_daly(costs(job, DiskCheckpoint(10)).stall_s, mtbf)
    ettrs = [run(job, DiskCheckpoint(yd), p, 54 * DAY, seed).ettr for seed in range(3)]
    faults = [len([f for f in draw_trace(job, p, 54 * DAY, seed) if f.kind != "slow"]) for seed in range(3)]
    assert all(360 < f < 480 for f in faults), faults  # 419 reported
    assert all(0.90 <= e <= 0.96 for e in ettrs), ettrs


def test_snapshotd_beats_disk_and_parity_keeps_committed_versions():
    p = llama3()
    job = Job(nodes=256, state_bytes_per_node=20e9, step_s=5, nodes_per_domain=8)
    trace = draw_trace(job, p, 120 * DAY, 3)
    h = 120 * DAY
    yd = young_daly(costs(job, DiskCheckpoint(5)).stall_s, p.job_mtbf_s(job.gpus))
    disk = simulate(job, DiskCheckpoint(yd), p, trace, h)
    m2 = simulate(job, Snapshotd(8, 2, 60, 3600), p, trace, h)
    m0 = simulate(job, Snapshotd(8, 0, 60, 3600), p, trace, h)
    rep = simulate(job, Replication(1, 60, 3600), p, trace, h)
    assert m2.faults == disk.faults == m0.faults > 10
    assert m2.memory_losses == 0 and rep.memory_losses == 0  # domains spread over the groups
    assert m0.memory_losses > 0  # every lost node loses its version: back to the durable copy
    assert m2.ettr > m0.ettr and m2.ettr > disk.ettr
    assert m2.lost_work_s < m0.lost_work_s
    assert m2.planner_calls > 0


def test_trace_is_seeded_and_has_every_scope():
    job = Job(nodes=512, state_bytes_per_node=1e9)
    a, b = draw_trace(job, llama3(), 200 * DAY, 1), draw_trace(job, llama3(), 200 * DAY, 1)
    assert a == b and a != draw_trace(job, llama3(), 200 * DAY, 2)
    kinds = {f.kind for f in a}
    assert kinds == {"process", "node", "domain", "slow"}
    restarts = sum(f.kind == "process" for f in a) / sum(f.kind != "slow" for f in a)
    assert 0.68 < restarts < 0.82  # ~75 % need only a process restart
    for f in a:
        if f.kind == "domain":
            assert len({x // job.nodes_per_domain for x in f.nodes}) == 1 and len(f.nodes) == 8
    assert all(x.t < y.t for x, y in zip(a, a[1:]))


def test_lemons_fail_most_until_excluded():
    """1 % lemon nodes at 100x the rate: they take most faults at first, each strikes out
    after 3 and is replaced by a healthy spare, so later the faults spread out."""
    p = llama3(lemon_fraction=0.01, lemon_factor=100.0, lemon_strikes=3)
    job = Job(nodes=1000, state_bytes_per_node=1e9)
    tr = [f for f in draw_trace(job, p, 60 * DAY, 5) if f.kind in ("process", "node")]
    per: dict[int, int] = {}
    for f in tr:
        per[f.nodes[0]] = per.get(f.nodes[0], 0) + 1
    struck = {x for x, c in per.items() if c >= 3}
    assert 8 <= len(struck) <= 12  # the 10 lemons (a strike may be a domain fault, not counted here)
    early = sum(f.nodes[0] in struck for f in tr[:40])
    late = sum(f.nodes[0] in struck for f in tr[-40:])
    assert early > 16 and late < early / 3, (early, late)


def test_profiles():
    l3, r = llama3(), rsc()
    assert sum(l3.shares()) == pytest.approx(1)
    assert r.job_mtbf_s(1024) == pytest.approx(7.9 * 3600)
    assert r.job_mtbf_s(16384) == pytest.approx(1.8 * 3600)
    kinds = dict(fault_kinds(l3))
    assert sum(kinds.values()) == pytest.approx(1)
    assert kinds["kill_trainer"] / (1 - kinds["slow_node"]) == pytest.approx(0.75, abs=0.01)
    assert kinds["kill_domain"] > 0 and kinds["kill_node"] > 0
    assert profile("llama3") == l3
    with pytest.raises(InvalidRequestError, match="unknown failure profile"):
        profile("nope")
    with pytest.raises(InvalidRequestError):
        custom(0)
    with pytest.raises(InvalidRequestError):
        llama3(restart_fraction=1.5)


def test_recoverability_asks_the_planners():
    job = Job(nodes=64, state_bytes_per_node=1e9, nodes_per_domain=8)
    assert domain_members(job, 8) == 1  # 8 domains of 8 nodes dealt over 8 groups
    rec = Recoverability(job, Snapshotd(8, 1, 60, 3600))
    groups = rec.groups_of()
    same = [i for i, (g, _) in enumerate(groups) if g == 0]
    assert rec.ok(set(range(8)))  # a whole domain: one node per group
    assert rec.ok({same[0]}) and not rec.ok(set(same[:2]))
    assert rec.planner_calls >= 2
    cf = Recoverability(Job(nodes=8, state_bytes_per_node=1e9), CheckFree(8, 3600))
    assert cf.ok({3}) and cf.ok({0}) and not cf.ok({3, 4})  # adjacent stages cannot be averaged
    rep = Recoverability(job, Replication(1, 60, 3600))
    pair = [i for i, (g, _) in enumerate(rep.groups_of()) if g == 5]
    assert rep.ok({pair[0]}) and not rep.ok(set(pair))


def test_costs_and_bad_strategies():
    job = Job(nodes=64, state_bytes_per_node=10e9, nic_bytes_per_s=10e9, step_s=2)
    c = costs(job, Snapshotd(8, 2, 60, 3600))
    assert c.commit_s == pytest.approx(2.0) and c.durable_every == 60
    assert c.memory_bytes == pytest.approx(2 * (1 + 2 / 6) * 10e9)  # docs/OPERATIONS.md's budget
    assert costs(job, Snapshotd(8, 2, 0.5, 3600)).interval_s == 2  # never below one step
    for bad in (Snapshotd(7, 2, 60, 3600), Snapshotd(8, 8, 60, 3600), Replication(0, 60, 60),
                Snapshotd(8, 2, -1, 3600), CheckFree(3, 3600)):
        with pytest.raises(InvalidRequestError):
            costs(job, bad)
    with pytest.raises(InvalidRequestError):
        Job(nodes=0, state_bytes_per_node=1)
