"""Multi-node mode against real daemon processes (``snapshotd_tools.localcluster``).

Every test brings up its own local cluster in its own tmp dir and pushes shards with
the raw client API (one rank per node, random bytes of uneven sizes, one empty rank),
loses nodes the way a machine is lost (SIGKILL, state dir and shared memory gone,
restarted empty in its slot) and checks what comes back, bit for bit.

Node ids are n0..n{N-1} in every local cluster; the segments of a cluster are
namespaced by its instance name (``snapshotd.<instance>.nX.*``), so they never collide
with another cluster on this machine. The fixture checks that no segment of the
cluster is left at the end, and cleans up after earlier runs that were killed before
their finalizer (their daemons and segments).
"""

from __future__ import annotations
import glob
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import grpc
import pytest
from conftest import REPO
from snapshotd.wire import errors
from snapshotd.wire import shm
from snapshotd_tools import localcluster as lc
from snapshotd.core import placement as pl
from snapshotd.wire._proto import snapshotd_pb2 as pb
from snapshotd.wire.manifest import block_checksums
from snapshotd.node.cluster import peer_ops
from snapshotd.node.peer import PeerAuthError, PeerClient, RemoteError
from snapshotd.node.docfile import DocFile
from snapshotd.core.recovery import plan_recovery
from snapshotd.node.spec_file import load_spec
from snapshotd_client.transport import DaemonClient

from clusterkit import (  # noqa: F401 (make_cluster is a fixture)
    JOB,
    REBUILD_TIMEOUT_S,
    Cluster,
    make_cluster,
    sha,
    wait_for,
    pl_blocks,
    _segments,
)


# -- 1. every pattern of up to m lost nodes ------------------------------------------------
@pytest.mark.parametrize("n,m", [(3, 1), (4, 2)])
def test_every_loss_pattern_up_to_m_is_rebuilt_bit_exact(make_cluster, n, m):
    c = make_cluster(n, m)
    patterns = [p for size in range(1, m + 1) for p in itertools.combinations(c.nodes, size)]

    def empty_rank(i: int) -> int:
        """The rank with an empty payload in the version pattern i will lose: alternately
        a lost node's and a survivor's."""
        lost = patterns[i % len(patterns)]
        pick = lost[0] if i % 2 == 0 else next(x for x in c.nodes if x not in lost)
        return c.nodes.index(pick)

    v = 1
    c.push(v)
    c.wait_committed(v)
    c.check_restorable(v)
    # A second version supersedes the first everywhere (and frees its parity).
    v = 2
    c.push(v, empty=empty_rank(0))
    c.wait_committed(v)
    c.check_restorable(v)
    c.check_settled(v)
    for node in c.nodes:
        with pytest.raises(errors.UnknownJobError, match="version 1 is not held"):
            c.open(node, 1)

    for i, lost in enumerate(patterns):
        c.lose(lost)
        if i % 2 == 0:
            # Asked at once (a trainer restarted with its node): the restarted node
            # knows the committed version and OpenShard rebuilds on demand.
            for node in lost:
                reg = c.client(node).register_job(JOB, c.n, 1)
                assert reg.latest_committed_version == v, (node, lost)
                assert c.open(node, v if i % 4 == 2 else 0)[0].version == v
            c.check_restorable(v, lost)
        for node in lost:  # else the catch-up rebuilds without being asked
            wait_for(lambda: c.committed(node) == v, REBUILD_TIMEOUT_S,
                     f"{node} (lost with {lost}) to rebuild version {v}")
            st = c.cluster_status(node)
            assert st["last_rebuild"]["version"] == v and st["last_rebuild"]["job"] == JOB, st
            assert st["last_rebuild"]["bytes"] > 0
            assert not st["degraded"], st["degraded"]
            if m:
                assert st["parity_bytes"].get(JOB, 0) > 0, st  # parity rebuilt too
        c.check_restorable(v)  # survivors untouched, rebuilt nodes bit-exact
        # The group is whole again: a new version commits on every node.
        v += 1
        c.push(v, empty=empty_rank(i + 1))
        c.wait_committed(v)
        c.check_restorable(v)
    c.check_settled(v)


