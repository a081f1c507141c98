"""Delta parity (issue 16) in-process: real :class:`ParityBuffers` and :class:`DeltaParity`,
the network replaced by direct calls (the real-daemon cases are in test_delta_parity.py).

* deltas against a sealed base, through the accumulator route (held and capped), store
  the parity of a full encode, with some blocks changed and with none;
* a corrupt base block is refused, reported, and leaves the buffer as it was: once it is
  repaired the same contribution goes in and the parity is right;
* one buffer never takes whole contributions and deltas together;
* the group's agreement on the base, the knob, no base offered while the state changes
  nearly whole every version; the peer messages' checks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash

from auxstore import AuxStore
from snapshotd.core import placement as pl
from snapshotd.node.cluster import parity as parity_mod
from snapshotd.node.cluster import peer_ops
from snapshotd.node.cluster.delta import DeltaParity
from snapshotd.node.cluster.jobs import JobTable
from snapshotd.node.cluster.parity import ParityBuffers
from snapshotd.node.erasure import erasure_code
from snapshotd.node.peer import check_request, peer_pb2 as ppb
from snapshotd.wire.errors import ChecksumMismatchError, ConflictError, PeerProtocolError

BS = 4096
JOB = "j"


class _Group:
    """n nodes' JobTables and ParityBuffers; versions go through the accumulator route."""

    def __init__(self, layout, code):
        self.layout, self.code = layout, code
        group = tuple(f"n{i}" for i in range(layout.n))
        self.nodes = []
        self.rows: list = []
        self.corrupt: list = []
        for i in range(layout.n):
            jobs = JobTable(group[i], group, group, layout.m, AuxStore())
            pb = ParityBuffers(jobs.store, jobs, code, i, BS, layout.m)
            pb.on_rows = lambda job, v, s, counts, rows, base=0: self.rows.append((v, s, base, rows))
            pb.on_corrupt_base = lambda job, u, s, t: self.corrupt.append((u, s, t))
            self.nodes.append((jobs, pb))

    def version(self, v: int, blocks: dict, base: int = 0, seed: int = 0) -> None:
        """Every node's contributions of v ({(node, j): block, or None: unchanged}), in a
        shuffled order, then the forwarded rows; then seal (as the commit does)."""
        lay = self.layout
        for jobs, pb in self.nodes:
            with jobs.lock:
                jobs.job(JOB).round(v).layout = lay
        sends = [(s, p, i, j) for i in range(lay.n) for j, s, p in lay.data_blocks(i)]
        random.Random(seed).shuffle(sends)
        self.rows.clear()
        for s, p, i, j in sends:
            ((_t, acc),) = lay.contribution_targets(s)
            _jobs, pb = self.nodes[acc]
            assert pb.add(pb.buffer(JOB, v, lay), s, 0, p, blocks[(i, j)], base=self._base(acc, base))
        for _v, s, b, rows in list(self.rows):
            assert b == base
            for t, block in rows:
                holder = (s + t) % lay.n
                _jobs, pb = self.nodes[holder]
                assert pb.put_row(pb.buffer(JOB, v, lay), s, t, block, base=self._base(holder, base))
        for _jobs, pb in self.nodes:
            pb.seal(JOB, v)

    def _base(self, i: int, u: int):
        return self.nodes[i][1].get(JOB, u) if u else None

    def stored(self, v: int) -> dict:
        out = {}
        for i, (_jobs, pb) in enumerate(self.nodes):
            buf = pb.get(JOB, v)
            for s, t in self.layout.parity_blocks(i):
                out[(s, t)] = bytes(buf.view(s, t))
        return out

    def encoded(self, data: dict) -> dict:
        out = {}
        for s in range(self.layout.num_stripes):
            srcs = [data[(nd, j)] if real else np.zeros(BS, np.uint8)
                    for nd, j, real in self.layout.stripe_blocks(s)]
            par = [np.empty(BS, np.uint8) for _ in range(self.layout.m)]
            self.code.encode(srcs, par)
            out.update({(s, t): bytes(par[t]) for t in range(self.layout.m)})
        return out


