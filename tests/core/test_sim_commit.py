"""Messages and bytes per node per committed version, counted with the real JobProtocol
(snapshotd.core.sim.commitcount) at 64, 512 and 4096 nodes.

Votes stay in the group and completion travels the commit tree (snapshotd.core.protocol):
per node, announces (n - 1), contributions (blocks x m) and votes (n - 1) are flat, and
reports and words average n each, whatever the job's size. The tests hold that: every
node commits, each kind is within its bound, and the per-node figures do not grow with
the job (before the tree, votes alone were nodes - 1 per node: 63 at 64, 4095 at 4096)."""

from __future__ import annotations

import pytest

from snapshotd.core import commit_tree
from snapshotd.core.protocol import REPORT, WORD, Announce
from snapshotd.core.sim.commitcount import MessageSizes, count_commit, table
from snapshotd.node.cluster import peer_ops


def real_sizes(block_bytes: int = 4 << 20) -> MessageSizes:
    """Serialized PeerRequest sizes of each kind, from proto/peer.proto."""
    ann, _blob = peer_ops.announce("job-0", 1000, Announce("node-0001", 12, (0,), (b"m" * 200,)))
    return MessageSizes(announce=ann.ByteSize(),
                        contrib=peer_ops.contrib("job-0", 1000, 123, 1, 3, [12] * 8).ByteSize(),
                        vote=peer_ops.vote("job-0", 1000, [4095]).ByteSize(), block_bytes=block_bytes,
                        report=peer_ops.vote("job-0", 1000, [], REPORT).ByteSize(),
                        word=peer_ops.vote("job-0", 1000, [], WORD).ByteSize())


def _check(c, nodes, n=8, m=2, blocks=12):
    assert c.committed, "not every node committed"
    assert c.sent["announce"] == n - 1
    assert c.sent["contrib"] == blocks * m  # every data block to its m parity holders, never to itself
    assert c.sent["vote"] == n - 1  # the group only
    groups = nodes // n
    # every member of every group but the root reports to the n members of its parent,
    # and every member of every group but the leaves words its children's members
    assert c.sent["report"] == pytest.approx(n * (groups - 1) / groups)
    assert c.sent["word"] == pytest.approx(n * (groups - 1) / groups)
    assert c.max_sent <= (n - 1) + blocks * m + (n - 1) + n + commit_tree.FANOUT * n
    assert c.heartbeats_per_node_s <= c.extra["heartbeats_max_s"] <= \
        ((n - 1) + n + commit_tree.FANOUT * n) / 0.5


def test_messages_and_bytes_per_node_are_flat_from_64_to_4096_nodes():
    sizes = real_sizes()
    small, mid, big = (count_commit(x, 8, 2, 12, sizes) for x in (64, 512, 4096))
    for c in (small, mid, big):
        _check(c, c.nodes)
    # Flat: 64x the nodes, at most 2x the messages, bytes and heartbeats per node (all-to-all
    # votes made it 44x, and heartbeats 65x).
    assert big.messages_per_node <= 2 * small.messages_per_node
    assert big.control_bytes_per_node <= 2 * small.control_bytes_per_node
    assert big.heartbeats_per_node_s <= 2 * small.heartbeats_per_node_s
    assert big.extra["heartbeats_all_to_all_s"] == 4095 / 0.5
    per_node_bytes = big.control_bytes_per_node
    assert per_node_bytes == pytest.approx(
        7 * sizes.announce + 24 * sizes.contrib + 7 * sizes.vote + big.sent["report"] * sizes.report
        + big.sent["word"] * sizes.word)
    assert big.extra["block_payload"] == 24 * sizes.block_bytes
    assert big.extra["tree_depth"] == commit_tree.depth(512) == 5


def test_one_group_has_no_tree_messages_and_a_table_prints():
    c = count_commit(4, 4, 1, 4)
    assert c.committed and c.sent["report"] == c.sent["word"] == 0 and c.sent["vote"] == 3
    assert c.heartbeats_per_node_s == 3 / 0.5
    c = count_commit(32, 4, 0, 4)
    assert c.committed and c.sent["contrib"] == 0 and c.sent["announce"] == 3
    with pytest.raises(Exception, match="dividing"):
        count_commit(16, 5, 1, 4)  # 5 does not divide 16
    lines = table(scales=(16,), group_size=4, parity=1)
    assert len(lines) == 2 and "16 nodes" in lines[1] and "committed True" in lines[1]


def test_the_tree():
    assert [commit_tree.parent(g, 6) for g in range(6)] == [None, 0, 0, 0, 0, 1]
    assert list(commit_tree.children(0, 6)) == [1, 2, 3, 4] and list(commit_tree.children(1, 6)) == [5]
    assert list(commit_tree.children(5, 6)) == []
    assert [commit_tree.depth(g) for g in (1, 2, 5, 6, 21, 22)] == [0, 1, 1, 2, 2, 3]
    groups = (("a", "b"), ("c", "d"), ("e", "f"))
    assert commit_tree.watched(groups, "a") == ("b", "c", "d", "e", "f")
    assert commit_tree.watched(groups, "d") == ("c", "a", "b")
    with pytest.raises(ValueError):
        commit_tree.watched(groups, "z")
    with pytest.raises(ValueError):
        commit_tree.parent(6, 6)
