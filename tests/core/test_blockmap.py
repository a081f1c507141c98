"""core.blockmap: the node block <-> rank walk, both directions."""

from __future__ import annotations

import pytest

from snapshotd.core.blockmap import RankSpan, map_blocks, map_manifests, num_blocks


class _M:
    def __init__(self, n):
        self.payload_bytes = n


def test_num_blocks():
    assert num_blocks(0, 4) == 0
    assert num_blocks(1, 4) == 1
    assert num_blocks(4, 4) == 1
    assert num_blocks(5, 4) == 2


def test_locate_and_node_block_are_inverse():
    bm = map_blocks([(3, 10), (1, 0), (7, 4), (9, 13)], 4)
    assert [s.count for s in bm.spans] == [3, 0, 1, 4]
    assert bm.total_blocks == 8
    for s in bm.spans:
        for i in range(s.count):
            j = bm.node_block(s.rank, i)
            assert bm.locate(j) == (s, i)
    assert bm.locate(8) is None
    assert bm.locate(-1) is None


def test_span_of_and_block_bytes():
    bm = map_blocks([(0, 10), (1, 4)], 4)
    s = bm.span_of(0)
    assert s == RankSpan(0, 0, 3, 10)
    assert [s.block_bytes(i, 4) for i in range(3)] == [4, 4, 2]
    assert bm.span_of(5) is None
    with pytest.raises(KeyError):
        bm.node_block(0, 3)
    with pytest.raises(KeyError):
        bm.node_block(5, 0)


def test_map_manifests_matches_map_blocks():
    assert map_manifests([4, 5], [_M(9), _M(1)], 4) == map_blocks([(4, 9), (5, 1)], 4)


def test_bad_block_size():
    with pytest.raises(ValueError):
        map_blocks([(0, 1)], 0)