def _deltas(old: dict, new: dict) -> dict:
    return {k: None if np.array_equal(old[k], new[k]) else np.bitwise_xor(old[k], new[k]) for k in new}


@pytest.mark.parametrize("n,m,counts", [(4, 2, (6, 5, 6, 0)), (5, 3, (4, 7, 1, 4, 2)), (3, 1, (3, 2, 3))])
@pytest.mark.parametrize("cap", [False, True], ids=["held", "capped"])
def test_deltas_against_the_sealed_base_store_the_parity_of_a_full_encode(monkeypatch, n, m, counts, cap):
    if cap:  # the held-contributions cap: stripes accumulate block by block from the base
        monkeypatch.setattr(parity_mod, "HELD_CONTRIBUTIONS_MAX_BYTES", BS)
    layout = pl.place_group(n, m, counts)
    g = _Group(layout, erasure_code(n - m, m))
    rng = np.random.default_rng(n * 10 + m)
    v1 = {(i, j): rng.integers(0, 256, BS, dtype=np.uint8) for i in range(n) for j in range(counts[i])}
    g.version(1, v1)
    assert g.stored(1) == g.encoded(v1)
    v2 = dict(v1)
    for key in list(v2)[::3]:  # every third block: changed in part
        b = v2[key].copy()
        b[100:300] = rng.integers(0, 256, 200, dtype=np.uint8)
        v2[key] = b
    g.version(2, _deltas(v1, v2), base=1, seed=2)
    assert (g.rows or m == 1) and all(b == 1 for _v, _s, b, _r in g.rows)
    stored, want = g.stored(2), g.encoded(v2)
    assert stored == want, sorted(k for k in want if stored[k] != want[k])[:5]
    g.version(3, _deltas(v2, v2), base=2, seed=3)  # nothing changed
    assert g.stored(3) == want
    if not cap:  # the forwarded rows of an unchanged stripe are said unchanged, not sent as zeros
        assert all(block is None for _v, _s, _b, rows in g.rows for _t, block in rows)
    assert not g.corrupt


def test_a_corrupt_base_block_is_refused_and_changes_nothing():
    layout = pl.place_group(4, 2, (4, 4, 4, 4))
    g = _Group(layout, erasure_code(2, 2))
    rng = np.random.default_rng(7)
    v1 = {(i, j): rng.integers(0, 256, BS, dtype=np.uint8) for i in range(4) for j in range(4)}
    g.version(1, v1)
    v2 = {k: b ^ np.uint8(1) if k[1] == 0 else b for k, b in v1.items()}
    d = _deltas(v1, v2)
    # Stripe 2's accumulator is node 2: flip one bit of its sealed parity of v1 for (2, 0).
    _jobs, pb = g.nodes[2]
    base = pb.get(JOB, 1)
    base.view(2, 0)[5] ^= 0x10
    with _jobs.lock:
        _jobs.job(JOB).round(2).layout = layout
    buf = pb.buffer(JOB, 2, layout)
    p_a, p_b = 0, 1
    src = {p: (nd, j) for p, (nd, j, _r) in enumerate(layout.stripe_blocks(2))}
    assert pb.add(buf, 2, 0, p_a, d[src[p_a]], base=base)  # held: the base is not read yet
    with pytest.raises(ChecksumMismatchError, match="corrupt"):
        pb.add(buf, 2, 0, p_b, d[src[p_b]], base=base)  # completes the stripe: the base is checked
    assert g.corrupt == [(1, 2, 0)]
    assert [p for p, _b in buf.held[(2, 0)]] == [p_a]  # the refused one was not taken
    base.view(2, 0)[5] ^= 0x10  # repaired (the scrubber's job): the re-sent contribution goes in
    assert pb.add(buf, 2, 0, p_b, d[src[p_b]], base=base)
    want = g.encoded(v2)
    assert bytes(buf.view(2, 0)) == want[(2, 0)]
    # A released base is refused too.
    pb.release((JOB, 1))
    s1, t1 = next(k for k in buf.index if k[1] == 1)
    with pytest.raises(ConflictError, match="no longer held"):
        pb.put_row(buf, s1, t1, None, base=base)


