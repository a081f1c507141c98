"""Tests for snapshotd.core.recovery: plans executed end to end with ErasureCode for every
pattern of up to m (and m + 1) dead nodes, source choice, totals and failure reasons."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from snapshotd.core.erasure import ErasureCode
from snapshotd.wire.errors import InvalidRequestError
from snapshotd.core.placement import place_group
from snapshotd.core.recovery import (
    DirectRead,
    RecoveryPlan,
    StripeRepair,
    Unrecoverable,
    plan_data_fetch,
    plan_recovery,
)

BS = 64
CONFIGS = [(2, 1), (3, 1), (4, 2), (5, 2), (6, 3)]
VERSION, GROUP = 42, 3


def build(n, m, seed, counts=None):
    """Layout with uneven counts (one node empty), random data and encoded parity."""
    rng = np.random.default_rng(seed)
    if counts is None:
        counts = [int(c) for c in rng.integers(1, 3 * (n - m) + 3, n)]
        counts[seed % n] = 0
    layout = place_group(n, m, counts)
    code = ErasureCode(n - m, m)
    data = {(i, j): rng.integers(0, 256, BS, dtype=np.uint8) for i in range(n) for j in range(counts[i])}
    parity = {}
    zero = np.zeros(BS, dtype=np.uint8)
    for s in range(layout.num_stripes):
        blocks = [data[b] if (b := layout.data_block(s, p)) else zero for p in range(n - m)]
        out = [np.empty(BS, dtype=np.uint8) for _ in range(m)]
        code.encode(blocks, out)
        for t in range(m):
            parity[(s, t)] = out[t]
    return layout, code, data, parity


def lost_real_shards(layout, dead, s):
    data_nodes, parity_nodes = layout.stripe_nodes(s)
    lost = [p for p in range(layout.k) if data_nodes[p] in dead and layout.data_block(s, p)]
    return len(lost) + sum(1 for x in parity_nodes if x in dead)


def execute(plan, layout, code, data, parity, alive):
    """Run every repair; returns {("data", node, j) or ("parity", s, t): rebuilt bytes}."""
    k = layout.k
    rebuilt = {}
    for r in plan.repairs:
        assert len(r.sources) == k
        assert len({x.shard_index(k) for x in r.sources}) == k
        avail = {}
        for x in r.sources:
            if x.kind == "zero":
                assert layout.data_block(r.stripe, x.index) is None
                avail[x.index] = np.zeros(BS, dtype=np.uint8)
            elif x.kind == "data":
                assert x.node in alive and layout.data_block(r.stripe, x.index) == (x.node, x.block)
                avail[x.index] = data[(x.node, x.block)]
            else:
                assert x.node in alive and layout.stripe_nodes(r.stripe)[1][x.index] == x.node
                avail[k + x.index] = parity[(r.stripe, x.index)]
        want = [o.shard_index(k) for o in r.outputs]
        out = {w: np.empty(BS, dtype=np.uint8) for w in want}
        code.reconstruct(avail, want, out)
        for o in r.outputs:
            key = ("data", o.node, o.block) if o.kind == "data" else ("parity", r.stripe, o.index)
            assert key not in rebuilt
            rebuilt[key] = out[o.shard_index(k)]
    return rebuilt


@pytest.mark.parametrize("n,m", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_pattern_of_up_to_m_dead_nodes_rebuilds_exactly(n, m, seed):
    layout, code, data, parity = build(n, m, seed)
    for f in range(1, m + 1):
        for dead in itertools.combinations(range(n), f):
            alive = set(range(n)) - set(dead)
            plan = plan_recovery(layout, alive, dead, VERSION, GROUP)
            assert isinstance(plan, RecoveryPlan) and plan.ok
            rebuilt = execute(plan, layout, code, data, parity, alive)
            expect = {("data", i, j) for i in dead for j in range(layout.block_counts[i])}
            expect |= {("parity", s, t) for i in dead for s, t in layout.parity_blocks(i)}
            assert set(rebuilt) == expect
            for key, buf in rebuilt.items():
                orig = data[key[1:]] if key[0] == "data" else parity[key[1:]]
                assert np.array_equal(buf, orig), (dead, key)
            fetched = sum(len(r.fetches()) for r in plan.repairs)
            assert sum(plan.fetch_counts(BS).values()) == fetched * BS
            assert not set(plan.fetch_counts()) & set(dead)


@pytest.mark.parametrize("n,m", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_m_plus_one_dead_nodes(n, m, seed):
    layout, code, data, parity = build(n, m, seed)
    saw_failure = False
    for dead in itertools.combinations(range(n), m + 1):
        alive = set(range(n)) - set(dead)
        plan = plan_recovery(layout, alive, dead, VERSION, GROUP)
        worst = max(lost_real_shards(layout, dead, s) for s in range(layout.num_stripes))
        if worst > m:
            saw_failure = True
            assert isinstance(plan, Unrecoverable) and not plan.ok
            assert plan.reason.startswith(f"version {VERSION}, group {GROUP}: stripe {plan.stripes[0]} lost ")
            assert f"(m={m})" in plan.reason
            assert all(lost_real_shards(layout, dead, s) > m for s in plan.stripes)
            assert plan.missing and all(node in dead for node, _, _ in plan.missing)
        else:  # every extra loss was a virtual zero block
            rebuilt = execute(plan, layout, code, data, parity, alive)
            for key, buf in rebuilt.items():
                orig = data[key[1:]] if key[0] == "data" else parity[key[1:]]
                assert np.array_equal(buf, orig)
    assert saw_failure


def test_more_than_m_dead_is_fine_when_the_extra_losses_are_virtual():
    # nodes 0 and 1 hold no data: losing both loses at most one real shard per stripe
    layout, code, data, parity = build(3, 1, 5, counts=[0, 0, 5])
    plan = plan_recovery(layout, {2}, {0, 1}, VERSION, GROUP)
    assert plan.ok
    rebuilt = execute(plan, layout, code, data, parity, {2})
    assert set(rebuilt) == {("parity", s, t) for i in (0, 1) for s, t in layout.parity_blocks(i)}
    for (_, s, t), buf in rebuilt.items():
        assert np.array_equal(buf, parity[(s, t)])


def test_reason_format_names_blocks():
    layout = place_group(4, 2, [3, 0, 5, 1])
    plan = plan_recovery(layout, {0}, {1, 2, 3}, 7, 1)
    assert isinstance(plan, Unrecoverable)
    assert plan.reason.startswith("version 7, group 1: stripe 0 lost 3 shards (m=2): "
                                  "node 2 data block 0, node 3 data block 0, node 1 parity 1")
    assert (2, "data", 0) in plan.missing and (1, "parity", 1) in plan.missing


def test_prefers_data_and_zero_sources():
    layout = place_group(6, 2, [8] * 6)
    plan = plan_recovery(layout, set(range(1, 6)), {0}, 1, 0)
    for r in plan.repairs:
        if r.outputs[0].kind == "parity":  # all data alive: just re-encode
            assert all(x.kind == "data" for x in r.sources)
        else:
            assert sum(x.kind == "parity" for x in r.sources) == 1
    layout = place_group(3, 1, [0, 0, 4])
    plan = plan_recovery(layout, {0, 1}, {2}, 1, 0)
    for r in plan.repairs:
        assert sum(x.kind == "zero" for x in r.sources) >= 1 and len(r.sources) == 2
        assert not any(x.kind == "zero" for x in r.fetches())


def test_load_is_spread_across_parity_holders():
    layout = place_group(6, 3, [30] * 6)
    plan = plan_recovery(layout, {1, 2, 3, 4, 5}, {0}, 1, 0)
    counts = plan.fetch_counts()
    assert set(counts) == {1, 2, 3, 4, 5}
    assert max(counts.values()) - min(counts.values()) <= max(counts.values()) // 5


def test_dead_non_target_counts_as_lost_but_is_not_rebuilt():
    layout = place_group(5, 2, [4] * 5)
    plan = plan_recovery(layout, {0, 1, 2}, {3}, 1, 0)
    assert plan.ok and plan.repairs
    assert all(o.node == 3 for r in plan.repairs for o in r.outputs)
    assert all(x.node in {0, 1, 2} for r in plan.repairs for x in r.fetches())
    assert plan.outputs_of(4) == [] and plan.outputs_of(3)


def test_m_zero():
    layout = place_group(3, 0, [2, 0, 1])
    assert plan_recovery(layout, {0, 2}, {1}, 1, 0) == RecoveryPlan(1, 0, 3, 0, ())
    bad = plan_recovery(layout, {0, 1}, {2}, 9, 4)
    assert isinstance(bad, Unrecoverable) and "version 9, group 4" in bad.reason and "(m=0)" in bad.reason


def test_no_targets_no_work():
    layout = place_group(4, 2, [2, 2, 2, 2])
    assert plan_recovery(layout, {0, 1, 2, 3}, (), 1, 0).repairs == ()


def test_plan_data_fetch():
    layout, code, data, parity = build(5, 2, 3)
    node = next(i for i in range(5) if layout.block_counts[i] >= 2)
    assert plan_data_fetch(layout, range(5), node, 1) == DirectRead(node, 1, layout.data_blocks(node)[1][1])
    alive = set(range(5)) - {node, (node + 1) % 5}
    for j in range(layout.block_counts[node]):
        rep = plan_data_fetch(layout, alive, node, j)
        assert isinstance(rep, StripeRepair)
        assert [(o.kind, o.node, o.block) for o in rep.outputs] == [("data", node, j)]
        plan = RecoveryPlan(1, 0, 3, 2, (rep,))
        got = execute(plan, layout, code, data, parity, alive)[("data", node, j)]
        assert np.array_equal(got, data[(node, j)])
    gone = plan_data_fetch(place_group(5, 2, [3] * 5), {0}, 1, 2, version=5, group=2)
    assert isinstance(gone, Unrecoverable) and gone.reason.startswith("version 5, group 2: stripe ")
    assert (1, "data", 2) in gone.missing
    with pytest.raises(InvalidRequestError, match="has no data block"):
        plan_data_fetch(layout, alive, node, layout.block_counts[node])


@pytest.mark.parametrize("alive,targets,match", [
    ({0, 1}, {1}, "both alive and a recovery target"),
    ({0, 4}, {1}, "alive node 4 out of range"),
    ({0}, {-1}, "target node -1 out of range"),
])
def test_invalid_sets(alive, targets, match):
    with pytest.raises(InvalidRequestError, match=match):
        plan_recovery(place_group(4, 2, [1, 1, 1, 1]), alive, targets, 1, 0)
