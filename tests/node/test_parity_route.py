"""The accumulator route of the parity (issue 16), scripted in-process: real
:class:`ParityBuffers`, :class:`JobTable` / commit protocol and :class:`Forwarder`, with
the network replaced by a scripted ``deliver`` (it can stall, fail half-way, or ack).

* the parity each node stores is bit-identical to the route before (every holder
  combining the data blocks itself) and to a plain ``encode`` of each stripe, with the
  held-contributions memory cap hit or not;
* a forward that stalls is re-sent until the holder acknowledges it, never dropped
  while its version is open; dropped once the version closes;
* a holder that dies mid-forward (half a batch acknowledged) gets the rest, and only
  the rest, once it is back; it then holds its parity and votes.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from auxstore import AuxStore
from snapshotd.core import placement as pl
from snapshotd.core import protocol as proto
from snapshotd.node.cluster import parity as parity_mod
from snapshotd.node.cluster.forward import Forwarder
from snapshotd.node.cluster.jobs import JobTable
from snapshotd.node.cluster.parity import ParityBuffers
from snapshotd.node.erasure import erasure_code
from snapshotd.node.peer import PeerUnavailableError

BS = 4096
JOB = "j"


def _data(layout, seed: int) -> dict:
    """{(node, j): block} of random bytes for every real data block."""
    rng = np.random.default_rng(seed)
    return {(i, j): rng.integers(0, 256, BS, dtype=np.uint8)
            for i in range(layout.n) for j in range(layout.block_counts[i])}


def _node(group, i, m, code):
    jobs = JobTable(group[i], group, group, m, AuxStore())
    return jobs, ParityBuffers(jobs.store, jobs, code, i, BS, m)


def _stored(layout, pbs) -> dict:
    """{(s, t): bytes} of every parity block as each holder stores it."""
    out = {}
    for i, pb in enumerate(pbs):
        buf = pb.get(JOB, 1)
        for s, t in layout.parity_blocks(i):
            out[(s, t)] = bytes(buf.view(s, t)) if buf is not None else bytes(BS)
    return out


def _direct_route(layout, data, code) -> dict:
    """The route before issue 16: every holder receives the data blocks of its rows."""
    group = tuple(f"n{i}" for i in range(layout.n))
    pbs = []
    for i in range(layout.n):
        _jobs, pb = _node(group, i, layout.m, code)
        pb.forward = False
        exp = layout.expected_contributions(i)
        if exp:
            buf = pb.buffer(JOB, 1, layout)
            for s, t, p, src, j in exp:
                assert pb.add(buf, s, t, p, data[(src, j)])
        pbs.append(pb)
    return _stored(layout, pbs)


def _accumulator_route(layout, data, code, order_seed: int) -> tuple[dict, int]:
    """The accumulator route: data blocks to the holder of row 0 only (in a shuffled
    order), forwarded rows stored with put_row. Returns (stored parity, blocks moved)."""
    group = tuple(f"n{i}" for i in range(layout.n))
    nodes = [_node(group, i, layout.m, code) for i in range(layout.n)]
    forwarded: list = []
    for _jobs, pb in nodes:
        pb.on_rows = lambda job, v, s, counts, rows: forwarded.extend((s, t, b.copy()) for t, b in rows)
    sends = [(s, p, i, j) for i in range(layout.n) for j, s, p in layout.data_blocks(i)]
    random.Random(order_seed).shuffle(sends)
    for s, p, i, j in sends:
        ((t, acc),) = layout.contribution_targets(s)
        assert t == 0 and acc != i  # never to ourselves: we hold data of s, not parity
        _jobs, pb = nodes[acc]
        assert pb.add(pb.buffer(JOB, 1, layout), s, 0, p, data[(i, j)])
    for s, t, block in forwarded:
        _jobs, pb = nodes[(s + t) % layout.n]
        assert pb.put_row(pb.buffer(JOB, 1, layout), s, t, block)
    want = sorted((s, t) for i in range(layout.n) for s, t, _h in layout.forwards(i))
    assert sorted((s, t) for s, t, _b in forwarded) == want
    return _stored(layout, [pb for _j, pb in nodes]), len(sends) + len(forwarded)


def _encoded(layout, data, code) -> dict:
    """Reference: each stripe's m parity rows from a plain encode (virtual blocks zero)."""
    out = {}
    for s in range(layout.num_stripes):
        srcs = [data[(nd, j)] if real else np.zeros(BS, np.uint8) for nd, j, real in layout.stripe_blocks(s)]
        par = [np.empty(BS, np.uint8) for _ in range(layout.m)]
        code.encode(srcs, par)
        out.update({(s, t): bytes(par[t]) for t in range(layout.m)})
    return out


