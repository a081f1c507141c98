"""Tests for snapshotd.core.placement: rotating stripes, closed forms against brute force,
the storage/spread properties, virtual zero blocks, m = 0 and input validation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from snapshotd.wire.errors import InvalidRequestError
from snapshotd.core.placement import (
    GroupLayout,
    block_of,
    data_stripe_of,
    num_stripes,
    parity_stripes_of,
    place_group,
    position_in_stripe,
    stripe_data_nodes,
    stripe_parity_nodes,
)

NM = [(n, m) for n in range(1, 9) for m in range(n)]


def test_stripe_roles_example():
    assert stripe_parity_nodes(4, 2, 0) == (0, 1)
    assert stripe_data_nodes(4, 2, 0) == (2, 3)
    assert stripe_parity_nodes(4, 2, 3) == (3, 0)
    assert stripe_data_nodes(4, 2, 3) == (1, 2)
    assert position_in_stripe(4, 2, 0, 3) == ("parity", 1)
    assert position_in_stripe(4, 2, 2, 3) == ("data", 1)


@pytest.mark.parametrize("n,m", NM)
def test_each_stripe_partitions_the_group(n, m):
    for s in range(3 * n):
        data, par = stripe_data_nodes(n, m, s), stripe_parity_nodes(n, m, s)
        assert len(data) == n - m and len(par) == m
        assert sorted(data + par) == list(range(n))  # distinct, disjoint, all nodes
        for p, node in enumerate(data):
            assert position_in_stripe(n, m, node, s) == ("data", p)
        for t, node in enumerate(par):
            assert position_in_stripe(n, m, node, s) == ("parity", t)


@pytest.mark.parametrize("n,m", NM)
def test_data_stripe_of_matches_brute_force_and_inverts(n, m):
    k = n - m
    for node in range(n):
        ds = [s for s in range(6 * n) if position_in_stripe(n, m, node, s)[0] == "data"]
        for w in range(5):  # k data stripes per window of n
            assert sum(1 for s in ds if w * n <= s < (w + 1) * n) == k
        for j in range(5 * k):
            s, p = data_stripe_of(n, m, node, j)
            assert s == ds[j]
            assert stripe_data_nodes(n, m, s)[p] == node
            assert block_of(n, m, s, p) == (node, j)


@pytest.mark.parametrize("n,m", NM)
def test_parity_stripes_of_matches_brute_force(n, m):
    for S in (0, 1, n - 1, n, 2 * n + 1, 3 * n):
        for node in range(n):
            brute = [(s, position_in_stripe(n, m, node, s)[1]) for s in range(S)
                     if position_in_stripe(n, m, node, s)[0] == "parity"]
            assert parity_stripes_of(n, m, node, S) == brute


@pytest.mark.parametrize("n,m", NM)
def test_num_stripes_is_minimal(n, m):
    rng = random.Random(n * 100 + m)
    for _ in range(20):
        counts = [rng.choice([0, 0, 1, 2, 3, 7, 11]) for _ in range(n)]
        S = num_stripes(n, m, counts)
        placed = [data_stripe_of(n, m, i, b - 1)[0] for i, b in enumerate(counts) if b]
        assert S == (max(placed) + 1 if placed else 0)
    assert num_stripes(n, m, [0] * n) == 0


@pytest.mark.parametrize("n,m", NM)
def test_equal_counts_storage_property(n, m):
    k = n - m
    for B in (k, 3 * k):
        layout = place_group(n, m, [B] * n)
        assert layout.num_stripes == B * n // k
        for node in range(n):
            assert len(layout.parity_blocks(node)) == B * m // k
            parity_stripes = {s for s, _ in layout.parity_blocks(node)}
            data = layout.data_blocks(node)
            assert [j for j, _, _ in data] == list(range(B))
            assert not parity_stripes & {s for _, s, _ in data}
        # every stripe is full: k real data blocks, each stripe slot used once
        slots = Counter((s, p) for node in range(n) for _, s, p in layout.data_blocks(node))
        assert len(slots) == layout.num_stripes * k and set(slots.values()) == {1}


@pytest.mark.parametrize("n,m", NM)
def test_uneven_counts_virtual_blocks_and_contributions(n, m):
    rng = random.Random(7 * n + m)
    k = n - m
    counts = [rng.randint(0, 9) for _ in range(n)]
    counts[rng.randrange(n)] = 0
    layout = place_group(n, m, counts)
    S = layout.num_stripes
    real = Counter()
    for s in range(S):
        for p in range(k):
            blk = layout.data_block(s, p)
            node, j = block_of(n, m, s, p)
            assert blk == ((node, j) if j < counts[node] else None)
            if blk:
                real[blk] += 1
    assert set(real) == {(i, j) for i in range(n) for j in range(counts[i])}
    assert set(real.values()) <= {1}
    # each real block is sent to exactly the m parity holders of its stripe
    sent = Counter()
    for holder in range(n):
        held = set(layout.parity_blocks(holder))
        for s, t, p, src, j in layout.expected_contributions(holder):
            assert (s, t) in held and stripe_parity_nodes(n, m, s)[t] == holder
            assert src != holder and layout.data_block(s, p) == (src, j)
            sent[(src, j)] += 1
    assert all(sent[b] == m for b in real)
    assert sum(len(layout.parity_blocks(i)) for i in range(n)) == S * m


def test_m_zero_has_no_parity():
    layout = place_group(3, 0, [2, 0, 5])
    assert layout.k == 3 and layout.num_stripes == 5
    assert stripe_data_nodes(3, 0, 4) == (1, 2, 0)
    assert all(layout.parity_blocks(i) == [] for i in range(3))
    assert all(layout.expected_contributions(i) == [] for i in range(3))
    assert [s for _, s, _ in layout.data_blocks(2)] == [0, 1, 2, 3, 4]


def test_single_node_group():
    layout = place_group(1, 0, [3])
    assert layout.num_stripes == 3
    assert layout.data_block(2, 0) == (0, 2)


def test_group_layout_is_frozen_and_validated():
    layout = place_group(4, 2, [1, 2, 3, 4])
    with pytest.raises(AttributeError):
        layout.n = 5
    assert GroupLayout(4, 2, [1, 2, 3, 4], layout.num_stripes) == layout
    with pytest.raises(InvalidRequestError, match="num_stripes"):
        GroupLayout(4, 2, (1, 2, 3, 4), layout.num_stripes + 1)


@pytest.mark.parametrize("call,match", [
    (lambda: place_group(0, 0, []), "n >= 1"),
    (lambda: place_group(3, 3, [1, 1, 1]), "0 <= m < n"),
    (lambda: place_group(3, -1, [1, 1, 1]), "0 <= m < n"),
    (lambda: place_group(3, 1, [1, 1]), "need 3 block counts"),
    (lambda: place_group(3, 1, [1, -1, 1]), "block count of node 1"),
    (lambda: data_stripe_of(3, 1, 3, 0), "node 3 out of range"),
    (lambda: data_stripe_of(3, 1, 0, -1), "block index"),
    (lambda: block_of(3, 1, 0, 2), "data position 2"),
    (lambda: parity_stripes_of(3, 1, 0, -1), "number of stripes"),
])
def test_validation(call, match):
    with pytest.raises(InvalidRequestError, match=match):
        call()