def test_whole_contributions_and_deltas_never_mix_in_one_buffer():
    layout = pl.place_group(4, 2, (4, 4, 4, 4))
    g = _Group(layout, erasure_code(2, 2))
    rng = np.random.default_rng(8)
    v1 = {(i, j): rng.integers(0, 256, BS, dtype=np.uint8) for i in range(4) for j in range(4)}
    g.version(1, v1)
    _jobs, pb = g.nodes[0]
    with _jobs.lock:
        _jobs.job(JOB).round(2).layout = layout
    buf = pb.buffer(JOB, 2, layout)
    assert pb.add(buf, 0, 0, 0, v1[layout.data_block(0, 0)])  # whole
    with pytest.raises(ConflictError, match="takes whole contributions"):
        pb.add(buf, 0, 0, 1, None, base=pb.get(JOB, 1))
    with pytest.raises(ValueError, match="needs its base"):
        pb.add(buf, 0, 0, 1, None)


def _agreeing(bases: dict, counts_u=(4, 4, 4), counts_v=(4, 4, 4), enabled=True):
    group = ("n0", "n1", "n2")
    jobs = JobTable("n0", group, group, 1, AuxStore())
    with jobs.lock:
        jp = jobs.job(JOB)
        jp.committed_version = 3
        jp.round(3).layout = pl.place_group(3, 1, counts_u)
    d = DeltaParity(me="n0", my_index=0, group=group, block_size_bytes=BS, m=1, store=None, jobs=jobs,
                    parity=ParityBuffers(jobs.store, jobs, None, 0, BS, 1), degraded={}, enabled=enabled)
    for node, b in bases.items():
        d.announced(JOB, 4, node, b)
    return d, pl.place_group(3, 1, counts_v)


def test_the_group_sends_deltas_only_when_every_member_offers_the_same_base():
    d, lay = _agreeing({"n0": 3, "n1": 3, "n2": 3})
    assert d.mode(JOB, 4, lay) == 3
    d.announced(JOB, 4, "n1", 0)  # decided once: a late change does not split the group
    assert d.mode(JOB, 4, lay) == 3
    assert d.mode(JOB, 4, lay) == 3 and d.status()["versions_delta"] == 1
    for bases in ({"n0": 3, "n1": 0, "n2": 3}, {"n0": 3, "n1": 3}, {"n0": 3, "n1": 2, "n2": 3},
                  {"n0": 0, "n1": 3, "n2": 3}):
        d, lay = _agreeing(bases)
        assert d.mode(JOB, 4, lay) == 0, bases
    d, lay = _agreeing({"n0": 3, "n1": 3, "n2": 3}, counts_v=(4, 5, 4))  # another layout
    assert d.mode(JOB, 4, lay) == 0 and d.status()["versions_full"] == 1
    # A fence (the job restarts from v3) forgets v4's decision: the run's next v4 is
    # decided afresh from the announces it brings (a member restarted: no base).
    d, lay = _agreeing({"n0": 3, "n1": 3, "n2": 3})
    assert d.mode(JOB, 4, lay) == 3
    d.forget(JOB, 3)
    for node, b in {"n0": 3, "n1": 0, "n2": 3}.items():
        d.announced(JOB, 4, node, b)
    assert d.mode(JOB, 4, lay) == 0
    # The receiving side refuses a base it did not offer.
    d, lay = _agreeing({"n0": 0, "n1": 3, "n2": 3})
    with pytest.raises(ConflictError, match="offered no base"):
        d.base_buffer(JOB, 4, 3, (4, 4, 4))
    assert d.status()["refused"] == 1
    # The knob: nothing is offered.
    d, _lay = _agreeing({}, enabled=False)
    with d.jobs.lock:
        d.jobs.job(JOB).round(4)
    assert d.claim(JOB, 4) == 0 and not d.status()["enabled"]