@pytest.mark.parametrize("n,m,counts", [(4, 2, (6, 5, 6, 0)), (5, 3, (4, 7, 1, 4, 2)), (3, 1, (3, 2, 3)),
                                        (6, 2, (8, 8, 8, 8, 8, 8))])
@pytest.mark.parametrize("cap", [False, True], ids=["held", "capped"])
def test_stored_parity_is_bit_identical_to_the_direct_route(monkeypatch, n, m, counts, cap):
    if cap:  # the held-contributions cap: stripes accumulate block by block
        monkeypatch.setattr(parity_mod, "HELD_CONTRIBUTIONS_MAX_BYTES", BS)
    layout = pl.place_group(n, m, counts)
    code = erasure_code(n - m, m)
    data = _data(layout, seed=n * 100 + m)
    direct = _direct_route(layout, data, code)
    routed, moved = _accumulator_route(layout, data, code, order_seed=n + m)
    ref = _encoded(layout, data, code)
    assert set(routed) == set(ref)
    diff = sorted(k for k in ref if routed[k] != ref[k])
    assert not diff, f"parity blocks differing from the encode: {diff[:5]}"
    assert direct == routed
    # Each data block crossed once; rows 1..m-1 of every stripe with real data once more.
    real = sum(counts)
    assert moved == real + sum(len(layout.forwards(i)) for i in range(n))
    assert moved < m * real or m == 1


# -- the forwarder -------------------------------------------------------------------------
class _Commit:
    """A scripted network: ``script(node, keys)`` returns how many of the batch's rows to
    acknowledge before failing (None: all of them, no failure)."""

    def __init__(self, script):
        self.script, self.calls, self.acked = script, [], []
        self.lock = threading.Lock()

    def deliver(self, node, reqs, job_id=None, v=None, window=8, on_acked=None):
        keys = [(r.contrib.stripe, r.contrib.row) for r, _payload, _xx in reqs]
        for r, _payload, _xx in reqs:
            assert r.contrib.forwarded and r.contrib.version == v
        with self.lock:
            self.calls.append((node, keys))
            n_ok = self.script(node, keys)
        for i in range(len(reqs) if n_ok is None else n_ok):
            with self.lock:
                self.acked.append((node, keys[i]))
            on_acked(i)
        if n_ok is not None:
            raise PeerUnavailableError(f"peer {node}: no reply within 1500 ms (scripted)")

    def enqueue(self, job_id, acts):
        pass


def _wait(pred, what: str, timeout_s: float = 20):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _forwarder(script, open_version: bool = True, start: bool = True):
    group = ("n0", "n1", "n2", "n3")
    jobs = JobTable("n0", group, group, 2, AuxStore())
    with jobs.lock:
        jp = jobs.job(JOB)
        if open_version:
            jp.round(1)
    stop = threading.Event()
    commit = _Commit(script)
    fw = Forwarder(me="n0", group=group, jobs=jobs, parity=None, commit=commit, membership=None, stop=stop,
                   min_backoff_s=0.01, send=commit.deliver)
    if start:
        fw.start()
    return fw, commit, stop, jobs


def _rows(n_stripes: int):
    """Stripes 0, 4, 8, ... (n0 is their accumulator); row 1 goes to n1."""
    return [(s, [(1, np.full(BS, s % 251, np.uint8))]) for s in range(0, 4 * n_stripes, 4)]


def test_a_forward_that_stalls_is_sent_again_until_acknowledged():
    stalls = {"left": 3}

    def script(node, keys):  # the first three deliveries time out, nothing acknowledged
        if stalls["left"]:
            stalls["left"] -= 1
            return 0
        return None

    fw, commit, stop, _jobs = _forwarder(script)
    try:
        for s, rows in _rows(10):
            fw.submit(JOB, 1, s, (6, 5, 6, 5), rows)
        _wait(lambda: not fw.status()["waiting"], "nothing left to forward")
        st = fw.status()
        assert st["rows_sent"] == 10, "rows were dropped, not delivered"
        assert st["failed_deliveries"] == 3 and st["rows_dropped"] == 0 and not st["waiting"]
        assert len(commit.calls) == 4 and all(node == "n1" for node, _ in commit.calls)
        assert sorted(k for _n, k in commit.acked) == [(s, 1) for s in range(0, 40, 4)]
    finally:
        stop.set()
        fw.stop()