# -- 2. m + 1 lost nodes --------------------------------------------------------------------
def test_more_than_m_lost_is_reported_not_invented(make_cluster):
    c = make_cluster(4, 1)
    for v in (1, 2):
        c.push(v)
        c.wait_committed(v)
    lost, survivors = c.nodes[:2], c.nodes[2:]
    c.lose(lost)

    def degraded(node):
        why = c.cluster_status(node)["degraded"].get(JOB, "")
        return why if why and "rebuilding" not in why else None

    for node in lost:
        why = wait_for(lambda: degraded(node), REBUILD_TIMEOUT_S, f"{node} to report degraded")
        assert "version 2" in why and "group 0" in why, why
        assert c.committed(node) == 0
        # ``snapshotd status`` shows it too.
        out = subprocess.run([sys.executable, "-m", "snapshotd_tools.cli", "status", "--dir", c.d],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        line = next(x for x in out.stdout.splitlines() if x.startswith(node + " "))
        assert "version 2" in line and "group 0" in line, out.stdout

    for node in lost:
        with pytest.raises(errors.ConflictError) as ei:
            c.open(node)
        err = ei.value
        assert err.grpc_code == grpc.StatusCode.FAILED_PRECONDITION, (err.grpc_code, str(err))
        msg = str(err)
        assert "version 2" in msg and "group 0" in msg, msg
        assert "lost" in msg and "data block" in msg, msg  # names the missing blocks
        assert c.committed(node) == 0  # nothing was invented
    c.check_restorable(2, survivors)
    for node in survivors:
        assert c.committed(node) == 2 and not c.cluster_status(node)["degraded"]

    # The job can go on: a new version written everywhere commits on every node.
    c.push(3)
    c.wait_committed(3)
    c.check_restorable(3)
    wait_for(lambda: all(not c.cluster_status(x)["degraded"] for x in c.nodes), 10,
             "the degraded marks to clear")
    c.check_settled(3)


def test_shard_of_a_node_that_is_down_is_decoded_from_its_group(make_cluster):
    """A restore that gathers other ranks' slices does not wait for a lost node's
    replacement: a survivor decodes that node's shard from the group (a degraded read),
    bit-exact; with more than m down, the error names the node and the group."""
    c = make_cluster(4, 2)
    c.push(1)
    c.wait_committed(1)
    down = c.nodes[1]
    rank = c.nodes.index(down)
    c.kill(down, wipe=True)  # and no replacement yet
    want_data, want_m = c.versions[1][rank]
    asker = c.nodes[3]

    def degraded_read():
        r = c.client(asker).open_shard(JOB, rank, 0)
        seg = shm.open_segment(r.segment_name)
        try:
            return r.manifest, bytes(seg.buf[:r.manifest.payload_bytes])
        finally:
            seg.close()

    m, data = degraded_read()
    assert m == want_m and sha(data) == sha(want_data)
    # Two more down (three of four, m = 2): a clear error, nothing invented.
    for node in c.nodes[:1] + c.nodes[2:3]:
        c.kill(node, wipe=True)
    other = c.nodes.index(c.nodes[2])
    with pytest.raises(errors.SnapshotdError) as ei:
        c.client(asker).open_shard(JOB, other, 0)
    assert f"node {c.nodes[2]} is down" in str(ei.value) or "no node" in str(ei.value), str(ei.value)


def test_drop_job_frees_parity_too(make_cluster):
    c = make_cluster(3, 1)
    for v in (1, 2, 3):  # leaves pooled parity segments behind as well
        c.push(v)
        c.wait_committed(v)
    assert all(any(".parity." in x for x in _segments(c.d, n)) for n in c.nodes)
    for node in c.nodes:
        assert c.client(node).drop_job(JOB) > 0
    for node in c.nodes:
        assert _segments(c.d, node) == [], (node, _segments(c.d, node))
        assert not c.cluster_status(node)["parity_bytes"].get(JOB)


# -- 3. a node lost in the middle of a snapshot --------------------------------------------
def test_node_lost_mid_snapshot_keeps_last_version_and_never_commits_torn_one(make_cluster):
    c = make_cluster(3, 1)
    c.push(1)
    c.wait_committed(1)
    c.push(2, nodes=c.nodes[:2])  # n0, n1 delivered v2, n2 not yet
    # n2 has not delivered v2 itself: it knows of v2 only from n0's and n1's announces
    wait_for(lambda: 2 in c.cluster_status(c.nodes[2])["jobs"][JOB]["pending"], 10, "n2 to hear of v2")
    c.kill(c.nodes[0], wipe=True)  # n0 is lost with its v2 data
    c.push(2, nodes=c.nodes[2:])  # the last rank delivers after all
    c.check_restorable(1, c.nodes[1:])  # the survivors still restore v1, bit-exact
    c.start(c.nodes[0])
    wait_for(lambda: c.committed(c.nodes[0]) == 1, REBUILD_TIMEOUT_S, "n0 to rebuild v1")
    assert c.cluster_status(c.nodes[0])["last_rebuild"]["version"] == 1
    c.check_restorable(1)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:  # v2 is torn: it never commits anywhere
        for node in c.nodes:
            assert c.committed(node) == 1, node
            assert c.cluster_status(node)["jobs"][JOB]["committed"] == 1
            lv = c.client(node).list_versions(JOB)
            assert lv.latest_committed_version == 1
            assert not any(x.committed for x in lv.versions if x.version == 2)
        time.sleep(0.2)
    # Replaced and caught up: the next version commits everywhere.
    c.push(3)
    c.wait_committed(3)
    c.check_restorable(3)
    c.check_settled(3)


# -- 4. a daemon crash (machine alive) neither loses nor invents a commit ---------------------
def _parity_reads(c: Cluster, counts) -> list[tuple[str, str]]:
    """[(source, target)]: rebuilding ``target`` alone reads a parity block of ``source``."""
    layout = pl.place_group(c.n, c.m, counts)
    out = []
    for si, ti in itertools.permutations(range(c.n), 2):
        plan = plan_recovery(layout, set(range(c.n)) - {ti}, [ti], version=1, group=0)
        if any(x.kind == "parity" and x.node == si for r in plan.repairs for x in r.fetches()):
            out.append((c.nodes[si], c.nodes[ti]))
    assert out, f"no rebuild reads parity for counts {counts}"
    return out


def test_daemon_crash_keeps_commit_and_parity(make_cluster):
    c = make_cluster(3, 1)
    c.push(1)
    c.wait_committed(1)
    c.push(2)
    c.wait_committed(2)
    counts = [pl_blocks(len(c.versions[2][r][0]), c.bs) for r in range(c.n)]
    reads = _parity_reads(c, counts)
    crashed, lost = reads[0]
    before = c.cluster_status(crashed)
    assert before["parity_bytes"][JOB] > 0
    # A version only this node delivered must not come back as committed.
    c.push(3, nodes=[crashed])
    c.crash_restart(crashed)
    after = c.cluster_status(crashed)
    assert c.committed(crashed) == 2 and after["jobs"][JOB]["committed"] == 2, after
    assert after["parity_bytes"] == before["parity_bytes"], (before, after)
    assert not after["degraded"], after
    c.check_restorable(2, [crashed])
    lv = c.client(crashed).list_versions(JOB)
    assert lv.latest_committed_version == 2 and [x.version for x in lv.versions] == [2]
    # Its peers learn nothing new either. The restarted daemon starts with no reports from
    # its peers; once it has one from each (their heartbeats carry what they committed),
    # a commit it invented would have reached them and theirs would have reached it.
    others = [n for n in c.nodes if n != crashed]

    def heard_from_all() -> bool:
        peers = c.cluster_status(crashed)["peers"]
        return all(peers[n]["alive"] and peers[n]["committed"] for n in others)

    wait_for(heard_from_all, 10, f"{crashed} to hear from every peer after its restart")
    assert all(c.cluster_status(crashed)["peers"][n]["committed"] == {JOB: 2} for n in others)
    for node in c.nodes:
        assert c.committed(node) == 2
    # The re-adopted parity serves a rebuild: lose a node whose rebuild reads it.
    c.lose([lost])
    wait_for(lambda: c.committed(lost) == 2, REBUILD_TIMEOUT_S, f"{lost} to rebuild v2")
    c.check_restorable(2)
    # The rebuilt node's data and parity serve the next rebuild in turn (n = 3: every
    # rebuild reads both other nodes; preferably one reading ``lost``'s parity).
    nxt = next((t for s, t in reads if s == lost), next(x for x in c.nodes if x not in (lost, crashed)))
    c.lose([nxt])
    wait_for(lambda: c.committed(nxt) == 2, REBUILD_TIMEOUT_S, f"{nxt} to rebuild v2")
    c.check_restorable(2)
    # And the cluster goes on (v3 was dropped with the crash: the trainer moves on to v4).
    c.push(4)
    c.wait_committed(4)
    c.check_restorable(4)
    c.check_settled(4)


# -- 5. peers outside the spec -------------------------------------------------------------
def test_unknown_peer_and_wrong_key_are_refused(make_cluster):
    c = make_cluster(3, 1)
    c.push(1)
    c.wait_committed(1)
    target = c.spec.node("n0")
    addr = f"tcp://127.0.0.1:{target.peer_port}"
    key = c.spec.peer_key.encode()
    forged = peer_ops.ping({JOB: 99})
    with PeerClient(addr, "intruder", "n0", key, timeout_ms=3000) as pc:  # right key
        for h in (forged, peer_ops.vote(JOB, 99, [0]), peer_ops.jobs()):
            with pytest.raises((PeerAuthError, RemoteError), match="unknown peer"):
                pc.call(h)
    with PeerClient(addr, "n1", "n0", b"not-the-key" * 3, timeout_ms=3000) as pc:
        with pytest.raises((PeerAuthError, RemoteError)):
            pc.call(forged)
        with pytest.raises((PeerAuthError, RemoteError)):
            pc.call(peer_ops.vote(JOB, 99, [1]))
    with PeerClient(addr, "n1", "n0", None, timeout_ms=3000) as pc:  # no key at all
        with pytest.raises((PeerAuthError, RemoteError)):
            pc.call(forged)
    # The right key and a spec member are answered (the refusals were not a dead socket).
    with PeerClient(addr, "n2", "n0", key, timeout_ms=3000) as pc:
        rep, _ = pc.call(peer_ops.jobs())
        assert rep.jobs.jobs[JOB].committed_version == 1
    for node in c.nodes:
        assert c.committed(node) == 1
        st = c.cluster_status(node)
        assert "intruder" not in st["peers"]
        assert all(p["committed"].get(JOB, 0) <= 1 for p in st["peers"].values()), st["peers"]
    c.push(2)
    c.wait_committed(2)
    c.check_restorable(2)


# -- 6. snapshotd status ----------------------------------------------------------------------
def test_status_cli_lists_every_node(make_cluster):
    c = make_cluster(3, 1)
    c.push(1)
    c.wait_committed(1)
    c.push(2)
    c.wait_committed(2)
    cmd = [sys.executable, "-m", "snapshotd_tools.cli", "status", "--dir", c.d]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["node", "alive", "group", "committed"], out.stdout
    for node in c.nodes:
        row = next(x for x in lines if x.split()[0] == node).split()
        assert row[1] == "yes" and row[2] == "0" and row[3] == f"{JOB}@2", out.stdout
        assert row[-1] == "-", out.stdout  # not degraded
    js = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert js.returncode == 0, js.stderr
    rows = json.loads(js.stdout)
    assert sorted(r["node_id"] for r in rows) == c.nodes
    for r in rows:
        assert r["alive"] is True
        assert [(j["job_id"], int(j["latest_committed_version"])) for j in r["jobs"]] == [(JOB, 2)]
        assert r["cluster"]["node"] == r["node_id"] and r["cluster"]["jobs"][JOB]["committed"] == 2
        assert r["cluster"]["k"] == 2 and r["cluster"]["m"] == 1
    # A dead node is listed as unreachable, and the exit status says so.
    c.kill(c.nodes[1], wipe=False)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 1
    row = next(x for x in out.stdout.splitlines() if x.split()[0] == c.nodes[1])
    assert "unreachable" in row and row.split()[1] == "no", out.stdout
    c.start(c.nodes[1])
    c.wait_committed(2)


# -- 7. corruption at a source is caught by the rebuilding node -----------------------------

def test_corrupt_source_block_is_never_rebuilt_into_a_shard(make_cluster):
    """Sources send their stored checksum with each block and the rebuilding node
    verifies it: a bit flipped in a survivor's RAM makes the rebuild fail (degraded,
    nothing restored), and once the bytes are good again the retry rebuilds exactly."""
    c = make_cluster(3, 1)
    c.push(1, empty=2)
    c.wait_committed(1)
    r = c.client("n1").open_shard(JOB, 1)
    seg = shm.open_segment(r.segment_name, writable=True)
    n = r.manifest.payload_bytes
    originals = {off: seg.buf[off] for off in range(0, n, c.bs)}
    try:
        for off in originals:  # flip a bit in every block of rank 1's shard on n1
            seg.buf[off] ^= 0x01
        c.lose(["n0"])

        def failed():
            why = c.cluster_status("n0")["degraded"].get(JOB, "")
            return why if "checksum" in why or "corrupt" in why.lower() else None

        why = wait_for(failed, REBUILD_TIMEOUT_S, "n0's rebuild to fail on the corrupt source")
        assert c.committed("n0") == 0, why
        with pytest.raises(errors.SnapshotdError):
            c.open("n0")  # never a shard rebuilt from corrupt bytes
    finally:
        for off, b in originals.items():
            seg.buf[off] = b
        seg.close()
    c.wait_committed(1, ["n0"], timeout_s=REBUILD_TIMEOUT_S)  # catch-up retries
    c.check_restorable(1)


# -- the peer-op schema and its dispatch table, in-process ------------------------------------
def test_peer_ops_table_serves_every_op_and_refuses_unknown_ones():
    from snapshotd.core.protocol import Announce
    from snapshotd.core.recovery import Shard
    from snapshotd.node.peer import check_request, peer_pb2 as ppb

    seen, fenced, suspects = [], [], []

    class _Membership:
        def seen(self, node):
            seen.append(node)

    class _Suspects:
        def queue_suspect(self, s):
            suspects.append(s)

    ops = peer_ops.PeerOps(me="n0", n=3, block_size_bytes=4, store=None, jobs_table=None,
                           membership=_Membership(), commit=None, parity=None, records=None,
                           suspects=_Suspects(), rebuilder=None, fence_job=fenced.append,
                           bounded_counts=tuple)
    assert set(ops.table) == {"announce", "contrib", "vote", "ping", "round", "fetch", "jobs",
                              "suspect", "fence", "rank_manifest", "rank_block"}
    assert set(ops.table) == {f.name for f in ppb.PeerRequest.DESCRIPTOR.oneofs_by_name["op"].fields}
    for bad in (ppb.PeerRequest(), {"op": "fence"}, None):
        with pytest.raises(ValueError, match="unknown op"):
            ops.handle("n1", bad, None)
    assert ops.handle("n2", peer_ops.fence("j"), None) == (ppb.PeerReply(ack=ppb.Ack()), None)
    assert fenced == ["j"] and seen[-1] == "n2"
    ops.handle("n1", peer_ops.suspect("j", 3, 5, Shard("parity", 1, 0, 1)), None)
    ops.handle("n1", peer_ops.suspect("j", 3, 5, Shard("data", 0, 0, 7)), None)
    assert suspects == [{"job": "j", "v": 3, "kind": "parity", "stripe": 5, "row": 1},
                        {"job": "j", "v": 3, "kind": "data", "j": 7}]
    assert peer_ops.fetch("j", 3, 5, Shard("data", 0, 2, 7)) == ppb.PeerRequest(fetch=ppb.FetchRequest(
        job="j", version=3, kind=ppb.BLOCK_KIND_DATA, block_index=7))
    assert peer_ops.fetch("j", 3, 5, Shard("parity", 1, 2, 1)) == ppb.PeerRequest(fetch=ppb.FetchRequest(
        job="j", version=3, kind=ppb.BLOCK_KIND_PARITY, stripe=5, row=1))
    ann = Announce("n1", 4, (0, 1), (b"ab", b"c"))
    builders = [peer_ops.announce("j", 3, ann)[0], peer_ops.contrib("j", 3, 1, 0, 2, [4, 4, 0]),
                peer_ops.vote("j", 3, [0, 1]), peer_ops.ping({"j": 2}), peer_ops.round_("j", 3),
                peer_ops.fetch("j", 3, 5, Shard("data", 0, 2, 7)), peer_ops.jobs(),
                peer_ops.suspect("j", 3, 5, Shard("parity", 1, 2, 1)), peer_ops.fence("j"),
                peer_ops.rank_manifest("j", 3, 1), peer_ops.rank_block("j", 3, 1, 0)]
    assert sorted(check_request(r) for r in builders) == sorted(ops.table)  # every op, each valid
    sizes, blob = peer_ops.pack_blobs([b"ab", b"", b"cde"])
    assert peer_ops.unpack_blobs(sizes, memoryview(blob)) == [b"ab", b"", b"cde"]
    with pytest.raises(ValueError):
        peer_ops.unpack_blobs([1, 2], b"ab")


# -- the round record: the message the ``round`` op serves, its JSON file, its checks ---------
def test_round_record_is_served_typed_checked_whole_and_persisted_as_before(tmp_path):
    import base64
    from google.protobuf.internal.encoder import _VarintBytes
    from snapshotd.node.cluster.jobs import JobTable
    from snapshotd.node.cluster.records import RoundRecords, read_record, record_from_json, record_to_json
    from snapshotd.node.peer import peer_pb2 as ppb

    group, mans = ("n0", "n1", "n2"), {"n0": [b"m0"], "n1": [b"m1a", b""], "n2": []}

    class _Store:
        state_dir, memory_budget_bytes, committed = str(tmp_path), 64, {"j": 3}

        def committed_version(self, job):
            return self.committed.get(job, 0)

        def jobs_summary(self):
            return {"j": {"committed": 3, "world_size": 3, "local_world_size": 1}}

        def aux_names(self):
            return []

    class _Parity:
        def get(self, job, v):
            return None

        def names(self):
            return set()

    served = {}  # node -> the payload its round reply carries

    class _Peer:
        def __init__(self, node):
            self.node = node

        def call(self, req):
            if self.node not in served:
                raise RemoteError("KeyError", "not retained")
            raw = served[self.node]
            return ppb.PeerReply(round=ppb.RoundReply(record_bytes=len(raw))), memoryview(raw)

    class _Membership:
        def peer(self, node):
            return _Peer(node)

    def records(store):
        return RoundRecords(me="n0", n=3, m=1, block_size_bytes=4, store=store,
                            jobs=JobTable("n0", group, group, 1, store), parity=_Parity(),
                            membership=_Membership(), degraded={})

    rec = ppb.RoundRecord(job="j", version=3, block_counts=[2, 3, 0], world_size=3,
                          rank_nodes={0: "n0", 1: "n1", 2: "n1"})
    for node, ms in mans.items():
        rec.announces[node].CopyFrom(ppb.RoundAnnounce(
            block_count=len(ms) + 1 if ms else 0, ranks=[0] if node == "n0" else list(range(1, 1 + len(ms))),
            manifests=ms))
    # A file written by the previous version (keys, base64 manifests, ranks as string keys).
    old_doc = {"counts": [2, 3, 0], "world_size": 3, "rank_nodes": {"1": "n1", "0": "n0", "2": "n1"},
               "announces": {n: {"block_count": a.block_count, "ranks": list(a.ranks),
                                 "manifests": [base64.b64encode(x).decode() for x in a.manifests]}
                             for n, a in rec.announces.items()}, "v": 3}
    assert record_from_json("j", old_doc) == rec and record_from_json("j", record_to_json(rec)) == rec
    os.makedirs(tmp_path / "cluster")
    (tmp_path / "cluster" / "j.json").write_text(json.dumps(old_doc))
    rr = records(_Store())
    rr.load()  # a restart over the old file re-adopts the round
    assert rr.round_record("j", 3) == rec and rr.jobs.job("j").committed_version == 3
    rr.save("j", 3)  # and writes the same record back, in this version's file (no parity buffer here)
    assert read_record(str(tmp_path), "j") == {**old_doc, "rank_nodes": {"0": "n0", "1": "n1", "2": "n1"}}
    assert sorted(os.listdir(tmp_path / "cluster")) == ["j.rec.b"]  # the earlier version's file: gone
    reread = records(_Store())
    reread.load()
    assert reread.round_record("j", 3) == rec and reread.jobs.job("j").committed_version == 3

    # The round op serves the message as its payload; a peer reads it back checked.
    ops = peer_ops.PeerOps(me="n0", n=3, block_size_bytes=4, store=None, jobs_table=None,
                           membership=type("M", (), {"seen": lambda self, n: None})(), commit=None,
                           parity=None, records=rr, suspects=None, rebuilder=None,
                           fence_job=None, bounded_counts=rr.bounded_counts)
    reply, payload = ops.handle("n1", peer_ops.round_("j", 3), None)
    assert reply.round.record_bytes == len(payload) and rr.parse_record("j", 3, payload) == rec
    with pytest.raises(KeyError):
        ops.handle("n1", peer_ops.round_("j", 2), None)

    def variant(**kw):
        bad = ppb.RoundRecord()
        bad.CopyFrom(rec)
        for k, v in kw.items():
            bad.ClearField(k)
            if isinstance(v, list):
                getattr(bad, k).extend(v)
            elif v is not None:
                setattr(bad, k, v)
        return bad.SerializeToString()

    bad_ann = ppb.RoundRecord()
    bad_ann.CopyFrom(rec)
    bad_ann.announces["n1"].ranks.append(7)  # two manifests, three ranks
    refused = {
        "carries no record": None, "does not parse": b"\xff\xff", "not of job": variant(version=2),
        "block counts": variant(block_counts=[1, 2]), "lacks world_size": variant(world_size=None),
        "one manifest per rank": bad_ann.SerializeToString(),
        "does not know": rec.SerializeToString() + _VarintBytes(99 << 3) + b"\x01",
    }
    variant_limit = variant(block_counts=[2, 3, 10**6])  # over what the budget could hold parity for
    for why, raw in [*refused.items(), ("block counts", variant_limit)]:
        with pytest.raises(ValueError, match=why):
            rr.parse_record("j", 3, raw)
    # A rebuild's sources: a node serving a malformed record is refused, never installed.
    fresh = records(_Store())
    served.update(n1=variant_limit, n2=rec.SerializeToString())
    got, holders = fresh.retained_round("j", 3, ["n1", "n2"])
    assert got == rec and holders == ["n2"] and fresh.jobs.get("j") is None
    served.update(n2=refused["does not parse"])
    assert fresh.retained_round("j", 3, ["n1", "n2"]) == (None, [])
    # A damaged file is refused at load, naming it, with nothing installed: this version's
    # (a record that does not parse) and an earlier version's.
    DocFile(str(tmp_path / "cluster" / "j.rec")).save_bytes(b'{"format": 2, "v": 3}\n\xff\xff')
    with pytest.raises(ValueError, match="j.rec: not a round record"):
        fresh.load()
    assert fresh.jobs.get("j") is None
    DocFile(str(tmp_path / "cluster" / "j.rec")).delete()
    DocFile(str(tmp_path / "cluster" / "j.json")).save({**old_doc, "announces": {"n0": {}}})
    with pytest.raises(ValueError, match="j.json: not a round record"):
        fresh.load()
    assert fresh.jobs.get("j") is None
