"""Corrupt blocks in a cluster: re-fetch around them, the background scrubber, repair.

Pure logic (``snapshotd.core.integrity``) is tested directly; the rest against real daemon
processes (``snapshotd_tools.localcluster``, the helpers of tests/test_cluster.py), with bits
flipped in the daemons' /dev/shm segments the way ``snapshotd_tools.chaos.faults`` does.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import clusterkit as tc
from snapshotd.wire import errors
from snapshotd.wire import shm
from snapshotd_tools import localcluster as lc
from snapshotd.node.cluster.peer_ops import is_corrupt_reply
from snapshotd.core.erasure import ErasureCode
from snapshotd.core.integrity import (
    ScrubItem,
    next_pass_delay_s,
    pace_delay_s,
    replan_stripe,
    scrub_items,
    stripe_shards,
)
from snapshotd.node.peer import PeerProtocolError, PeerUnavailableError, RemoteError
from snapshotd.node.cluster.records import read_record
from snapshotd.core import placement as pl
from snapshotd.core.placement import place_group
from snapshotd.core.recovery import plan_recovery
from snapshotd.node.spec_file import load_spec

JOB = tc.JOB
REPO = tc.REPO


# -- pure logic -----------------------------------------------------------------------------
def _encode(layout, s, code, bs, rng):
    """{shard index: block} of stripe s with random real data (zeros where virtual)."""
    blocks = {}
    for x in stripe_shards(layout, s):
        if x.kind != "parity":
            blocks[x.index] = (np.zeros(bs, np.uint8) if x.kind == "zero"
                               else np.frombuffer(rng.randbytes(bs), np.uint8).copy())
    parity = [np.empty(bs, np.uint8) for _ in range(code.m)]
    code.encode([blocks[p] for p in range(code.k)], parity)
    for t, b in enumerate(parity):
        blocks[code.k + t] = b
    return blocks


@pytest.mark.parametrize("n,m,counts", [(4, 2, (5, 3, 0, 4)), (5, 2, (2, 2, 2, 2, 2)), (3, 1, (3, 1, 2))])
def test_replan_avoids_bad_sources_and_still_decodes(n, m, counts):
    """Every choice of bad sources leaving k good ones gives k sources without a bad one,
    and decoding from them gives back the lost block; fewer than k good gives None."""
    import itertools

    layout = place_group(n, m, counts)
    code = ErasureCode(n - m, m)
    bs = 64
    rng = random.Random(7)
    checked = 0
    for s in range(layout.num_stripes):
        blocks = _encode(layout, s, code, bs, rng)
        shards = stripe_shards(layout, s)
        for lost in (x for x in shards if x.kind != "zero"):
            others = [x for x in shards if x.kind != "zero" and x.node != lost.node]
            alive = {x.node for x in others}
            for r in range(len(others) + 1):
                for bad in itertools.combinations(others, r):
                    rep = replan_stripe(layout, s, alive, bad, (lost,))
                    good = sum(1 for x in shards if x.kind == "zero" or (x in others and x not in bad))
                    if good < layout.k:
                        assert rep is None, (s, lost, bad)
                        continue
                    assert rep is not None and len(rep.sources) == layout.k
                    assert not set(rep.sources) & set(bad) and lost not in rep.sources
                    assert all(x.kind == "zero" or x.node in alive for x in rep.sources)
                    assert rep.outputs == (lost,)
                    idx = lost.shard_index(layout.k)
                    out = np.empty(bs, np.uint8)
                    code.reconstruct({x.shard_index(layout.k): blocks[x.shard_index(layout.k)]
                                      for x in rep.sources}, [idx], {idx: out})
                    assert np.array_equal(out, blocks[idx]), (s, lost, bad)
                    checked += 1
    assert checked >= 5


def test_replan_matches_the_planner_without_bad_sources():
    """With nothing excluded, a re-plan picks sources as good as the recovery planner's
    (the same data blocks; parity only where data is missing)."""
    layout = place_group(4, 2, (6, 4, 5, 2))
    plan = plan_recovery(layout, {1, 2, 3}, [0], version=1, group=0)
    for rep in plan.repairs:
        again = replan_stripe(layout, rep.stripe, {1, 2, 3}, (), rep.outputs)
        assert [x for x in again.sources if x.kind != "parity"] == [x for x in rep.sources if x.kind != "parity"]
        assert len(again.sources) == len(rep.sources) == 2


def test_scrub_items_order_and_pacing():
    items = scrub_items({"b": {"version": 3, "parity": [(0, 1), (2, 0)], "ranks": {1: 2, 0: 1}},
                         "a": {"version": 7, "parity": [], "ranks": {4: 0}}})
    assert items == [ScrubItem("b", 3, "parity", -1, 0, 0, 1), ScrubItem("b", 3, "parity", -1, 1, 2, 0),
                     ScrubItem("b", 3, "data", 0, 0), ScrubItem("b", 3, "data", 1, 0),
                     ScrubItem("b", 3, "data", 1, 1)]
    assert items[0].label() == {"job": "b", "version": 3, "kind": "parity", "index": 0, "stripe": 0, "row": 1}
    # 64 MiB done 0.5 s into a pass at 64 MiB/s: wait the other half second; never negative.
    assert pace_delay_s(64 << 20, 10.0, 10.5, 64 << 20) == pytest.approx(0.5)
    assert pace_delay_s(1 << 20, 10.0, 99.0, 64 << 20) == 0.0
    assert pace_delay_s(1 << 40, 0.0, 0.0, 0) == 0.0  # 0: no limit
    assert next_pass_delay_s(100.0, 130.0, 60.0) == pytest.approx(30.0)
    assert next_pass_delay_s(100.0, 200.0, 60.0) == 0.0  # a long pass: the next at once
    assert next_pass_delay_s(None, 5.0, 60.0) == 60.0


def test_only_checksum_failures_count_as_corrupt():
    assert is_corrupt_reply(PeerProtocolError("reply payload from peer n1: xxh3 mismatch"))
    assert is_corrupt_reply(RemoteError("CHECKSUM_MISMATCH", "job 'x' v1 rank 0: data block 2 is corrupt "
                                        "(checksum mismatch)"))
    assert not is_corrupt_reply(RemoteError("CHECKSUM_MISMATCH", "n1: parity of job 'x' v1 is not sealed"))
    assert not is_corrupt_reply(RemoteError("NOT_HELD", "no parity for job 'x' version 1 here"))
    assert not is_corrupt_reply(PeerUnavailableError("peer n1: no reply within 1500 ms"))
    assert not is_corrupt_reply(PeerProtocolError("malformed reply"))


def test_bad_scrub_options_are_refused_before_anything_starts(tmp_path):
    for args, want in ((["--scrub-rate", "fast"], "not a size"),
                       (["--scrub-interval-s", "0"], "--scrub-interval-s")):
        spec = tmp_path / "spec.yaml"
        lc.write_spec(str(spec), 3, 1, "64KiB", "k" * 32)
        r = subprocess.run([sys.executable, "-m", "snapshotd.node", "serve", "--node-id", "n0",
                            "--spec", str(spec), "--state-dir", str(tmp_path / "st"),
                            "--socket", str(tmp_path / "s.sock"), "--memory-budget-bytes", "64MiB", *args],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and want in r.stderr, (r.returncode, r.stderr[-500:])
        assert "Traceback" not in r.stderr


# -- real daemons ------------------------------------------------------------------------------
class ScrubCluster(tc.Cluster):
    """tests/test_cluster.py's Cluster, with extra daemon arguments (scrubber, metrics)."""

    def __init__(self, d: str, n: int, m: int, daemon_args=()):
        self.d, self.n, self.m = d, n, m
        self.info = lc.up(d, n, m, block_size=tc.BLOCK, budget="1GiB",
                          daemon_args=["--metrics-addr", "127.0.0.1:0", *daemon_args])
        self.nodes = sorted(self.info["nodes"], key=lambda x: int(x[1:]))
        self.spec = load_spec(os.path.join(d, "spec.yaml"))
        self.bs = self.spec.block_size_bytes
        self._clients = {}
        self.versions = {}

    def metrics(self, node: str) -> dict:
        with open(os.path.join(self.d, f"{node}.ready")) as f:
            port = json.load(f)["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def corrupt(self, node: str) -> list[dict]:
        return self.cluster_status(node)["corrupt"]

    def parity_segment(self, node: str) -> str:
        """The parity segment of the job's committed version on ``node``."""
        st = self.cluster_status(node)
        names = tc._segments(self.d, node)
        par = [x for x in names if f".{JOB}.parity." in x]
        assert par, (node, names, st)
        # pooled (released) segments share the prefix; the committed one is in the record
        name = read_record(os.path.join(self.d, node), JOB)["parity"]["name"]
        assert name in par, (name, par)
        return name


def flip_each_block(name: str, bs: int, size: int | None = None, orig: dict | None = None) -> dict[int, int]:
    """Flip one bit in every block of segment ``name`` (first ``size`` bytes); returns
    {offset: original byte}. Given ``orig`` (from an earlier call), the bytes are set to
    the flipped originals instead (a block still corrupt stays corrupt)."""
    seg = shm.open_segment(name, writable=True)
    try:
        n = seg.size if size is None else size
        orig = dict(orig or {})
        for off in range(bs // 3, n, bs):
            orig.setdefault(off, seg.buf[off])
            seg.buf[off] = orig[off] ^ 0x01
        return orig
    finally:
        seg.close()


def read_segment(name: str, n: int | None = None) -> bytes:
    seg = shm.open_segment(name)
    try:
        return bytes(seg.buf[:seg.size if n is None else n])
    finally:
        seg.close()


def get_metric(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def make_scrub_cluster(tmp_path):
    yield from tc.cluster_fixture(tmp_path, ScrubCluster)


def test_rebuild_refetches_around_a_corrupt_source(make_scrub_cluster):
    """n0 is lost while every data block of n1 is corrupt in RAM. With 3 of 4 nodes left
    (k = 2) every stripe still has k good sources: n0's rebuild drops n1's blocks, fetches
    others, and is bit-exact. The corrupt blocks are counted and listed with their holder;
    n1, told about them, repairs them from the group."""
    c = make_scrub_cluster(4, 2)  # scrubber passes every 600 s: none in this test
    c.push(1, empty=3)
    c.wait_committed(1)
    want_n1 = c.versions[1][1][0]
    seg_n1 = c.client("n1").open_shard(JOB, 1).segment_name
    flipped = flip_each_block(seg_n1, c.bs, len(want_n1))
    assert len(flipped) >= 2
    c.lose(["n0"])
    c.wait_committed(1, ["n0"], timeout_s=tc.REBUILD_TIMEOUT_S)
    c.check_restorable(1, ["n0"])  # bit-exact: nothing decoded from a corrupt block
    entries = [e for e in c.corrupt("n0") if e["holder"] == "n1"]
    assert entries and all(e["kind"] == "data" and e["found_by"] == "rebuild" for e in entries), entries
    st = c.cluster_status("n0")
    assert st["corrupt_blocks"]["data"] == len(entries) and st["corrupt_blocks"]["parity"] == 0
    assert get_metric(c.metrics("n0"), "snapshotd_corrupt_blocks_total", kind="data") == len(entries)
    assert not st["degraded"], st["degraded"]
    # n1 was told: it checks each reported block and decodes it back from the group.
    reported = {e["block"] for e in entries}

    def n1_repaired():
        got = {e["index"] for e in c.corrupt("n1") if e["found_by"] == "peer report" and e["repaired"]}
        return got == reported
    tc.wait_for(n1_repaired, 20, f"n1 to repair its reported blocks {sorted(reported)}")
    now = read_segment(seg_n1, len(want_n1))
    for j in reported:
        assert now[j * c.bs:(j + 1) * c.bs] == want_n1[j * c.bs:(j + 1) * c.bs], f"block {j} not repaired"
    assert c.cluster_status("n1")["scrub"]["passes"] == 0  # the interval is honoured


def test_degraded_read_refetches_around_corrupt_sources(make_scrub_cluster):
    """n1 is down and every data and parity block of n2 is corrupt: a degraded read of
    rank 1 from n3 uses only n0's and n3's blocks (exactly k good ones per stripe) and is
    bit-exact; with n0 down too, fewer than k good sources remain and the error names the
    version, the stripe and the corrupt holder."""
    c = make_scrub_cluster(4, 2)
    c.push(1, empty=3)
    c.wait_committed(1)
    r2 = c.client("n2").open_shard(JOB, 2)
    par2 = c.parity_segment("n2")
    orig_data = flip_each_block(r2.segment_name, c.bs, r2.manifest.payload_bytes)
    orig_par = flip_each_block(par2, c.bs)
    c.kill("n1", wipe=True)
    want_data, want_m = c.versions[1][1]

    def read(rank):
        r = c.client("n3").open_shard(JOB, rank, 0)
        return r.manifest, read_segment(r.segment_name, r.manifest.payload_bytes)

    m, data = read(1)
    assert m == want_m and tc.sha(data) == tc.sha(want_data)
    bad = [e for e in c.corrupt("n3") if e["holder"] == "n2"]
    assert bad and all(e["found_by"] == "degraded read" for e in bad), c.corrupt("n3")
    # n0 down as well: n3 and the corrupt n2 are left, and no stripe has k good sources.
    # (n2 may have repaired some blocks meanwhile, when told; flip them again.)
    c.kill("n0", wipe=True)
    flip_each_block(r2.segment_name, c.bs, r2.manifest.payload_bytes, orig_data)
    flip_each_block(par2, c.bs, orig=orig_par)
    with pytest.raises(errors.SnapshotdError) as ei:
        read(0)
    msg = str(ei.value)
    assert "version 1" in msg and "stripe" in msg and "n2" in msg and "corrupt" in msg, msg


def test_a_nodes_own_corrupt_shard_is_served_decoded_from_the_group(make_scrub_cluster):
    """A bit flipped in n1's own copy of rank 1: OpenShard on n1 never serves it; it
    decodes rank 1 from n0, n2, n3 instead (bit-exact) and reports the block; so does n3
    gathering rank 1 for a sharded restore. With too few good sources left, the checksum
    error is raised, with the reason."""
    c = make_scrub_cluster(4, 2)
    c.push(1, empty=0)
    c.wait_committed(1)
    own = c.client("n1").open_shard(JOB, 1)
    want_data, want_m = c.versions[1][1]
    assert tc.sha(read_segment(own.segment_name, own.manifest.payload_bytes)) == tc.sha(want_data)
    flip_each_block(own.segment_name, c.bs, own.manifest.payload_bytes)
    r = c.client("n1").open_shard(JOB, 1)
    assert r.segment_name != own.segment_name and r.manifest == want_m
    assert tc.sha(read_segment(r.segment_name, r.manifest.payload_bytes)) == tc.sha(want_data)
    assert [e["found_by"] for e in c.corrupt("n1") if e["holder"] == "n1"] == ["restore"]
    # Another node gathering rank 1 (a sharded restore) does not use n1's copy either.
    r = c.client("n3").open_shard(JOB, 1)
    assert tc.sha(read_segment(r.segment_name, r.manifest.payload_bytes)) == tc.sha(want_data)
    assert [e["found_by"] for e in c.corrupt("n3") if e["holder"] == "n1"] == ["restore copy"]
    # n0 and n2 down (m = 2 lost) and n1's own copy corrupt: only n3 is good, k = 2.
    c2 = c.client("n3")
    own3 = c2.open_shard(JOB, 3)
    flip_each_block(own3.segment_name, c.bs, own3.manifest.payload_bytes)
    c.kill("n0", wipe=False)
    c.kill("n2", wipe=False)
    with pytest.raises(errors.ChecksumMismatchError) as ei:
        c2.open_shard(JOB, 3)
    assert "decoding rank 3 from the group failed too" in str(ei.value), str(ei.value)


def test_scrubber_finds_and_repairs_corrupt_parity_and_data(make_scrub_cluster):
    """With a scrub pass every second, a corrupt parity block and a corrupt data block that
    nothing reads are found, reported (status, metrics) and decoded back from the group;
    with a needed node down the corrupt parity is reported, the job shows as degraded
    until the node is back, and then it is repaired."""
    rate = 2 << 20
    c = make_scrub_cluster(3, 1, ["--scrub-interval-s", "1", "--scrub-rate", str(rate)])
    c.push(1, empty=2)
    c.wait_committed(1)
    par = c.parity_segment("n0")
    want_par = read_segment(par)
    par_blocks = len(flip_each_block(par, c.bs))
    want_n1 = c.versions[1][1][0]
    seg_n1 = c.client("n1").open_shard(JOB, 1).segment_name
    # One block of n1 in a stripe whose parity is not n0's (m = 1: one bad shard a stripe).
    j = next(j for j in range(tc.pl_blocks(len(want_n1), c.bs))
             if pl.stripe_parity_nodes(3, 1, pl.data_stripe_of(3, 1, 1, j)[0]) != (0,))
    seg = shm.open_segment(seg_n1, writable=True)
    seg.buf[j * c.bs + 5] ^= 0x40
    seg.close()

    def repaired(node, kind, count):
        es = [e for e in c.corrupt(node) if e["kind"] == kind and e["holder"] == node]
        st = c.cluster_status(node)
        return len(es) == count and all(e["repaired"] and e["found_by"] == "scrub" for e in es) \
            and not st["degraded"]
    tc.wait_for(lambda: repaired("n0", "parity", par_blocks), 30, "n0 to repair its parity")
    tc.wait_for(lambda: repaired("n1", "data", 1), 30, f"n1 to repair its data block {j}")
    assert read_segment(par) == want_par
    assert read_segment(seg_n1, len(want_n1)) == want_n1
    c.check_restorable(1)
    assert get_metric(c.metrics("n0"), "snapshotd_corrupt_blocks_total", kind="parity") == par_blocks
    assert get_metric(c.metrics("n1"), "snapshotd_corrupt_blocks_total", kind="data") == 1
    sc = tc.wait_for(lambda: (lambda x: x if x["passes"] >= 1 else None)(c.cluster_status("n0")["scrub"]),
                     10, "n0's first full scrub pass")
    assert sc["passes"] >= 1 and sc["bytes"] > 0 and sc["rate_bytes_per_s"] == rate
    # paced: a pass of B bytes takes at least B / rate seconds
    assert sc["last_pass_s"] >= 0.9 * sc["last_pass_bytes"] / rate, sc

    # Version 2 with data on n1 and n2; n2's daemon dies: n0's parity of stripes with
    # n2's data cannot be decoded (k = 2 needs it). Detected, reported, degraded.
    c.push(2, empty=0)
    c.wait_committed(2)
    par = c.parity_segment("n0")
    want_par = read_segment(par)
    c.kill("n2", wipe=False)
    flip_each_block(par, c.bs)

    def stuck():
        why = c.cluster_status("n0")["degraded"].get(JOB, "")
        return why if "corrupt parity" in why and "not repaired" in why else None
    why = tc.wait_for(stuck, 30, "n0 to report its corrupt parity as degraded")
    assert "version 2" in why, why
    c.start("n2")  # back with its shared memory: the next pass repairs the parity
    tc.wait_for(lambda: not c.cluster_status("n0")["degraded"], 40, "n0's parity to be repaired")
    assert read_segment(par) == want_par
    c.check_restorable(2)
