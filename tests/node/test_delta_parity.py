"""Delta parity (issue 16) with real daemons: a version laid out like the committed one
sends each block's change (XOR), or a header alone for an unchanged block, and the
holders start from their committed parity.

(a) the parity every holder stores after delta rounds (partly changed, then wholly
    unchanged) is bit-identical to a full encode of the same data (fetched over the peer
    plane, checked against ``ErasureCode.encode``);
(b) losing nodes after several delta versions rebuilds bit-exact data, and
(c) the rebuilt node offers no base, so the next version goes whole (every node counts it
    as full), stays correct, and the one after is a delta again;
(d) the peer-plane bytes each node sent (node/peer/traffic.py) for a state with 95 % of
    its bytes unchanged are a small fraction of its data (bound derived from the changed
    blocks), against about (k+m-1)/k of it for a wholly new state.
"""

from __future__ import annotations

import numpy as np

from clusterkit import (  # noqa: F401 (make_cluster is a fixture)
    JOB,
    REBUILD_TIMEOUT_S,
    Cluster,
    make_cluster,
    wait_for,
)
from snapshotd.core import placement as pl
from snapshotd.node.erasure import erasure_code
from snapshotd.node.peer import PeerClient, peer_pb2 as ppb


def _write(c: Cluster, v: int, datas: dict) -> None:
    """Deliver {rank: bytes} as version v (rank i on node i) and keep it for the checks."""
    shards = c.versions.setdefault(v, {})
    for rank, data in datas.items():
        shards[rank] = (data, c.write(c.nodes[rank], v, data))


