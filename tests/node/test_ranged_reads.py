"""Ranged FetchShard of a rank another node holds (issue 14), on a real 3-node m=1 cluster
(k = 2): while its node is up, only the covering blocks come from it (a corrupt one: the
range is decoded from the group instead); once that node is
SIGKILLed and wiped (not replaced), only the stripes holding the covering blocks are
decoded from the survivors -- k blocks per stripe -- and the bytes the peers served are
counted (each daemon's peer traffic counter) against that bound, derived from the
layout. A corrupt source block in a stripe outside the range does not matter; one in a
covering stripe is detected (with k = 2 survivors there is nothing to decode around it:
the read fails, naming the stripe and the corrupt block).
"""

from __future__ import annotations

import random

import pytest

from clusterkit import JOB, make_cluster, wait_for  # noqa: F401 (fixture)
from snapshotd.core import placement as pl
from snapshotd.wire import errors, shm

SLACK = 48 << 10  # under one block: heartbeats while a read runs (~600 bytes/s for 2 nodes here)


def peer_bytes_served(c, nodes) -> int:
    """Reply bytes the daemons of ``nodes`` handed to their peer sockets so far."""
    return sum(c.cluster_status(n)["peer_traffic"]["reply_bytes"] for n in nodes)


def covering(offset: int, length: int, bs: int) -> range:
    return range(offset // bs, -(-(offset + length) // bs))


def test_ranged_read_of_a_lost_node_decodes_only_the_covering_stripes(make_cluster):
    c = make_cluster(3, 1)
    bs, n, m = c.bs, 3, 1
    k = n - m
    rng = random.Random(14)
    data = {r: rng.randbytes(20 * bs + 1000) for r in range(n)}  # 21 blocks each
    for r, node in enumerate(c.nodes):
        c.write(node, 1, data[r])
    c.wait_committed(1)
    n0, n1, n2 = c.nodes
    cl = c.client(n0)

    # The owner is up: its covering blocks only (blocks 5..7), through node 0.
    off, length = 5 * bs + 100, 2 * bs
    before = peer_bytes_served(c, c.nodes)
    _, got, moved = cl.fetch_range(JOB, 1, 1, off, length)
    served = peer_bytes_served(c, c.nodes) - before
    assert got == data[1][off:off + length]
    assert moved == 3 * bs
    assert 3 * bs <= served <= 3 * bs + SLACK, served
    assert c.cluster_status(n0)["ranged_reads"]["owner_reads"] == 1

    seg1 = c.client(n1).open_shard(JOB, 1, 1).segment_name  # for the corruption below

    def corrupt(j):
        with open(shm.path_of(seg1), "r+b") as f:
            f.seek(j * bs + 8)
            f.write(bytes(b ^ 0xFF for b in data[1][j * bs + 8:j * bs + 12]))

    # The owner serves a corrupt block: the range is decoded from the group instead.
    later = {pl.data_stripe_of(n, m, 2, j)[0] for j in range(21)}  # stripes the reads below use
    j_bad = next(j for j in range(21) if pl.data_stripe_of(n, m, 1, j)[0] not in later)
    corrupt(j_bad)
    _, got, _ = cl.fetch_range(JOB, 1, 1, j_bad * bs, 100)
    assert got == data[1][j_bad * bs:j_bad * bs + 100]
    assert c.cluster_status(n0)["ranged_reads"]["decoded_reads"] == 1
    c.kill(n2, wipe=True)  # the machine is gone; nothing replaces it
    for node in (n0, n1):
        wait_for(lambda node=node: not c.cluster_status(node)["peers"][n2]["alive"], 30,
                 f"{node} to see {n2} down")

    # Rank 2's node is lost: only the stripes of the covering blocks are decoded.
    off, length = 7 * bs + 4321, 2 * bs  # blocks 7, 8, 9
    blocks = covering(off, length, bs)
    stripes = {pl.data_stripe_of(n, m, 2, j)[0] for j in blocks}  # node 2's block j: rank 2's
    bound = k * len(stripes) * bs

    def read_rank2():
        before = peer_bytes_served(c, (n0, n1))
        _, got, moved = cl.fetch_range(JOB, 2, 1, off, length)
        return got, moved, peer_bytes_served(c, (n0, n1)) - before

    got, moved, served = read_rank2()
    print(f"decoded range of lost rank 2: peers served {served} bytes; bound {bound} + {SLACK} "
          f"({len(stripes)} stripes x k={k} x {bs}); whole shard {len(data[2])}")
    assert got == data[2][off:off + length]
    assert moved == len(blocks) * bs
    assert served <= bound + SLACK, (served, bound)
    assert served >= (len(stripes) * bs)  # at least one real block per stripe came over
    assert bound + SLACK < k * len(data[2]) / 5  # far below decoding the whole shard (k x 21 blocks)
    last = c.cluster_status(n0)["ranged_reads"]["last_decoded"]
    assert set(last["stripes"]) == stripes and last["blocks"] == [blocks[0], blocks[-1] + 1]
    assert last["fetched_bytes"] <= bound

    # The tail of the payload (a short last block), read through the other survivor.
    _, tail, _ = c.client(n1).fetch_range(JOB, 2, 1, len(data[2]) - 700, 700)
    assert tail == data[2][-700:]

    # Node 1's data blocks in stripes of node 2's blocks: one outside the range, one inside.
    def node1_block_in(stripe_set, want_inside):
        for j in range(21):
            s, _ = pl.data_stripe_of(n, m, 1, j)
            holds_rank2 = any(pl.data_stripe_of(n, m, 2, i)[0] == s for i in range(21))
            if holds_rank2 and (s in stripe_set) == want_inside:
                return j, s
        raise AssertionError("no such block")

    j_out, s_out = node1_block_in(stripes, want_inside=False)
    corrupt(j_out)
    got, _, _ = read_rank2()
    assert got == data[2][off:off + length]  # stripe s_out is not read

    j_in, s_in = node1_block_in(stripes, want_inside=True)
    corrupt(j_in)
    with pytest.raises(errors.InsufficientShardsError,
                       match=rf"stripe {s_in} has fewer than k=2 good sources left \(corrupt: {n1} data block {j_in}"):
        cl.fetch_range(JOB, 2, 1, off, length)
