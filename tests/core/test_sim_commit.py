"""Messages and bytes per node per committed version, counted with the real JobProtocol
(snapshotd.core.sim.commitcount) at 64 and 512 nodes (4096: -m slow, and the bench).

Today every node votes to every node (protocol step 3): votes per node grow as nodes - 1
while announces (n - 1) and contributions (blocks x m) stay flat. The test records that
growth and holds what must stay true under any commit scheme: the version commits, a node
sends its group's announces and its blocks' contributions exactly once, and no node sends
more than the all-to-all scheme would."""

from __future__ import annotations

import pytest

from snapshotd.core.protocol import Announce
from snapshotd.core.sim.commitcount import MessageSizes, count_commit
from snapshotd.node.cluster import peer_ops


def real_sizes(block_bytes: int = 4 << 20) -> MessageSizes:
    """Serialized PeerRequest sizes of each kind, from proto/peer.proto."""
    ann, _blob = peer_ops.announce("job-0", 1000, Announce("node-0001", 12, (0,), (b"m" * 200,)))
    return MessageSizes(announce=ann.ByteSize(),
                        contrib=peer_ops.contrib("job-0", 1000, 123, 1, 3, [12] * 8).ByteSize(),
                        vote=peer_ops.vote("job-0", 1000, [4095]).ByteSize(), block_bytes=block_bytes)


def _check(c, nodes, n=8, m=2, blocks=12):
    assert c.committed, "the observed group did not commit"
    assert c.sent["announce"] == n - 1
    assert c.sent["contrib"] == blocks * m  # every data block to its m parity holders, never to itself
    assert 0 < c.sent["vote"] <= nodes - 1  # all-to-all is the most any scheme may send
    assert c.max_sent <= (n - 1) + blocks * m + nodes - 1


def test_messages_per_node_per_version_64_and_512():
    sizes = real_sizes()
    small, big = count_commit(64, 8, 2, 12, sizes), count_commit(512, 8, 2, 12, sizes)
    _check(small, 64)
    _check(big, 512)
    growth = big.messages_per_node / small.messages_per_node
    # The record of today's all-to-all votes: per node O(nodes) (x8 nodes -> x5.8 messages).
    # A scheme with O(1) or O(log n) votes per node brings this under 1.5.
    assert growth <= 512 / 64
    per_node_bytes = big.control_bytes_per_node
    assert per_node_bytes == pytest.approx(
        7 * sizes.announce + 24 * sizes.contrib + big.sent["vote"] * sizes.vote)
    assert big.extra["block_payload"] == 24 * sizes.block_bytes


def test_no_parity_and_every_group_observed():
    c = count_commit(32, 4, 0, 4, observed_groups=8)
    assert c.committed and c.sent["contrib"] == 0 and c.sent["announce"] == 3
    with pytest.raises(Exception, match="dividing"):
        count_commit(16, 5, 1, 4)  # 5 does not divide 16


@pytest.mark.slow
def test_messages_per_node_per_version_4096():
    c = count_commit(4096, 8, 2, 12, real_sizes())
    _check(c, 4096)
