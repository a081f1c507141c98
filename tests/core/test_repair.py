"""core.repair.plan_repair: one planner for a rebuild and a degraded read, called directly."""

from __future__ import annotations

import pytest

from snapshotd.core.blockmap import map_blocks
from snapshotd.core.placement import place_group
from snapshotd.core.recovery import RecoveryPlan, Unrecoverable
from snapshotd.core.repair import block_count_limit, check_block_counts, plan_repair

N, M = 5, 2
COUNTS = (7, 5, 9, 0, 6)
LOST = 2


def layout():
    return place_group(N, M, COUNTS)


def test_rebuild_plan_covers_every_lost_block():
    lay = layout()
    plan = plan_repair(lay, {0, 1, 3, 4}, LOST, version=7, group=1)
    assert isinstance(plan, RecoveryPlan)
    outs = plan.outputs_of(LOST)
    data = sorted(o.block for _, o in outs if o.kind == "data")
    parity = sorted((s, o.index) for s, o in outs if o.kind == "parity")
    assert data == list(range(COUNTS[LOST]))
    assert parity == sorted(lay.parity_blocks(LOST))
    assert all(o.node == LOST for _, o in outs)


def test_degraded_plan_only_that_ranks_blocks():
    lay = layout()
    bm = map_blocks([(10, 3 * 64), (11, 4 * 64 + 1), (12, 64)], 64)  # 3 + 5 + 1 = 9 blocks
    assert bm.total_blocks == COUNTS[LOST]
    span = bm.span_of(11)
    plan = plan_repair(lay, {0, 1, 3, 4}, LOST, version=7, group=1, span=span)
    assert isinstance(plan, RecoveryPlan)
    outs = [o for rp in plan.repairs for o in rp.outputs]
    assert sorted(o.block for o in outs) == list(range(span.first, span.first + span.count))
    assert all(o.kind == "data" and o.node == LOST for o in outs)
    assert all(rp.outputs for rp in plan.repairs)  # stripes with nothing wanted are dropped
    full = plan_repair(lay, {0, 1, 3, 4}, LOST, version=7, group=1)
    assert len(plan.repairs) < len(full.repairs)


def test_more_than_m_lost_is_unrecoverable_with_a_reason():
    lay = layout()
    plan = plan_repair(lay, {0, 4}, LOST, version=7, group=1)  # nodes 1, 2, 3 gone: 3 > m
    assert isinstance(plan, Unrecoverable)
    assert not plan.ok
    assert "version 7" in plan.reason and "group 1" in plan.reason
    assert plan.stripes
    bm = map_blocks([(10, 3 * 64), (11, 4 * 64 + 1), (12, 64)], 64)
    read = plan_repair(lay, {0, 4}, LOST, version=7, group=1, span=bm.span_of(10))
    assert isinstance(read, Unrecoverable) and read.reason == plan.reason


def test_check_block_counts():
    assert check_block_counts([1, 2, 3], 3, 10) == (1, 2, 3)
    for bad in ([1, 2], [1, 2, 11], [1, 2, -1], [1, 2, True], (1, 2, 3), "123"):
        with pytest.raises(ValueError):
            check_block_counts(bad, 3, 10)
    assert block_count_limit(1 << 20, 1 << 10, 3) == 3 << 10
    assert block_count_limit(10, 1 << 10, 0) == 1