def test_a_state_changing_whole_every_version_stops_offering_a_base_and_probes_again():
    from snapshotd.node.cluster import delta as delta_mod

    d, _lay = _agreeing({})
    runs, probe = delta_mod.MOSTLY_CHANGED_RUNS, delta_mod.PROBE_EVERY
    for w in range(2, 2 + runs - 1):  # nearly every block changed, but not yet enough versions in a row
        d._read[(JOB, w)] = [100, 100]
    assert not d._mostly_changed(JOB, 2 + runs)
    last = 2 + runs - 1
    d._read[(JOB, last)] = [95, 100]
    assert d._mostly_changed(JOB, last + 1) and d._mostly_changed(JOB, last + probe - 1)
    assert not d._mostly_changed(JOB, last + probe)  # time to try again
    d._read[(JOB, last)] = [80, 100]  # a version with a fifth unchanged: deltas pay
    assert not d._mostly_changed(JOB, last + 1)
    assert d.status()["not_offered_mostly_changed"] == 2


def test_delta_fields_of_the_peer_messages_are_checked():
    req = peer_ops.contrib(JOB, 4, 1, 0, 1, [4, 4], base=3, unchanged=True)
    assert req.contrib.delta_base == 3 and req.contrib.unchanged and check_request(req) == "contrib"
    assert not peer_ops.contrib(JOB, 4, 1, 0, 1, [4, 4]).contrib.HasField("delta_base")
    with pytest.raises(ValueError, match="needs its base"):
        peer_ops.parity_row(JOB, 4, 1, 1, [4, 4], unchanged=True)
    bad = ppb.PeerRequest(contrib=ppb.ContribRequest(job=JOB, version=4, stripe=1, row=0, position=0,
                                                     delta_base=-1))
    with pytest.raises(PeerProtocolError, match="delta_base"):
        check_request(bad)

    class _Commit:
        def accumulate(self, *a, **kw):
            raise AssertionError("must not be reached")

    ops = peer_ops.PeerOps(me="n0", n=2, block_size_bytes=BS, store=None, jobs_table=None, membership=None,
                           commit=_Commit(), parity=None, records=None, suspects=None, rebuilder=None,
                           fence_job=None, bounded_counts=tuple, delta=object())
    with pytest.raises(ValueError, match="no payload"):
        ops._contrib("n1", req.contrib, memoryview(bytes(BS)))
    whole_unchanged = ppb.ContribRequest(job=JOB, version=4, stripe=1, row=0, position=0, unchanged=True)
    with pytest.raises(ValueError, match="needs a delta_base"):
        ops._contrib("n1", whole_unchanged, None)
    from_the_future = ppb.ContribRequest(job=JOB, version=4, stripe=1, row=0, position=0, delta_base=4)
    with pytest.raises(ValueError, match="not accepted"):
        ops._contrib("n1", from_the_future, memoryview(bytes(BS)))


def test_sealed_checksums_are_what_the_base_check_compares():
    """The check the base goes through is the seal's own hash (xxh3 per block)."""
    layout = pl.place_group(3, 1, (2, 2, 2))
    g = _Group(layout, erasure_code(2, 1))
    rng = np.random.default_rng(9)
    g.version(1, {(i, j): rng.integers(0, 256, BS, dtype=np.uint8) for i in range(3) for j in range(2)})
    for i, (_jobs, pb) in enumerate(g.nodes):
        buf = pb.get(JOB, 1)
        for (s, t), slot in buf.index.items():
            assert buf.checksums[slot] == xxhash.xxh3_64_intdigest(bytes(buf.view(s, t)))