def _changed(data: bytes, rng, fraction: float) -> bytes:
    """``data`` with one contiguous run of ``fraction`` of its bytes rewritten (a LoRA
    adapter's tensor in a frozen model), at a random, unaligned offset."""
    n = max(1, int(len(data) * fraction))
    off = int(rng.integers(0, len(data) - n))
    out = bytearray(data)
    out[off:off + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(out)


def _layout(c: Cluster, v: int):
    group = c.spec.groups[0]
    counts = [-(-len(c.versions[v][c.nodes.index(nd)][0]) // c.bs) for nd in group]
    return group, pl.place_group(c.n, c.m, counts)


def _stored_parity(c: Cluster, v: int) -> dict:
    """{(s, t): bytes} of every parity block of version v, fetched from its holder."""
    group, layout = _layout(c, v)
    key = c.spec.peer_key.encode() if c.spec.peer_key else None
    out = {}
    for i, node in enumerate(group):
        nd = c.spec.node(node)
        asker = group[(i + 1) % len(group)]
        with PeerClient(f"tcp://{nd.host}:{nd.peer_port}", asker, node, key, timeout_ms=20000) as pc:
            for s, t in layout.parity_blocks(i):
                _rep, payload = pc.call(ppb.PeerRequest(fetch=ppb.FetchRequest(
                    job=JOB, version=v, kind=ppb.BLOCK_KIND_PARITY, stripe=s, row=t)))
                out[(s, t)] = bytes(payload)
    return out


def _encoded_parity(c: Cluster, v: int) -> dict:
    """{(s, t): bytes}: a full encode of version v's data (virtual blocks are zeros)."""
    group, layout = _layout(c, v)
    code = erasure_code(c.n - c.m, c.m)
    blocks = {}
    for i, node in enumerate(group):
        data = c.versions[v][c.nodes.index(node)][0]
        padded = np.zeros(layout.block_counts[i] * c.bs, np.uint8)
        padded[:len(data)] = np.frombuffer(data, np.uint8)
        for j in range(layout.block_counts[i]):
            blocks[(i, j)] = padded[j * c.bs:(j + 1) * c.bs]
    out = {}
    for s in range(layout.num_stripes):
        srcs = [blocks[(nd, j)] if real else np.zeros(c.bs, np.uint8) for nd, j, real in layout.stripe_blocks(s)]
        par = [np.empty(c.bs, np.uint8) for _ in range(c.m)]
        code.encode(srcs, par)
        out.update({(s, t): par[t].tobytes() for t in range(c.m)})
    return out


def _check_parity(c: Cluster, v: int) -> None:
    stored, want = _stored_parity(c, v), _encoded_parity(c, v)
    assert set(stored) == set(want)
    bad = sorted(k for k in want if stored[k] != want[k])
    assert not bad, f"v{v}: parity blocks differing from a full encode: {bad[:8]} of {len(want)}"


def _delta(c: Cluster, node: str) -> dict:
    return c.cluster_status(node)["delta_parity"]


def _sent(c: Cluster) -> dict:
    return {nd: c.cluster_status(nd)["peer_traffic"]["bytes_sent"] for nd in c.nodes}


def test_delta_rounds_store_the_parity_of_a_full_encode(make_cluster):
    """(a): v1 whole; v2 with some blocks changed (partly, wholly, one rank not at all);
    v3 wholly unchanged still commits. Every stored parity block equals a full encode."""
    c = make_cluster(4, 2)
    rng = np.random.default_rng(1)
    blocks = 12
    v1 = {r: rng.integers(0, 256, blocks * c.bs - 1000 * r, dtype=np.uint8).tobytes() for r in range(c.n)}
    _write(c, 1, v1)
    c.wait_committed(1)
    _check_parity(c, 1)
    v2 = dict(v1)
    v2[0] = _changed(v1[0], rng, 0.05)
    v2[1] = _changed(_changed(v1[1], rng, 0.2), rng, 0.01)
    v2[2] = v1[2][:c.bs] + rng.integers(0, 256, c.bs, dtype=np.uint8).tobytes() + v1[2][2 * c.bs:]
    _write(c, 2, v2)
    c.wait_committed(2)
    _check_parity(c, 2)
    _write(c, 3, dict(v2))  # nothing changed at all
    c.wait_committed(3)
    _check_parity(c, 3)
    c.check_restorable(3)
    for node in c.nodes:
        st = _delta(c, node)
        assert st["enabled"] and st["versions_delta"] == 2 and st["versions_full"] == 1, (node, st)
        assert st["refused"] == 0, (node, st)
    total = {k: sum(_delta(c, nd)[k] for nd in c.nodes) for k in ("blocks_unchanged", "blocks_delta")}
    assert total["blocks_delta"] > 0 and total["blocks_unchanged"] > total["blocks_delta"], total


def test_node_loss_after_delta_versions_rebuilds_and_the_rebuilt_node_goes_whole_once(make_cluster):
    """(b) and (c): three delta versions, then two nodes lost at once (m = 2) rebuild
    bit-exact; the next version is whole on every node (the rebuilt ones offer no base)
    and its parity is a full encode's; the one after is a delta again."""
    c = make_cluster(4, 2)
    rng = np.random.default_rng(2)
    data = {r: rng.integers(0, 256, 10 * c.bs + 7 * r, dtype=np.uint8).tobytes() for r in range(c.n)}
    _write(c, 1, data)
    c.wait_committed(1)
    for v in (2, 3, 4):
        data = {r: _changed(d, rng, 0.08) if (r + v) % 3 else d for r, d in data.items()}
        _write(c, v, data)
        c.wait_committed(v)
    for node in c.nodes:
        assert _delta(c, node)["versions_delta"] == 3, (node, _delta(c, node))
    _check_parity(c, 4)
    lost = [c.nodes[1], c.nodes[2]]
    c.lose(lost)
    for node in lost:
        wait_for(lambda node=node: c.committed(node) == 4, REBUILD_TIMEOUT_S, f"{node} to rebuild v4")
    c.check_restorable(4)
    _check_parity(c, 4)
    before = {nd: _delta(c, nd) for nd in c.nodes}
    data = {r: _changed(d, rng, 0.08) for r, d in data.items()}
    _write(c, 5, data)
    c.wait_committed(5)
    for node in c.nodes:  # every node, survivors too, went whole: the rebuilt ones offered no base
        st = _delta(c, node)
        assert st["versions_full"] == before[node]["versions_full"] + 1, (node, before[node], st)
        assert st["versions_delta"] == before[node]["versions_delta"], (node, before[node], st)
        assert st["refused"] == 0, (node, st)
    _check_parity(c, 5)
    c.check_restorable(5)
    data = {r: _changed(d, rng, 0.08) for r, d in data.items()}
    _write(c, 6, data)
    c.wait_committed(6)
    for node in c.nodes:
        assert _delta(c, node)["versions_delta"] == before[node]["versions_delta"] + 1, (node, _delta(c, node))
    _check_parity(c, 6)
    c.check_restorable(6)
    # And a further loss rebuilds v6 from the delta-built parity.
    c.lose([c.nodes[0]])
    wait_for(lambda: c.committed(c.nodes[0]) == 6, REBUILD_TIMEOUT_S, "n0 to rebuild v6")
    c.check_restorable(6)


def test_bytes_sent_for_a_mostly_unchanged_state_follow_the_change(make_cluster):
    """(d): 95 % of every rank's bytes unchanged (one contiguous 5 % run rewritten): each
    node sends at most 0.2 x its data, where a wholly new state costs about 1.5 x (k = m = 2)."""
    c = make_cluster(4, 2)
    rng = np.random.default_rng(3)
    blocks = 80
    size = blocks * c.bs
    data = {r: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for r in range(c.n)}
    _write(c, 1, data)
    c.wait_committed(1)
    # A wholly new state (every byte changed): the accumulator route's (k+m-1)/k x D.
    data = {r: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for r in range(c.n)}
    t0 = _sent(c)
    _write(c, 2, data)
    c.wait_committed(2)
    t1 = _sent(c)
    # 95 % unchanged.
    new = {r: _changed(d, rng, 0.05) for r, d in data.items()}
    _write(c, 3, new)
    c.wait_committed(3)
    t2 = _sent(c)
    _check_parity(c, 3)
    k, m = c.n - c.m, c.m
    full = {nd: (t1[nd] - t0[nd]) / size for nd in c.nodes}
    delta = {nd: (t2[nd] - t1[nd]) / size for nd in c.nodes}
    print(f"bytes sent per node / D: whole state {full}, 95 % unchanged {delta}")
    for nd in c.nodes:
        assert 0.9 * (k + m - 1) / k <= full[nd] <= 1.2 * (k + m - 1) / k, full
    # What each node must send: its changed blocks' deltas, and the change of rows 1..m-1
    # of every stripe it accumulates (it holds row 0) in which some block changed; a
    # header for each unchanged block and row, heartbeats and votes: 64 KiB at most here.
    group, layout = _layout(c, 3)
    chg = {(gi, j) for gi, nd in enumerate(group) for j in range(blocks)
           if new[c.nodes.index(nd)][j * c.bs:(j + 1) * c.bs] != data[c.nodes.index(nd)][j * c.bs:(j + 1) * c.bs]}
    for gi, nd in enumerate(group):
        rows = sum(1 for s in range(layout.num_stripes) if s % c.n == gi
                   and any(real and (src, j) in chg for src, j, real in layout.stripe_blocks(s)))
        own = sum(1 for g, _j in chg if g == gi)
        bound = ((own + (m - 1) * rows) * c.bs + (64 << 10)) / size
        assert delta[nd] <= bound <= 0.2, (nd, delta[nd], bound, own, rows)