def test_a_holder_that_dies_mid_forward_gets_the_rest_and_only_the_rest():
    state = {"down": 2}

    def script(node, keys):  # acks 4 rows, then is gone for two tries, then back
        if state["down"] == 2:
            state["down"] -= 1
            return 4
        if state["down"]:
            state["down"] -= 1
            return 0
        return None

    # Every row is in before the sender starts: its first batch holds all 12 (a sender
    # already running may take the first rows alone, and the script's "4 acknowledged"
    # would exceed that batch).
    fw, commit, stop, _jobs = _forwarder(script, start=False)
    try:
        for s, rows in _rows(12):
            fw.submit(JOB, 1, s, (6, 5, 6, 5), rows)
        fw.start()
        _wait(lambda: not fw.status()["waiting"], "nothing left to forward")
        acked = [k for _n, k in commit.acked]
        assert sorted(acked) == [(s, 1) for s in range(0, 48, 4)]
        assert len(acked) == len(set(acked)), "a row acknowledged before the failure was sent again"
        last = commit.calls[-1][1]
        assert len(last) == 8 and not set(last) & set(commit.calls[0][1][:4])
        assert fw.status()["failed_deliveries"] == 2
    finally:
        stop.set()
        fw.stop()


def test_rows_of_a_closed_version_are_dropped_not_sent():
    fw, commit, stop, jobs = _forwarder(lambda node, keys: 0)  # the holder never answers
    try:
        for s, rows in _rows(3):
            fw.submit(JOB, 1, s, (6, 5, 6, 5), rows)
        _wait(lambda: fw.status()["failed_deliveries"] >= 2, "two failed tries")
        assert fw.status()["rows_dropped"] == 0 and fw.status()["waiting"]["n1"]["rows"] == 3
        with jobs.lock:  # the version is fenced (or committed without us: rebuilt later)
            jobs.job(JOB).fence()
        _wait(lambda: fw.status()["rows_dropped"] == 3, "the rows dropped")
        assert not fw.status()["waiting"]
    finally:
        stop.set()
        fw.stop()


def test_a_forwarded_row_completes_the_holders_parity_and_lets_it_vote():
    """n1 holds row 1 of stripes 0, 4, ... (n0 accumulates them) and row 0 of stripes
    1, 5, ...: the forwarded rows stand for every real data block of their stripe."""
    group = ("n0", "n1", "n2", "n3")
    layout = pl.place_group(4, 2, (6, 5, 6, 5))
    code = erasure_code(2, 2)
    data = _data(layout, seed=7)
    jobs, pb = _node(group, 1, 2, code)
    enq: list = []

    class Commit:
        def enqueue(self, job_id, acts):
            enq.extend(acts)

    fw = Forwarder(me="n1", group=group, jobs=jobs, parity=pb, commit=Commit(), membership=None,
                   stop=threading.Event(), min_backoff_s=0.01)
    with jobs.lock:
        jp = jobs.job(JOB)
        jp.local_data_complete(1, 5, [1], [b""])
        for i, nd in enumerate(group):
            if nd != "n1":
                jp.announce_received(1, proto.Announce(nd, layout.block_counts[i], (i,), (b"",)))
        jp.contributions_delivered(1)
    ref = _encoded(layout, data, code)
    for s, t in layout.parity_blocks(1):
        if t == 0:
            for p, (src, j, real) in enumerate(layout.stripe_blocks(s)):
                if real:
                    buf = pb.buffer(JOB, 1, layout)
                    pb.add(buf, s, 0, p, data[(src, j)])
                    with jobs.lock:
                        enq.extend(jp.contribution_received(1, s, 0, p))
        elif any(real for _n, _j, real in layout.stripe_blocks(s)):
            fw.receive_row(JOB, 1, s, t, layout.block_counts, np.frombuffer(ref[(s, t)], np.uint8))
            fw.receive_row(JOB, 1, s, t, layout.block_counts, np.frombuffer(ref[(s, t)], np.uint8))  # a retry
    with jobs.lock:
        assert jp.rounds[1].parity_done and not jp.rounds[1].expected
    assert any(isinstance(a, proto.SendVote) for a in enq)
    buf = pb.get(JOB, 1)
    assert all(bytes(buf.view(s, t)) == ref[(s, t)] for s, t in layout.parity_blocks(1))
    with pytest.raises(ValueError, match="not held by n1"):  # row 1 of stripe 1 is n2's
        fw.receive_row(JOB, 1, 1, 1, layout.block_counts, np.zeros(BS, np.uint8))
